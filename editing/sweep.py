"""Curves, not points: memorization against held-out cost over seeds, and memorization at fixed budgets.

Input: the report rows of ``memcurve sweep`` (one :class:`~memcurve.editing.report.EditRow` per seed, method,
layer set and strength, each scored on the test split and on the memorized set, with the selection split's score
in ``row.selection``; rows with ``row.auto`` are the strengths chosen at a budget). Output:

* :func:`sweep_points` — one flat record per row and seed (the sweep's CSV);
* :func:`budget_table` — per method and budget, mean ± sd over seeds of the chosen strength, its selection cost,
  its test cost and the metrics (memorization first), with how many seeds found a strength within the budget;
* :func:`plot_sweep` — memorization (y) against test cost (x): one line per method through the mean over seeds
  at each grid strength, a band of ± one sd over seeds, the chosen strengths at each budget as markers;
* :func:`results_markdown` — the tables a README results section is built from.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from memcurve.editing.auto import ASCENDING_KINDS, Budget
from memcurve.editing.report import EditRow

__all__ = ["METHOD_NAMES", "budget_table", "curve_table", "plot_sweep", "results_markdown", "sweep_points"]

METHOD_NAMES = {
    "kfac": "K-FAC kronecker",
    "kfac-separable": "K-FAC separable",
    "svd": "SVD",
    "bsn": "BalancedSubnet",
    "ga": "gradient ascent",
    "graddiff": "GradDiff",
    "npo": "NPO",
    "simnpo": "SimNPO",
    "rmu": "RMU",
}


def sweep_points(rows_by_seed: Mapping[int, Sequence[EditRow]], budget: Budget) -> list[dict[str, Any]]:
    """Flat records: seed, method, layers, kind, strength, auto budget (or empty), kept fraction, selection and
    test cost of ``budget``'s metric, then every test metric after the edit and the unedited value."""
    records = []
    for seed, rows in rows_by_seed.items():
        for row in rows:
            metric = budget.metric
            record: dict[str, Any] = {
                "seed": seed,
                "method": row.method,
                "layers": " ".join(row.layers),
                "kind": row.kind,
                "strength": row.strength,
                "auto_budget": row.auto.get("budget", ""),
                "within_budget": row.auto.get("within", ""),
                "monotone": row.auto.get("monotone", ""),
                "kept_fraction": row.kept_fraction,
                "selection_cost": row.selection.get("cost", math.nan),
                "test_cost": budget.cost(row.before.get(metric, math.nan), row.after.get(metric, math.nan)),
                "seconds": row.seconds,
            }
            for key in sorted(row.after):
                record[key] = row.after[key]
                record[f"unedited {key}"] = row.before.get(key, math.nan)
            records.append(record)
    return records


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(mean: float, sd: float, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}{suffix}"


def _fmt_strength(mean: float, sd: float) -> str:
    """Strengths span decades: three significant digits (``0.00412 ± 0.0011``)."""
    return "–" if math.isnan(mean) else f"{mean:.3g} ± {sd:.2g}"


def budget_table(
    rows_by_seed: Mapping[int, Sequence[EditRow]],
    budgets: Sequence[Budget],
    memorization: str,
    metrics: Sequence[tuple[str, str]] = (),
    oracles: Mapping[int, EditRow] | None = None,
) -> list[dict[str, Any]]:
    """One record per (method, layers, budget) of the auto rows, plus the unedited model (and the never-trained
    oracle, from ``oracles`` per seed): mean and sd over seeds of ``memorization`` (and its fraction of the unedited
    value), the other ``metrics`` ((key, header) pairs), the chosen strength, its selection and test cost, the wall
    time of the choice and the edit (``seconds``); ``seeds`` (how many) and ``within`` (how many found a strength
    within the budget)."""
    table: list[dict[str, Any]] = []
    keys = [memorization, *(key for key, _ in metrics if key != memorization)]
    first = [rows[0] for rows in rows_by_seed.values() if rows]
    unedited: dict[str, Any] = {"method": "unedited", "layers": "", "budget": "", "seeds": len(first)}
    for key in keys:
        unedited[key] = _mean_sd([row.before.get(key, math.nan) for row in first])
    table.append(unedited)
    if oracles:
        budget = budgets[0]
        rows = list(oracles.values())
        oracle: dict[str, Any] = {"method": "oracle", "layers": "", "budget": "", "seeds": len(rows)}
        oracle["selection_cost"] = _mean_sd([row.selection.get("cost", math.nan) for row in rows])
        oracle["test_cost"] = _mean_sd([_test_cost(row, budget) for row in rows])
        oracle["removed"] = _mean_sd([_removed(row, memorization) for row in rows])
        for key in keys:
            oracle[key] = _mean_sd([row.after.get(key, math.nan) for row in rows])
        table.append(oracle)
    groups = dict.fromkeys(
        (row.method, tuple(row.layers)) for rows in rows_by_seed.values() for row in rows if row.auto
    )
    for budget in budgets:
        for method, layers in groups:
            chosen = [
                row
                for rows in rows_by_seed.values()
                for row in rows
                if row.auto
                and row.method == method
                and tuple(row.layers) == layers
                and row.auto["budget"] == budget.label
            ]
            if not chosen:
                continue
            record: dict[str, Any] = {
                "method": method,
                "layers": " ".join(layers),
                "budget": budget.label,
                "budget_limit": budget.limit,
                "kind": chosen[0].auto["kind"],
                "seeds": len(chosen),
                "within": sum(bool(row.auto["within"]) for row in chosen),
                "monotone": sum(bool(row.auto["monotone"]) for row in chosen),
                "strength": _mean_sd([row.strength for row in chosen]),
                "kept_fraction": _mean_sd([row.kept_fraction for row in chosen]),
                "selection_cost": _mean_sd([row.auto["selection_cost"] for row in chosen]),
                "test_cost": _mean_sd([_test_cost(row, budget) for row in chosen]),
                "removed": _mean_sd([_removed(row, memorization) for row in chosen]),
                "seconds": _mean_sd([row.seconds for row in chosen]),
            }
            for key in keys:
                record[key] = _mean_sd([row.after.get(key, math.nan) for row in chosen])
            table.append(record)
    return table


