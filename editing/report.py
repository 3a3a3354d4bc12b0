"""Report rows of edits and their one writer, table renderer, figure and TensorBoard logger.

A report folder holds ``<name>.json`` (every row, appended across calls of one run), ``<name>.csv`` (the same rows
flat: ``before <metric>`` / ``after <metric>`` columns), ``<name>.md`` (the table) and, for sweeps, ``<name>.png``
(each metric against the strength, one line per method and layer set). Table columns come from the module's
``report_metrics`` (``(metric key, header)`` pairs; default: the noisy-label classifier's), and a module's
``report_tables(rows)`` may add titled tables with other columns (the LM: recall per canary duplicate level).
TensorBoard: ``<prefix>/<method>/<kind>/L<layers id>/<metric>`` (kind: energy, keep_fraction, ratio or steps; one
curve per method, kind and layer set) at step = strength in parts per million (a step count too, as
:attr:`EditRequest.step <memcurve.editing.request.EditRequest.step>`), ``…/strength`` holding the exact value at that
step, and the unedited model once per curve at step 0.

Rows of reports written before the unlearning methods (no ``steps`` field) load unchanged: ``steps`` is the last field
and defaults to None.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memcurve.editing.request import STRENGTH_KINDS, layers_id
from memcurve.utils.files import atomic_write

__all__ = [
    "REPORT_METRICS",
    "EditRow",
    "log_rows",
    "markdown_table",
    "plot_rows",
    "read_report",
    "report_columns",
    "report_markdown",
    "write_report",
]

# Default columns of the tables (the noisy-label ViT's); a LightningModule overrides them with ``report_metrics``.
REPORT_METRICS = (
    ("val/acc", "val/acc"),
    ("mem/noised_acc", "mem"),
    ("mem/gt_recovery", "GT"),
    ("mem/clean_train_acc", "clean"),
)


@dataclass
class EditRow:
    """One line of a report: what was edited, how much, where it went, and the metrics before and after."""

    method: str
    layers: list[str]
    energy: float | None
    keep_fraction: float | None
    ratio: float | None
    tag: str
    layer_names: list[str]
    kept_pairs: int
    total_pairs: int
    kept_fraction: float
    relative_change: float
    source_checkpoint: str
    edited_checkpoint: str | None
    seconds: float
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)  # held-out protocol: the selection split's scores
    auto: dict[str, Any] = field(default_factory=dict)  # an auto strength: budget, chosen value, the search
    steps: int | None = None  # the unlearning methods' strength (last, so that older reports load)

    @property
    def setting(self) -> str:
        for kind in STRENGTH_KINDS:
            value = getattr(self, kind)
            if value is not None:
                return f"{kind.replace('_', ' ')} {value!r}"
        return "–"

    @property
    def kind(self) -> str:
        """``energy``, ``keep_fraction``, ``ratio`` or ``steps``."""
        return next(k for k in STRENGTH_KINDS if getattr(self, k) is not None)

    @property
    def strength(self) -> float:
        return getattr(self, self.kind)

    def flat(self) -> dict[str, Any]:
        skip = ("before", "after", "layers", "layer_names", "selection", "auto")
        row = {k: v for k, v in asdict(self).items() if k not in skip}
        row["layers"] = " ".join(self.layers)
        row["layer_names"] = " ".join(self.layer_names)
        for key, value in self.selection.items():
            row[f"selection {key}"] = value
        for key, value in self.auto.items():
            row[f"auto {key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
        for key in sorted(set(self.before) | set(self.after)):
            row[f"before {key}"] = self.before.get(key, math.nan)
            row[f"after {key}"] = self.after.get(key, math.nan)
        return row


def read_report(folder: str | os.PathLike, name: str = "pruning_report") -> list[EditRow]:
    path = Path(folder) / f"{name}.json"
    return [EditRow(**record) for record in json.loads(path.read_text())] if path.is_file() else []


def write_report(
    folder: str | os.PathLike, rows: Sequence[EditRow], name: str = "pruning_report", append: bool = True
) -> Path:
    """Write (or extend) ``<name>.json`` and ``<name>.csv`` atomically; returns the JSON path."""
    folder = Path(folder)
    records = (read_report(folder, name) if append else []) + list(rows)
    text = json.dumps([asdict(row) for row in records], indent=1)
    atomic_write(folder / f"{name}.json", lambda tmp: tmp.write_text(text))
    flat = [row.flat() for row in records]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in flat for key in row)))
    writer.writeheader()
    writer.writerows(flat)
    atomic_write(folder / f"{name}.csv", lambda tmp: tmp.write_text(buffer.getvalue()))
    return folder / f"{name}.json"


def report_columns(rows: Sequence[EditRow], module: Any = None) -> list[tuple[str, str]]:
    """``(metric key, header)`` of the table: the module's ``report_metrics`` (default :data:`REPORT_METRICS`),
    keeping those the rows carry; rows with none of them show every metric they have."""
    columns = list(getattr(module, "report_metrics", None) or REPORT_METRICS)
    if not rows:
        return columns
    present = {key for row in rows for key in (*row.before, *row.after)}
    kept = [(key, name) for key, name in columns if key in present]
    return kept or [(key, key) for key in sorted(present)]


def markdown_table(rows: Sequence[EditRow], columns: Sequence[tuple[str, str]]) -> str:
    """One line for the unedited weights (when scored), one per edit: layers, method, setting, kept, change, metrics."""
    costs = any("cost" in row.selection for row in rows)  # the held-out protocol: selection and test costs
    header = ["layers", "method", "setting", "kept", "rel. change"]
    header += ["selection cost", "test cost"] if costs else []
    header += [name for _, name in columns]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    if rows and rows[0].before:
        cells = ["–", "unedited", "–", "100%", "0"] + (["–", "–"] if costs else [])
        cells += [f"{rows[0].before.get(k, math.nan):.3f}" for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        setting = row.setting
        if row.auto:
            within = "" if row.auto.get("within", True) else ", none within"
            setting = f"{row.kind.replace('_', ' ')} auto = {row.strength:.4g} ({row.auto['budget']}{within})"
        cells = [" ".join(row.layers), row.method, setting, f"{row.kept_fraction:.4%}", f"{row.relative_change:.3f}"]
        if costs:
            cells += [f"{row.selection.get('cost', math.nan):.4f}", f"{row.selection.get('test_cost', math.nan):.4f}"]
        cells += [f"{row.after.get(key, math.nan):.3f}" for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    split = next((row.selection["split"] for row in rows if row.selection.get("split")), None)
    if split:
        lines += ["", f"Costs: the budget's metric, edited vs unedited, on each split of the {split}."]
    return "\n".join(lines)


def report_markdown(rows: Sequence[EditRow], module: Any = None) -> str:
    """The main table and the module's extra tables (``report_tables(rows) -> [(title, columns)]``)."""
    parts = [markdown_table(rows, report_columns(rows, module))]
    extra = getattr(module, "report_tables", None)
    for title, columns in extra(rows) if callable(extra) else []:
        parts += ["", f"{title}:", markdown_table(rows, columns)]
    return "\n".join(parts)


