"""Regenerate the README's protocol results from the sweeps' outputs (``make protocol`` runs this last).

    python docs/protocol_results.py [--sweeps runs/protocol/sweeps] [--readme README.md]

Reads each ``<sweeps>/<name>/{sweep_meta.json,budgets.json,budgets.md,sweep.png}`` written by ``memcurve sweep``,
copies the figure to ``docs/protocol_<name>.png`` and replaces the text between the README's
``<!-- protocol-results:begin -->`` and ``<!-- protocol-results:end -->`` markers (nothing else is touched; a README
without the markers is refused). Every number it writes comes from those files and names its seeds and budget.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

from memcurve.utils.files import replace_between_markers

BEGIN, END = "<!-- protocol-results:begin -->", "<!-- protocol-results:end -->"
SWEEPS = ("vit_digits_augmented", "olmo2_tiny_canaries", "vit_digits")
GRADIENT_METHODS = ("ga", "graddiff", "npo", "simnpo", "rmu")
ROOT = Path(__file__).resolve().parents[1]


def _mean(record: dict, key: str) -> float:
    value = record.get(key)
    return float(value[0]) if isinstance(value, list) else math.nan


def _goal_lines(name: str, meta: dict, records: list[dict]) -> list[str]:
    """The issue's goals, checked on the budget table (mean over seeds)."""
    memorization = meta["memorization_metric"]
    base = _mean(records[0], memorization)
    by = {(r["method"], r.get("budget_limit")): r for r in records[1:]}
    seeds = ", ".join(map(str, meta["seeds"]))
    lines = []
    limits = meta["budgets"]
    if name == "vit_digits_augmented":
        kfac = by.get(("kfac", 0.01))
        if kfac:
            mem, cost = _mean(kfac, memorization), _mean(kfac, "test_cost")
            met = mem <= 0.10 * base and cost <= 0.01
            lines.append(
                f"- Goal (K-FAC at a 1-point budget removes ≥ 90% of memorization, test accuracy ≥ base − 1 point), "
                f"seeds {seeds}: mem {base:.3f} → {mem:.3f} ({1 - mem / base:.0%} removed), test cost "
                f"{100 * cost:.1f} points: **{'met' if met else 'not met'}**."
            )
    elif name == "olmo2_tiny_canaries":
        kfac = by.get(("kfac", 1.1))
        if kfac:
            mem, ndcg = _mean(kfac, memorization), _mean(kfac, "val/ndcg@10")
            control = _mean(kfac, "control/strict")
            met = mem <= 0.10 and ndcg >= 0.9 and control == 0
            lines.append(
                f"- Goal (at 1.10× perplexity: strict ≤ 0.10, nDCG@10 ≥ 0.9, controls 0), seeds {seeds}: strict "
                f"{mem:.3f}, nDCG@10 {ndcg:.3f}, control strict {control:.3f}: **{'met' if met else 'not met'}**."
            )
    for other in ("svd", "bsn", "kfac-separable", *GRADIENT_METHODS):
        below = [
            limit
            for limit in limits
            if ("kfac", limit) in by
            and (other, limit) in by
            and _mean(by[("kfac", limit)], memorization) < _mean(by[(other, limit)], memorization)
        ]
        compared = [limit for limit in limits if ("kfac", limit) in by and (other, limit) in by]
        if compared:
            lines.append(
                f"- K-FAC kronecker below {other} (mean memorization, seeds {seeds}) at {len(below)} of "
                f"{len(compared)} budgets ({', '.join(f'{limit:g}' for limit in compared)})."
            )
    lines += _oracle_lines(meta, records, by)
    return lines


def _oracle_lines(meta: dict, records: list[dict], by: dict) -> list[str]:
    """Where each method stands against the never-trained oracle (sweeps with ``oracles``), per budget: the
    memorized set's metric, TOFU's forget quality and MUSE's privacy leakage, and who is closest."""
    oracle = by.get(("oracle", None))
    if oracle is None:
        return []
    memorization = meta["memorization_metric"]
    lines = [
        f"- Never-trained oracle (same stream without the memorized canaries), seeds "
        f"{', '.join(map(str, meta['seeds']))}: {memorization} {_mean(oracle, memorization):.3f}, test cost "
        f"{_mean(oracle, 'test_cost'):.3f}× perplexity, MIA AUROC {_mean(oracle, 'mia/mem/auroc_mink'):.3f}."
    ]
    for limit in meta["budgets"]:
        chosen = [r for r in records if r.get("budget_limit") == limit and "oracle/forget_quality" in r]
        if not chosen:
            continue
        closest = max(chosen, key=lambda r: _mean(r, "oracle/forget_quality"))
        private = min(chosen, key=lambda r: abs(_mean(r, "oracle/privleak")))
        lowest = min(chosen, key=lambda r: _mean(r, memorization))
        lines.append(
            f"- At {limit:g}×: lowest {memorization} {lowest['method']} ({_mean(lowest, memorization):.3f}); highest "
            f"forget quality {closest['method']} ({_mean(closest, 'oracle/forget_quality'):.2g}); PrivLeak closest "
            f"to 0 {private['method']} ({_mean(private, 'oracle/privleak'):+.2f})."
        )
    return lines


def _seed_note(meta: dict) -> str:
    """The sweep configs name seeds 0-2; a run restricted to fewer says so (``--seeds``)."""
    return "" if meta["seeds"] == [0, 1, 2] else f" --seeds '{meta['seeds']}'"


def section(sweeps: Path) -> str:
    parts = []
    for name in SWEEPS:
        folder = sweeps / name
        config = f"configs/protocol/{name}_sweep.yaml"
        if not (folder / "sweep_meta.json").is_file():
            parts += [f"#### `{name}`", "", f"Not measured yet: `memcurve sweep --config {config}`.", ""]
            continue
        meta = json.loads((folder / "sweep_meta.json").read_text())
        records = json.loads((folder / "budgets.json").read_text())
        figure = ROOT / "docs" / f"protocol_{name}.png"
        shutil.copyfile(folder / "sweep.png", figure)
        parts += [
            f"#### {meta['title']}",
            "",
            f"`memcurve sweep --config {config}{_seed_note(meta)}` — seeds "
            f"{', '.join(map(str, meta['seeds']))}, budgets on "
            f"`{meta['budget_metric']}` ({', '.join(f'{b:g}' for b in meta['budgets'])}), sweep wall time "
            f"{meta['seconds'] / 60:.1f} min on 2 CPU cores (training the seeds not included).",
            "",
            (folder / "budgets.md").read_text().strip(),
            "",
            *_goal_lines(name, meta, records),
            "",
            f"![{name}](docs/protocol_{name}.png)",
            "",
        ]
    return "\n".join(parts).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", default=str(ROOT / "runs" / "protocol" / "sweeps"))
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    readme = Path(args.readme)
    try:
        replace_between_markers(readme, BEGIN, END, section(Path(args.sweeps)))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(f"protocol results written to {readme}")


if __name__ == "__main__":
    main()
