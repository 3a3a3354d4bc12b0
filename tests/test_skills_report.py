"""The skills report: retention of each category, ordered from memorization to reasoning (editing/skills.py)."""

from __future__ import annotations

import math

import pytest

from memcurve.editing.report import EditRow
from memcurve.editing.skills import SKILL_CATEGORIES, plot_skills, retention_table, skill_scores


def row(method: str, before: dict, after: dict, energy: float = 0.5) -> EditRow:
    return EditRow(
        method=method, layers=["l"], energy=energy, keep_fraction=None, ratio=None, tag=f"{method}-{energy}",
        layer_names=["l"], kept_pairs=1, total_pairs=2, kept_fraction=0.5, relative_change=0.1,
        source_checkpoint="a.ckpt", edited_checkpoint=None, seconds=0.0, before=before, after=after,
    )  # fmt: skip


BEFORE = {
    "mem/strict": 0.9,
    "skill/passages/dup4/strict": 0.2,  # below the memorized levels: not in the category's mean
    "skill/passages/dup16/strict": 1.0,
    "skill/passages/dup64/strict": 0.8,
    "skill/facts/dup16/qa": 0.25,
    "skill/facts/dup64/qa": 0.0,
    "skill/arithmetic/heldout": 0.75,
    "skill/reasoning/heldout": 0.9,
    "val/perplexity": 90.0,
}


def test_scores_are_the_memorized_levels_mean_in_the_papers_order():
    scores = skill_scores(BEFORE, min_level=16)
    assert list(scores) == [label for label, _ in SKILL_CATEGORIES if label != "facts: cloze"]
    assert scores["passages: recitation"] == pytest.approx(0.9)
    assert scores["facts: closed-book QA"] == pytest.approx(0.125)
    assert skill_scores(BEFORE, min_level=4)["passages: recitation"] == pytest.approx((0.2 + 1.0 + 0.8) / 3)
    assert skill_scores({"val/perplexity": 3.0}) == {}


def test_retention_is_after_over_before_and_skips_what_the_model_never_had():
    after = dict(BEFORE) | {"mem/strict": 0.09, "skill/arithmetic/heldout": 0.375, "skill/facts/dup16/qa": 0.0}
    (record,) = retention_table([row("kfac", BEFORE, after)])
    assert record["quotes: recitation"] == pytest.approx(0.1)
    assert record["arithmetic: held-out"] == pytest.approx(0.5)
    assert record["reasoning: held-out"] == pytest.approx(1.0)
    assert record["facts: closed-book QA"] == 0.0
    unscored = dict(BEFORE) | {"skill/facts/dup16/qa": 0.0}
    (record,) = retention_table([row("kfac", unscored, after)])
    assert "facts: closed-book QA" not in record  # 0 before: no retention to speak of


def test_the_figure_has_one_bar_per_row_and_category():
    after = {key: value / 2 for key, value in BEFORE.items()}
    figure = plot_skills([row("kfac", BEFORE, after), row("svd", BEFORE, after, 0.9)], title="t")
    (axis,) = figure.axes
    assert len(axis.patches) == 2 * 5  # two rows, five categories the unedited model has
    assert all(math.isclose(patch.get_height(), 0.5) for patch in axis.patches)
    assert axis.get_xticklabels()[0].get_text() == "quotes: recitation"
    assert plot_skills([row("kfac", {"val/perplexity": 1.0}, {"val/perplexity": 2.0})]) is None
