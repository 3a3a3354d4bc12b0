"""The skills figure and table of a sweep on a model trained with the perturbation suite (README "Results").

    python docs/skills_results.py [--sweep runs/skills/sweep] [--readme README.md]

Reads ``<sweep>/seed*/sweep.json`` (``memcurve sweep --config configs/olmo2_tiny_skills_sweep.yaml``), keeps the
``auto`` rows (each method's strength chosen on the selection split under the sweep's budget), draws the retention of
each skill category after each edit (:func:`memcurve.editing.skills.plot_skills`) to ``docs/skills_olmo2_tiny.png``
and replaces the text between the README's ``<!-- skills-results:begin -->`` and ``<!-- skills-results:end -->``
markers with the table (categories from memorization to reasoning; scores before and after; retention).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memcurve.editing.report import EditRow
from memcurve.editing.skills import SKILL_CATEGORIES, plot_skills, retention_table, skill_scores
from memcurve.utils.files import replace_between_markers

BEGIN, END = "<!-- skills-results:begin -->", "<!-- skills-results:end -->"
ROOT = Path(__file__).resolve().parents[1]
MIN_LEVEL = 16  # CausalLMModule's memorized_min_level in configs/olmo2_tiny_skills.yaml


def auto_rows(sweep: Path) -> list[EditRow]:
    rows = []
    for path in sorted(sweep.glob("seed*/sweep.json")):
        rows += [EditRow(**record) for record in json.loads(path.read_text()) if record.get("auto")]
    if not rows:
        raise SystemExit(f"{sweep}: no auto rows in seed*/sweep.json; run the sweep first")
    return rows


def section(rows: list[EditRow], meta: dict) -> str:
    before = skill_scores(rows[0].before, MIN_LEVEL)
    retention = retention_table(rows, MIN_LEVEL)
    labels = [label for label, _ in SKILL_CATEGORIES if label in before]
    header = [
        "category",
        "unedited",
        *(f"{row.method} {row.kind.replace('_', ' ')} {row.strength:.3g}" for row in rows),
    ]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label in labels:
        cells = [label, f"{before[label]:.3f}"]
        for row, record in zip(rows, retention):
            after = skill_scores(row.after, MIN_LEVEL).get(label, float("nan"))
            kept = record.get(label)
            cells.append(f"{after:.3f}" + (f" ({kept:.0%})" if kept is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    cost = [
        "test perplexity ratio",
        "1",
        *(f"{r.after['val/perplexity'] / r.before['val/perplexity']:.3f}" for r in rows),
    ]
    lines.append("| " + " | ".join(cost) + " |")
    seeds = ", ".join(str(seed) for seed in meta.get("seeds", []))
    budget = ", ".join(f"{limit:g}" for limit in meta.get("budgets", []))
    return "\n".join(
        [
            f"`memcurve sweep --config configs/olmo2_tiny_skills_sweep.yaml` — seed {seeds}; each method's strength "
            f"chosen on the selection split under a {budget}× `{meta.get('budget_metric')}` budget; every score on the "
            f"test split and the planted items (memorized levels ≥ {MIN_LEVEL}); in parentheses the share of the "
            "unedited score that is kept.",
            "",
            *lines,
            "",
            "![skills](docs/skills_olmo2_tiny.png)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", default=str(ROOT / "runs" / "skills" / "sweep"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    sweep = Path(args.sweep)
    rows = auto_rows(sweep)
    meta = json.loads((sweep / "sweep_meta.json").read_text())
    figure = plot_skills(rows, MIN_LEVEL, title=meta.get("title", ""))
    figure.savefig(ROOT / "docs" / "skills_olmo2_tiny.png", format="png", dpi=130)
    readme = Path(args.readme)
    try:
        replace_between_markers(readme, BEGIN, END, section(rows, meta))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"skills results written to {readme} and docs/skills_olmo2_tiny.png")


if __name__ == "__main__":
    main()
