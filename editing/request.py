"""What to edit: one :class:`EditRequest` per (method, layer set, strength), validated once, named losslessly.

Methods (one vocabulary for the callbacks, the commands and the reports):

* ``kfac``: the paper's edit — keep the eigen-pairs of the K-FAC Fisher block with the largest curvature
  ``κ = μ_i λ_j`` (by ``energy`` = fraction of ``Σκ`` kept, or ``keep_fraction`` of the pairs);
* ``kfac-separable``: keep the top eigenvectors of G and of A separately;
* ``svd``: keep the top singular directions of the weight (``energy`` of ``Σσ²`` or ``keep_fraction`` of the rank);
* ``bsn``: BalancedSubnet, a learned mask pruning ``ratio`` of each layer's weights (needs the memorized set);
* ``ga``, ``graddiff``, ``npo``, ``simnpo``, ``rmu``: the gradient unlearning baselines
  (:mod:`memcurve.editing.unlearning`), told the memorized set too; their strength is ``steps``, the number of
  unlearning steps (an integer, larger = stronger). :data:`METHODS` keeps the first four; :data:`EDIT_METHODS` is
  every method the pipeline, the reports, the commands and ``auto`` run.

Names. ``tag`` is ``<method>-<e|k|r|s><value>-L<layers id>``: the value is written as Python's shortest round-trip
``repr`` (``0.0015`` stays ``0.0015``, never rounded), and the layer-set id is the first 8 hex digits of the sha256
of the patterns, so two requests share a tag only if they are the same request. ``step`` (TensorBoard) is the
strength in parts per million, exact for values with up to six decimals; the value itself is in every report row.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

from memcurve.curvature.balanced_subnet import check_ratio
from memcurve.curvature.edit import check_strength
from memcurve.curvature.tracker import compile_layer_patterns
from memcurve.editing.auto import KINDS
from memcurve.editing.unlearning import UNLEARNING_METHODS
from memcurve.utils.arguments import check_choice, check_positive_int

__all__ = [
    "CURVATURE_METHODS",
    "EDIT_METHODS",
    "METHODS",
    "STRENGTH_KINDS",
    "EditRequest",
    "layer_patterns",
    "layers_id",
    "requests_for",
    "strength_kinds",
]

METHODS = ("kfac", "kfac-separable", "svd", "bsn")
# Every method apply_edit runs: METHODS and the gradient unlearning baselines (strength: steps).
EDIT_METHODS = METHODS + UNLEARNING_METHODS
STRENGTH_KINDS = KINDS  # energy, keep_fraction, ratio, steps (memcurve.editing.auto)
# The request method -> the method of the pure edit maths (memcurve.curvature.edit).
CURVATURE_METHODS = {"kfac": "kronecker", "kfac-separable": "separable", "svd": "svd"}
_LETTER = {"energy": "e", "keep_fraction": "k", "ratio": "r", "steps": "s"}


def strength_kinds(method: str) -> tuple[str, ...]:
    """The strength kinds ``method`` takes: ``("ratio",)`` for ``bsn``, ``("steps",)`` for the unlearning methods,
    ``("energy", "keep_fraction")`` for the others."""
    if method == "bsn":
        return ("ratio",)
    return ("steps",) if method in UNLEARNING_METHODS else ("energy", "keep_fraction")


def layer_patterns(layers: str | Sequence[str], argument: str = "layers") -> tuple[str, ...]:
    """Layer patterns as a tuple (a string is one pattern), each compiled once to fail early on a bad regex."""
    patterns = (layers,) if isinstance(layers, str) else tuple(layers)
    if not patterns or any(not isinstance(p, str) or not p.strip() for p in patterns):
        raise ValueError(f"{argument}={list(patterns)!r} must name at least one layer pattern (globs or re:<regex>)")
    compile_layer_patterns(list(patterns))
    return patterns


def layers_id(layers: Sequence[str]) -> str:
    """The id of a layer set in names and tags: the first 8 hex digits of the sha256 of its patterns."""
    return hashlib.sha256("\n".join(layers).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class EditRequest:
    """One edit: a method, the layer patterns it edits and exactly one strength.

    ``energy`` / ``keep_fraction`` in (0, 1] for ``kfac``, ``kfac-separable`` and ``svd``; ``ratio`` in (0, 1)
    (the fraction of each layer's weights pruned) for ``bsn``; ``steps`` (a positive integer: unlearning steps) for
    the gradient unlearning methods (:data:`~memcurve.editing.unlearning.UNLEARNING_METHODS`).
    """

    method: str
    layers: tuple[str, ...] = field(default=())
    energy: float | None = None
    keep_fraction: float | None = None
    ratio: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        check_choice("method", self.method, EDIT_METHODS)
        object.__setattr__(self, "layers", layer_patterns(self.layers))
        if self.method in UNLEARNING_METHODS:
            others = {"energy": self.energy, "keep_fraction": self.keep_fraction, "ratio": self.ratio}
            if self.steps is None or any(value is not None for value in others.values()):
                given = ", ".join(f"{kind}={value!r}" for kind, value in {**others, "steps": self.steps}.items())
                raise ValueError(
                    f"method={self.method!r} takes steps (the number of unlearning steps), not energy, keep_fraction "
                    f"or ratio; got {given}"
                )
            check_positive_int("steps", self.steps)
            return
        if self.steps is not None:
            raise ValueError(
                f"steps={self.steps!r} is the strength of the gradient unlearning methods {UNLEARNING_METHODS}; "
                f"{self.method} takes {'ratio' if self.method == 'bsn' else 'energy or keep_fraction'}"
            )
        if self.method == "bsn":
            if self.energy is not None or self.keep_fraction is not None or self.ratio is None:
                raise ValueError(
                    f"method='bsn' takes ratio (the fraction of each layer's weights to prune), not energy or "
                    f"keep_fraction; got energy={self.energy!r}, keep_fraction={self.keep_fraction!r}, "
                    f"ratio={self.ratio!r}"
                )
            object.__setattr__(self, "ratio", check_ratio(self.ratio))
            return
        if self.ratio is not None:
            raise ValueError(
                f"ratio={self.ratio!r} is BalancedSubnet's (method='bsn'); {self.method} takes energy or keep_fraction"
            )
        kind, value = check_strength(self.energy, self.keep_fraction)
        object.__setattr__(self, kind, value)

    @property
    def strength(self) -> tuple[str, float]:
        """``("energy" | "keep_fraction" | "ratio" | "steps", value)``."""
        for kind in STRENGTH_KINDS:
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        raise AssertionError("validated in __post_init__")

    @property
    def layers_id(self) -> str:
        return layers_id(self.layers)

    @property
    def tag(self) -> str:
        """Lossless, unique file-name tag, e.g. ``kfac-e0.6-L1a2b3c4d``, ``bsn-r0.0015-L…``, ``npo-s20-L…``."""
        kind, value = self.strength
        return f"{self.method}-{_LETTER[kind]}{value!r}-L{self.layers_id}"

    @property
    def setting(self) -> str:
        """Human-readable strength, e.g. ``energy 0.6``."""
        kind, value = self.strength
        return f"{kind.replace('_', ' ')} {value!r}"

    @property
    def step(self) -> int:
        """TensorBoard step: the strength in parts per million (a step count too, as the reports do)."""
        return round(self.strength[1] * 1_000_000)


def requests_for(
    method: str,
    layers: str | Sequence[str],
    *,
    energy: float | Sequence[float] | None = None,
    keep_fraction: float | Sequence[float] | None = None,
    ratio: float | Sequence[float] | None = None,
    steps: int | Sequence[int] | None = None,
) -> list[EditRequest]:
    """One request per strength value (scalars or lists); at least one value must be given."""

    def values(value: float | Sequence[float] | None) -> list[float]:
        if value is None:
            return []
        return [value] if isinstance(value, numbers.Real) else list(value)

    requests = [EditRequest(method, layer_patterns(layers), energy=v) for v in values(energy)]
    requests += [EditRequest(method, layer_patterns(layers), keep_fraction=v) for v in values(keep_fraction)]
    requests += [EditRequest(method, layer_patterns(layers), ratio=v) for v in values(ratio)]
    requests += [EditRequest(method, layer_patterns(layers), steps=v) for v in values(steps)]
    if not requests:
        wanted = " or ".join(strength_kinds(method))
        raise ValueError(f"method={method!r} needs at least one {wanted} value; got none")
    tags = [r.tag for r in requests]
    repeated = sorted({t for t in tags if tags.count(t) > 1})
    if repeated:
        raise ValueError(f"the same edit is requested twice: {repeated}")
    return requests