def plot_rows(rows: Sequence[EditRow], module: Any = None):
    """A matplotlib ``Figure`` (Agg canvas, no pyplot): each metric against the strength (log axis), one line per
    method, strength kind and layer set; the unedited value as a dotted line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = report_columns(rows, module)
    figure = Figure(figsize=(4.2 * len(columns), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(columns), squeeze=False)[0]
    groups = dict.fromkeys((row.method, row.kind, tuple(row.layers)) for row in rows)
    for axis, (metric, header) in zip(axes, columns):
        for method, kind, layers in groups:
            points = sorted(
                (getattr(row, kind), row.after.get(metric, math.nan))
                for row in rows
                if row.method == method and tuple(row.layers) == layers and getattr(row, kind) is not None
            )
            style = {"energy": "-o", "keep_fraction": "--s", "ratio": ":^", "steps": "-.d"}[kind]
            label = f"{method} ({kind}) {' '.join(layers)}"
            axis.plot(*zip(*points), style, markersize=3, label=label)
        before = next((row.before.get(metric) for row in rows if row.before), None)
        if before is not None:
            axis.axhline(before, color="grey", linestyle=":", label="unedited")
        axis.set_xscale("log")
        axis.set_title(f"{header} ({metric})" if header != metric else metric)
        axis.set_xlabel("strength (energy, keep fraction, ratio or steps)")
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize=6, loc="best")
    figure.tight_layout()
    return figure


def log_rows(experiment: Any, rows: Sequence[EditRow], prefix: str = "prune") -> None:
    """TensorBoard scalars of ``rows`` on a ``SummaryWriter`` (see the module docstring)."""
    curves_with_before: set[str] = set()
    for row in sorted(rows, key=lambda row: row.strength):  # each curve's points in step order (0 first)
        curve = f"{prefix}/{row.method}/{row.kind}/L{layers_id(row.layers)}"
        step = round(row.strength * 1_000_000)
        if row.before and curve not in curves_with_before:
            curves_with_before.add(curve)
            for key, value in row.before.items():
                experiment.add_scalar(f"{curve}/{key}", value, 0)
        for key, value in row.after.items():
            experiment.add_scalar(f"{curve}/{key}", value, step)
        experiment.add_scalar(f"{curve}/strength", row.strength, step)
        experiment.add_scalar(f"{curve}/kept_fraction", row.kept_fraction, step)
    experiment.flush()
