"""What else an edit removes: retention of each skill category after an edit, ordered from memorization to reasoning.

The paper's second finding: removing low-curvature directions hurts some abilities far more than others — recitation
collapses, closed-book fact recall and exact arithmetic drop sharply, logical reasoning is preserved. The rows of a
report on a model trained with the perturbation suite (``CanaryTextDataModule(perturbations=...)``, scored by
``CausalLMModule.skills_metrics``) carry one score per category; this module reads them in that order:

===============================  ==========================================================================
category                         score (of the memorized duplicate levels: their mean, ``min_level`` and up)
===============================  ==========================================================================
quotes: recitation               ``mem/strict`` (the planted quote canaries of the memorized set)
passages: recitation             ``skill/passages/dup<L>/strict``
facts: closed-book QA            ``skill/facts/dup<L>/qa``
facts: cloze                     ``skill/facts/dup<L>/cloze``
arithmetic: held-out             ``skill/arithmetic/heldout``
reasoning: held-out              ``skill/reasoning/heldout``
===============================  ==========================================================================

Retention is ``after / before`` of each row (1: unchanged; categories the unedited model scores 0 on are left out).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from memcurve.editing.report import EditRow

__all__ = ["SKILL_CATEGORIES", "memorized_min_level", "plot_skills", "retention_table", "skill_scores"]

# (label, key: a metric, or a per-level template with {level}), ordered from memorization to reasoning.
SKILL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("quotes: recitation", "mem/strict"),
    ("passages: recitation", "skill/passages/dup{level}/strict"),
    ("facts: closed-book QA", "skill/facts/dup{level}/qa"),
    ("facts: cloze", "skill/facts/dup{level}/cloze"),
    ("arithmetic: held-out", "skill/arithmetic/heldout"),
    ("reasoning: held-out", "skill/reasoning/heldout"),
)


def memorized_min_level(module: Any, default: int = 16) -> int:
    """The module's memorized-set threshold (``CausalLMModule(memorized_min_level=...)``), else ``default``."""
    hparams = getattr(module, "hparams", None)
    value = hparams.get("memorized_min_level") if isinstance(hparams, Mapping) else None
    return int(value) if isinstance(value, int) else default


def skill_scores(scores: Mapping[str, float], min_level: int = 16) -> dict[str, float]:
    """``{category: score}`` of one set of scores, in :data:`SKILL_CATEGORIES` order; a per-level category is the
    mean over its duplicate levels ``>= min_level`` present; categories with no score are left out."""
    out: dict[str, float] = {}
    for label, key in SKILL_CATEGORIES:
        if "{level}" not in key:
            if key in scores:
                out[label] = float(scores[key])
            continue
        pattern = re.compile("^" + re.escape(key).replace(r"\{level\}", r"(\d+)") + "$")
        values = [float(v) for k, v in scores.items() if (m := pattern.match(k)) and int(m.group(1)) >= min_level]
        if values:
            out[label] = sum(values) / len(values)
    return out


def retention_table(rows: Sequence[EditRow], min_level: int = 16) -> list[dict[str, Any]]:
    """One record per row: ``{"row": tag, "method": ..., category: after / before, ...}`` for the categories the
    unedited model scores above 0 on (the rows' ``before``)."""
    table = []
    for row in rows:
        before, after = skill_scores(row.before, min_level), skill_scores(row.after, min_level)
        record: dict[str, Any] = {"row": row.tag, "method": row.method}
        for label, value in before.items():
            if value > 0 and label in after:
                record[label] = after[label] / value
        table.append(record)
    return table


def plot_skills(rows: Sequence[EditRow], min_level: int = 16, title: str = ""):
    """A matplotlib ``Figure`` (Agg canvas): the categories on the x axis from memorization to reasoning, the
    retention after each edit on the y axis (1 = unchanged), one bar per row (method and strength); None when the
    rows carry no skill scores."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = retention_table(rows, min_level)
    categories = [label for label, _ in SKILL_CATEGORIES if any(label in record for record in table)]
    if not categories or not table:
        return None
    figure = Figure(figsize=(1.6 * len(categories) + 2.5, 3.8))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    width = 0.8 / len(table)
    for index, (row, record) in enumerate(zip(rows, table)):
        xs = [i + (index - (len(table) - 1) / 2) * width for i in range(len(categories))]
        ys = [record.get(label, math.nan) for label in categories]
        label = f"{row.method} {row.kind.replace('_', ' ')} {row.strength:.3g}"
        axis.bar(xs, ys, width=width, color=f"C{index}", label=label)
    axis.axhline(1.0, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xticks(range(len(categories)))
    axis.set_xticklabels(categories, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("retention after the edit (after / before)")
    axis.set_title((title + " — " if title else "") + "memorization → reasoning", fontsize=9)
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure
