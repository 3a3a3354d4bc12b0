"""``auto`` strength: the strongest edit whose held-out cost stays within a budget, found by bisection.

Pure functions, no Lightning: a :class:`Budget` says which metric may get how much worse than the unedited model's
(``max_accuracy_drop``: an absolute drop of a higher-is-better metric, 0.01 = one point; ``max_perplexity_ratio``:
a ratio of a lower-is-better metric); :func:`candidate_strengths` lists the strengths ``auto`` may return, from the
weakest edit to the strongest; :func:`strongest_within` finds the strongest one within the budget.

**What the bisection assumes.** The cost of an edit does not decrease as the edit gets stronger (keeping fewer
eigen-pairs / singular directions, pruning a larger BalancedSubnet ratio, or running more unlearning steps — each step
count is a point on one trajectory, :mod:`memcurve.editing.unlearning`), so "within budget" holds for a prefix
of the candidates ordered weakest → strongest. Under that assumption the binary search returns exactly the last
candidate of the prefix after at most ⌈log2(n + 1)⌉ evaluations. It is *checked* on every point measured (those the
search evaluates and any others measured on the same data, such as a sweep's grid): a stronger edit that costs less
than a weaker one is a violation, listed in the result (``monotone=False``). The returned strength is always one
that was measured within the budget, never an extrapolation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ASCENDING_KINDS", "AUTO", "KINDS", "AutoResult", "Budget", "candidate_strengths", "strongest_within"]

AUTO = "auto"
KINDS = ("energy", "keep_fraction", "ratio", "steps")  # the strength kinds of every edit (EditRequest)
# Strength kinds where a larger value is a stronger edit (energy and keep_fraction: smaller = stronger).
ASCENDING_KINDS = ("ratio", "steps")
# Default ranges of the candidates: (weakest or strongest end, the other end), per kind.
_DEFAULT_RANGE = {"energy": (1e-4, 1.0), "keep_fraction": (1e-4, 1.0), "ratio": (1e-4, 0.5), "steps": (1, 100)}


@dataclass(frozen=True)
class Budget:
    """How much worse than the unedited model a held-out metric may get. Exactly one of the two limits."""

    max_accuracy_drop: float | None = None
    """Largest allowed drop of ``metric`` (higher is better), absolute: 0.01 = one point of accuracy."""
    max_perplexity_ratio: float | None = None
    """Largest allowed ratio edited / unedited of ``metric`` (lower is better), e.g. 1.10."""
    metric: str | None = None
    """The metric the budget is on (default: ``val/acc`` for a drop, ``val/perplexity`` for a ratio)."""

    def __post_init__(self) -> None:
        drop, ratio = self.max_accuracy_drop, self.max_perplexity_ratio
        if (drop is None) == (ratio is None):
            raise ValueError(
                f"a budget takes exactly one of max_accuracy_drop (e.g. 0.01) and max_perplexity_ratio (e.g. 1.10); "
                f"got max_accuracy_drop={drop!r}, max_perplexity_ratio={ratio!r}"
            )
        if drop is not None and not (_number(drop) and 0 <= drop < 1):
            raise ValueError(f"max_accuracy_drop={drop!r} must be a number in [0, 1) (0.01 = one point)")
        if ratio is not None and not (_number(ratio) and ratio >= 1):
            raise ValueError(f"max_perplexity_ratio={ratio!r} must be a number >= 1 (1.10 = 10% higher perplexity)")
        if self.metric is None:
            object.__setattr__(self, "metric", "val/acc" if drop is not None else "val/perplexity")
        elif not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"budget metric={self.metric!r} must be the name of a logged metric, e.g. 'val/acc'")

    @property
    def kind(self) -> str:
        return "drop" if self.max_accuracy_drop is not None else "ratio"

    @property
    def limit(self) -> float:
        return float(self.max_accuracy_drop if self.max_accuracy_drop is not None else self.max_perplexity_ratio)

    def cost(self, base: float, value: float) -> float:
        """The edit's cost: ``base - value`` (drop) or ``value / base`` (ratio)."""
        if self.kind == "drop":
            return float(base) - float(value)
        return float(value) / float(base)

    def within(self, base: float, value: float) -> bool:
        """Whether ``value`` of the edited model is within the budget of the unedited ``base``; NaN never is."""
        cost = self.cost(base, value)
        return not math.isnan(cost) and cost <= self.limit + 1e-12

    @property
    def label(self) -> str:
        """``val/acc drop ≤ 0.01`` / ``val/perplexity ≤ 1.1×``."""
        if self.kind == "drop":
            return f"{self.metric} drop ≤ {self.limit:g}"
        return f"{self.metric} ≤ {self.limit:g}×"

    def format_cost(self, cost: float) -> str:
        """A cost as reports print it: points of accuracy for a drop (``0.7 pt``), ``1.08×`` for a ratio."""
        if math.isnan(cost):
            return "–"
        return f"{100 * cost:.1f} pt" if self.kind == "drop" else f"{cost:.3f}×"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def candidate_strengths(
    kind: str, minimum: float | None = None, maximum: float | None = None, resolution: float = 0.02
) -> list[float] | list[int]:
    """The strengths ``auto`` chooses from, ordered from the weakest edit to the strongest: a geometric grid with
    neighbouring values a factor ``1 + resolution`` apart (both ends included).

    ``energy`` / ``keep_fraction`` (smaller = stronger): from ``maximum`` (default 1, the identity edit) down to
    ``minimum`` (default 1e-4); ``ratio`` (BalancedSubnet, larger = stronger): from ``minimum`` (default 1e-4) up to
    ``maximum`` (default 0.5); ``steps`` (the unlearning methods, larger = stronger): integers from ``minimum``
    (default 1) up to ``maximum`` (default 100), the geometric grid rounded and de-duplicated (so every integer
    where neighbours of the grid are less than one step apart)."""
    if kind not in KINDS:
        raise ValueError(f"strength kind={kind!r} is not one of {KINDS}")
    if not (_number(resolution) and resolution > 0):
        raise ValueError(f"auto resolution={resolution!r} must be a number > 0 (0.02: candidates 2% apart)")
    low, high = _DEFAULT_RANGE[kind]
    minimum = low if minimum is None else minimum
    maximum = high if maximum is None else maximum
    if kind == "steps":
        integers = all(isinstance(v, int) and not isinstance(v, bool) for v in (minimum, maximum))
        if not (integers and 1 <= minimum < maximum):
            raise ValueError(
                f"auto range [{minimum!r}, {maximum!r}] of steps must be integers with 1 <= minimum < maximum"
            )
    upper = 1.0 if kind != "ratio" else 1.0 - 1e-9
    if kind != "steps" and not (_number(minimum) and _number(maximum) and 0 < minimum < maximum <= upper):
        raise ValueError(
            f"auto range [{minimum!r}, {maximum!r}] of {kind} must satisfy 0 < minimum < maximum <= "
            f"{'1' if kind != 'ratio' else '< 1'}"
        )
    count = max(2, math.ceil(math.log(maximum / minimum) / math.log1p(resolution)) + 1)
    grid = np.geomspace(minimum, maximum, count)
    grid[0], grid[-1] = minimum, maximum  # exact ends
    if kind == "steps":
        return sorted({round(float(v)) for v in grid})
    values = [float(v) for v in grid]
    return values if kind in ASCENDING_KINDS else values[::-1]