def _test_cost(row: EditRow, budget: Budget) -> float:
    return budget.cost(row.before.get(budget.metric, math.nan), row.after.get(budget.metric, math.nan))


def _removed(row: EditRow, memorization: str) -> float:
    """The fraction of the unedited memorization the row removes."""
    before = row.before.get(memorization)
    return 1 - row.after.get(memorization, math.nan) / before if before else math.nan


def curve_table(rows_by_seed: Mapping[int, Sequence[EditRow]], budget: Budget, memorization: str) -> list[dict]:
    """Per method, layer set and grid strength (fixed strengths only), from the weakest edit to the strongest: mean ±
    sd over seeds of the test cost, the selection cost and the memorization — the points of the figure."""
    points: dict[tuple, list[EditRow]] = {}
    for rows in rows_by_seed.values():
        for row in rows:
            if not row.auto:
                points.setdefault((row.method, tuple(row.layers), row.kind, row.strength), []).append(row)
    table = []

    def weakest_first(item: tuple) -> tuple:
        (method, layers, kind, strength), _ = item
        return method, layers, kind, strength if kind in ASCENDING_KINDS else -strength

    for (method, layers, kind, strength), rows in sorted(points.items(), key=weakest_first):
        metric = budget.metric
        table.append(
            {
                "method": method,
                "layers": " ".join(layers),
                "kind": kind,
                "strength": strength,
                "seeds": len(rows),
                "kept_fraction": _mean_sd([row.kept_fraction for row in rows]),
                "test_cost": _mean_sd(
                    [budget.cost(r.before.get(metric, math.nan), r.after.get(metric, math.nan)) for r in rows]
                ),
                "selection_cost": _mean_sd([row.selection.get("cost", math.nan) for row in rows]),
                memorization: _mean_sd([row.after.get(memorization, math.nan) for row in rows]),
            }
        )
    return table


