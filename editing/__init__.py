"""The one edit pipeline: request → edited state dict → named, safely written outputs → scores → report.

Used by the pruning callbacks and by ``memcurve prune`` / ``compare`` / ``edit``. Hugging Face model folders and
Lightning checkpoints are edited layer by layer by :mod:`memcurve.editing.hf`.
"""

from memcurve.editing.methods import (
    BalancedSubnetSettings,
    EditResult,
    apply_edit,
    check_bsn_module,
    check_unlearning_module,
)
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
from memcurve.editing.request import EDIT_METHODS, METHODS, EditRequest, requests_for
from memcurve.editing.scoring import Scorer, check_scorable
from memcurve.editing.unlearning import UNLEARNING_METHODS, UnlearningResult, UnlearningSettings, unlearn

__all__ = [
    "EDITED_FOLDER",
    "EDIT_KEY",
    "EDIT_METHODS",
    "METHODS",
    "UNLEARNING_METHODS",
    "BalancedSubnetSettings",
    "EditRequest",
    "EditResult",
    "EditRow",
    "OutputGuard",
    "Scorer",
    "UnlearningResult",
    "UnlearningSettings",
    "apply_edit",
    "check_bsn_module",
    "check_requests",
    "check_scorable",
    "check_unlearning_module",
    "edit_checkpoint",
    "edited_checkpoint_path",
    "log_rows",
    "markdown_table",
    "plot_rows",
    "read_report",
    "report_columns",
    "report_markdown",
    "requests_for",
    "unlearn",
    "write_report",
]