@dataclass
class AutoResult:
    """What :func:`strongest_within` found: the chosen candidate (None when even the weakest is outside the budget),
    every point it evaluated in the order evaluated, and the pairs of measured points that break monotonicity."""

    value: float | None
    index: int | None
    evaluated: list[tuple[float, float, bool]] = field(default_factory=list)  # (strength, cost, within)
    violations: list[tuple[float, float]] = field(default_factory=list)  # (weaker, stronger) with stronger cheaper

    @property
    def monotone(self) -> bool:
        return not self.violations


def strongest_within(
    candidates: list[float],
    cost_of: Callable[[float], float],
    limit: float,
    known: Mapping[float, float] | None = None,
    tolerance: float = 0.0,
) -> AutoResult:
    """The strongest candidate whose ``cost_of(value)`` is ≤ ``limit``, assuming the cost does not decrease along
    ``candidates`` (ordered weakest → strongest; see the module docstring). Binary search: ``cost_of`` is called at
    most ⌈log2(len + 1)⌉ times, never twice for one value (a NaN cost is outside the budget).

    The assumption is checked on every measured point — those evaluated here and ``known`` ones (strength → cost,
    e.g. a sweep's grid on the same data): each pair where the stronger edit costs less than the weaker one by more
    than ``tolerance`` is listed in ``violations``. The returned value is always one measured within the budget."""
    if not candidates:
        raise ValueError("auto needs at least one candidate strength")
    costs: dict[int, float] = {}
    order: list[int] = []

    def within(i: int) -> bool:
        if i not in costs:
            costs[i] = float(cost_of(candidates[i]))
            order.append(i)
        return not math.isnan(costs[i]) and costs[i] <= limit + 1e-12

    # Invariant: everything up to ``low`` is within, everything from ``high`` on is not (virtual ends -1 and n).
    low, high = -1, len(candidates)
    while high - low > 1:
        middle = (low + high) // 2
        if within(middle):
            low = middle
        else:
            high = middle
    chosen = low if low >= 0 else None
    # Every measured point, ordered weakest -> strongest, for the monotonicity check.
    ascending = candidates[-1] > candidates[0]  # ratio: larger = stronger
    measured = {candidates[i]: costs[i] for i in costs}
    measured.update({float(v): float(c) for v, c in (known or {}).items()})
    points = sorted(measured.items(), key=lambda item: item[0] if ascending else -item[0])
    violations = [
        (weaker, stronger)
        for a, (weaker, weaker_cost) in enumerate(points)
        for stronger, stronger_cost in points[a + 1 :]
        if not math.isnan(weaker_cost) and not math.isnan(stronger_cost) and stronger_cost < weaker_cost - tolerance
    ]
    return AutoResult(
        value=None if chosen is None else candidates[chosen],
        index=chosen,
        evaluated=[(candidates[i], costs[i], within(i)) for i in order],
        violations=violations,
    )