def plot_sweep(
    rows_by_seed: Mapping[int, Sequence[EditRow]],
    budgets: Sequence[Budget],
    memorization: str,
    title: str,
    oracles: Mapping[int, EditRow] | None = None,
):
    """The sweep's figure (a matplotlib ``Figure``, Agg canvas): memorization against test cost, one line per
    method and layer set through the mean over seeds of each grid strength, ± one sd over seeds as a band (y) and
    error bars (x), the auto choices as larger markers, the budgets as vertical lines, the unedited level dotted,
    and the never-trained oracle (``oracles``) as the target: a black cross with ± sd bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    budget = budgets[0]
    figure = Figure(figsize=(6.4, 4.6))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    curves = curve_table(rows_by_seed, budget, memorization)
    autos = budget_table(rows_by_seed, budgets, memorization, oracles=oracles)
    groups = dict.fromkeys((c["method"], c["layers"]) for c in curves)
    scale = 100.0 if budget.kind == "drop" else 1.0
    plotted_x: list[float] = []
    for index, (method, layers) in enumerate(groups):
        color = f"C{index}"
        # The curve runs through the grid strengths from the weakest edit to the strongest (costs need not be
        # monotone in the strength); the band is the polygon of ± one sd over seeds along it.
        points = [c for c in curves if (c["method"], c["layers"]) == (method, layers)]
        points.sort(key=lambda c: c["strength"], reverse=points[0]["kind"] not in ASCENDING_KINDS)
        xs = [c["test_cost"][0] * scale for c in points]
        plotted_x += [x for x in xs if math.isfinite(x)]
        xerr = [c["test_cost"][1] * scale for c in points]
        ys = [c[memorization][0] for c in points]
        sds = [c[memorization][1] for c in points]
        label = METHOD_NAMES.get(method, method) + (f" ({layers})" if len(groups) > len({m for m, _ in groups}) else "")
        axis.errorbar(
            xs, ys, xerr=xerr, fmt="-o", color=color, markersize=3, linewidth=1.2, elinewidth=0.6, label=label
        )
        upper = [y + sd for y, sd in zip(ys, sds)]
        lower = [y - sd for y, sd in zip(ys, sds)]
        axis.fill(xs + xs[::-1], upper + lower[::-1], color=color, alpha=0.12, linewidth=0)
        for record in autos:
            if record["method"] != "oracle" and (record["method"], record["layers"]) == (method, layers):
                axis.plot(record["test_cost"][0] * scale, record[memorization][0], "*", color=color, markersize=11)
    base = autos[0][memorization][0]
    axis.axhline(base, color="grey", linestyle=":", label="unedited")
    for record in autos:
        if record["method"] == "oracle":
            (x, x_sd), (y, y_sd) = record["test_cost"], record[memorization]
            axis.errorbar(
                [x * scale],
                [y],
                xerr=[x_sd * scale],
                yerr=[y_sd],
                fmt="X",
                color="black",
                markersize=9,
                elinewidth=0.8,
                label="never-trained oracle (target)",
            )
    for b in budgets:
        axis.axvline(b.limit * scale, color="black", linestyle="--", linewidth=0.6, alpha=0.5)
    axis.set_xlabel("test cost: " + ("points of accuracy lost" if budget.kind == "drop" else f"{budget.metric} ratio"))
    axis.set_ylabel(f"memorization ({memorization})")
    low = 0.0 if budget.kind == "drop" else 1.0
    # The view: from the cheapest point measured to 4x the largest budget (an edit that breaks the model, e.g.
    # perplexity x1e10, would otherwise squeeze everything else into one pixel on either side).
    span = budgets[-1].limit * scale - low
    right = min(max(plotted_x, default=low + span) + 0.05 * span, low + 4 * span)
    left = min(low - 0.05 * span, min(plotted_x, default=low) - 0.05 * span)
    axis.set_xlim(left=left, right=max(right, low + 1.05 * span))
    axis.set_title(title + f" — {len(rows_by_seed)} seeds; ★ auto at each budget", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def results_markdown(
    rows_by_seed: Mapping[int, Sequence[EditRow]],
    budgets: Sequence[Budget],
    memorization: str,
    metrics: Sequence[tuple[str, str]],
    splits: Mapping[int, str],
    oracles: Mapping[int, EditRow] | None = None,
) -> str:
    """The budget table (mean ± sd over seeds) and the protocol it was measured under, as markdown; the wall time
    of each choice (the ``auto`` search and the edit, on this machine), and the never-trained oracle's row."""
    budget = budgets[0]
    seeds = sorted(rows_by_seed)
    table = budget_table(rows_by_seed, budgets, memorization, metrics, oracles=oracles)
    headers = dict(metrics)
    extra = [key for key, _ in metrics if key != memorization]
    cost_digits, cost_scale, cost_suffix = (1, 100.0, " pt") if budget.kind == "drop" else (3, 1.0, "×")
    lines = [
        f"Seeds {', '.join(map(str, seeds))}; strengths chosen on the selection split under `{budget.metric}` "
        f"budgets; costs and metrics on the test split and the memorized set; mean ± sd over seeds.",
        "",
        "| method | budget | chosen | kept | selection cost | test cost | "
        + " | ".join([headers.get(memorization, memorization), "removed", *(headers.get(k, k) for k in extra), "time"])
        + " |",
        "|---" * (9 + len(extra)) + "|",
    ]
    cost = {"digits": cost_digits, "scale": cost_scale, "suffix": cost_suffix}
    for record in table:
        if record["method"] == "unedited":
            cells = ["unedited", "–", "–", "100%", "–", "–", _fmt(*record[memorization]), "–"]
            cells += [_fmt(*record[k]) for k in extra] + ["–"]
        elif record["method"] == "oracle":
            cells = ["never-trained oracle", "–", "–", "–", _fmt(*record["selection_cost"], **cost)]
            cells += [_fmt(*record["test_cost"], **cost), _fmt(*record[memorization])]
            cells += [_fmt(*record["removed"], digits=0, scale=100.0, suffix="%")]
            cells += [_fmt(*record[k]) for k in extra] + ["(training)"]
        else:
            within = (
                "" if record["within"] == record["seeds"] else f" ({record['seeds'] - record['within']} none within)"
            )
            cells = [
                METHOD_NAMES.get(record["method"], record["method"]),
                budget.format_cost(record["budget_limit"]),
                f"{record['kind'].replace('_', ' ')} {_fmt_strength(*record['strength'])}{within}",
                _fmt(*record["kept_fraction"], digits=2, scale=100.0, suffix="%"),
                _fmt(*record["selection_cost"], digits=cost_digits, scale=cost_scale, suffix=cost_suffix),
                _fmt(*record["test_cost"], digits=cost_digits, scale=cost_scale, suffix=cost_suffix),
                _fmt(*record[memorization]),
                _fmt(*record["removed"], digits=0, scale=100.0, suffix="%"),
                *(_fmt(*record[k]) for k in extra),
                _fmt(*record["seconds"], digits=0, suffix=" s"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Held-out splits: " + "; ".join(f"seed {seed}: {splits[seed]}" for seed in seeds if seed in splits)]
    return "\n".join(lines)
