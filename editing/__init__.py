"""The one edit pipeline: request → edited state dict → named, safely written outputs → scores → report.

Used by the pruning callbacks and by ``memcurve prune`` / ``compare`` / ``edit``. Hugging Face model folders and
Lightning checkpoints are edited layer by layer by :mod:`memcurve.editing.hf`.
"""

from memcurve.editing.methods import BalancedSubnetSettings, EditResult, apply_edit, check_bsn_module
from memcurve.editing.outputs import EDIT_KEY, EDITED_FOLDER, OutputGuard, edited_checkpoint_path
from memcurve.editing.pipeline import check_requests, edit_checkpoint
from memcurve.editing.report import (
    EditRow,
    log_rows,
    markdown_table,
    plot_rows,
    read_report,
    report_columns,
    report_markdown,
    write_report,
)
from memcurve.editing.request import METHODS, EditRequest, requests_for
from memcurve.editing.scoring import Scorer, check_scorable

__all__ = [
    "EDITED_FOLDER",
    "EDIT_KEY",
    "METHODS",
    "BalancedSubnetSettings",
    "EditRequest",
    "EditResult",
    "EditRow",
    "OutputGuard",
    "Scorer",
    "apply_edit",
    "check_bsn_module",
    "check_requests",
    "check_scorable",
    "edit_checkpoint",
    "edited_checkpoint_path",
    "log_rows",
    "markdown_table",
    "plot_rows",
    "read_report",
    "report_columns",
    "report_markdown",
    "requests_for",
    "write_report",
]
