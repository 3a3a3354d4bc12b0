"""Ranking and selecting Kronecker eigenpairs by ``κ_ij = μ_i λ_j`` without materialising all pairs.

``μ`` are the eigenvalues of ``G`` (rows of the pair mask, output side) and ``λ`` those of ``A`` (columns,
input side), so the mask ``M[i, j]`` lines up with ``C = U_Gᵀ W U_A``. ``κ`` is the float64 product
``μ_i * λ_j``, computed exactly as ``torch.outer`` does, and every comparison below uses that same product.

Selection rules (a pair is kept iff ``κ_ij ≥ threshold``):

* energy: ``threshold_for_energy`` returns the LARGEST threshold ``t`` (always one of the ``κ`` values)
  with ``Σ_{κ ≥ t} κ ≥ energy · Σ κ`` — the pairs sorted by ``κ`` descending are taken until the kept
  energy reaches the fraction. ``energy = 0`` keeps nothing (``t = inf``); ``energy = 1`` keeps every pair
  with ``κ > 0`` (zero-curvature pairs carry no energy and are dropped).
* keep fraction: ``threshold_for_keep_fraction`` returns the ``k``-th largest ``κ`` with ``k =
  ⌈fraction · m · n⌉`` (``fraction · m · n`` within 1e-6 of an integer is rounded first, so 0.01 of 100
  pairs is 1 pair); ``k = 0`` keeps nothing.

Ties: the mask depends only on values, never on index order — all pairs equal to the threshold are kept
together, so ``num_kept`` can exceed the minimal count (energy) or ``k`` (keep fraction) when ``κ`` has
ties at the boundary. That makes the result deterministic and independent of how eigenpairs are ordered.

Algorithm: sort ``λ`` once and take suffix sums. For a threshold ``t`` the kept ``λ`` of row ``i`` form a
suffix, found by ``searchsorted(λ, t / μ_i)`` and then corrected group by group until it agrees with the
exact float64 products (division rounds). Counts and energies are then O(m log n). The threshold is found
by bisection on the bit pattern of non-negative float64 values (order preserving), at most 64 steps, so a
4096 x 11008 spectrum takes a few milliseconds and the full ``κ`` matrix is never built.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
from torch import Tensor

_MAX_CORRECTIONS = 64
_MASK_CHUNK_ELEMENTS = 1 << 24


def kappa(mu: Tensor, lam: Tensor) -> Tensor:
    """The full ``[m, n]`` float64 matrix ``κ_ij = μ_i λ_j`` (only for small layers, tests and plots)."""
    return torch.outer(mu.to(torch.float64), lam.to(torch.float64))


def _spectrum(values: Tensor, name: str) -> np.ndarray:
    x = torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1).numpy()
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains inf or nan")
    if (x < 0).any():
        raise ValueError(f"{name} has negative values (min {x.min():.3e}); clamp eigenvalues to 0 first")
    return np.sort(x)


def _to_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _from_bits(i: int) -> float:
    return struct.unpack("<d", struct.pack("<q", i))[0]


class _Pairs:
    """Sorted spectra with the suffix sums needed to count pairs and energy above a threshold.

    NumPy on the CPU: the arrays are 1-D and small, and torch's intra-op thread pool costs more than the
    work here (tens of ms per call on a loaded 2-core machine, against well under 1 ms).
    """

    def __init__(self, mu: Tensor, lam: Tensor) -> None:
        self.mu = _spectrum(mu, "mu")
        self.lam = _spectrum(lam, "lam")
        self.m, self.n = self.mu.size, self.lam.size
        self.suffix = np.append(np.cumsum(self.lam[::-1])[::-1], 0.0)  # suffix[k] = Σ_{j ≥ k} λ_j
        self.total = float(self.mu.sum() * self.lam.sum())
        self.kappa_max = float(self.mu[-1] * self.lam[-1])
        if not math.isfinite(self.kappa_max) or not math.isfinite(self.total):
            raise ValueError("kappa overflows float64; rescale the spectra")

    def boundary(self, t: float) -> np.ndarray:
        """Per row ``i``, the number of ``λ_j`` with ``μ_i λ_j < t`` (the kept ones are the suffix after it)."""
        mu, lam, n = self.mu, self.lam, self.n
        if t <= 0:
            return np.zeros(self.m, dtype=np.int64)
        with np.errstate(divide="ignore"):
            idx = np.searchsorted(lam, t / mu, side="left")  # μ = 0 gives inf: nothing kept, as 0 < t
        for _ in range(_MAX_CORRECTIONS):
            below = np.maximum(idx - 1, 0)
            at = np.minimum(idx, n - 1)
            include = (idx > 0) & (mu * lam[below] >= t)  # the group under the guess also reaches t
            exclude = (idx < n) & (mu * lam[at] < t)  # the group at the guess falls short of t
            if not (include.any() or exclude.any()):
                return idx
            idx = np.where(include, np.searchsorted(lam, lam[below], side="left"), idx)
            idx = np.where(exclude, np.searchsorted(lam, lam[at], side="right"), idx)
        raise RuntimeError(f"pair count did not converge at threshold {t!r}")  # unreachable for finite input

    def count(self, t: float) -> int:
        return int((self.n - self.boundary(t)).sum())

    def energy(self, t: float) -> float:
        return float((self.mu * self.suffix[self.boundary(t)]).sum())

    def largest_threshold(self, ok) -> float:
        """Largest float64 ``t`` with ``ok(t)``, given ``ok`` monotone, true at 0 and false above max κ."""
        lo, hi = 0, _to_bits(self.kappa_max) + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(_from_bits(mid)):
                lo = mid
            else:
                hi = mid
        return _from_bits(lo)


def count_pairs_above(mu: Tensor, lam: Tensor, threshold: float) -> int:
    """Number of pairs with ``μ_i λ_j ≥ threshold``."""
    return _Pairs(mu, lam).count(float(threshold))


def energy_fraction(mu: Tensor, lam: Tensor, threshold: float) -> float:
    """``Σ_{κ ≥ threshold} κ / Σ κ`` (``Σ κ = Σμ · Σλ``)."""
    pairs = _Pairs(mu, lam)
    if pairs.total == 0:
        raise ValueError("the total energy Σμ·Σλ is zero: the factors carry no curvature")
    return pairs.energy(float(threshold)) / pairs.total


def threshold_for_energy(mu: Tensor, lam: Tensor, energy: float) -> tuple[float, int]:
    """``(threshold, num_pairs_kept)``: keep the top pairs by ``κ`` until ``energy`` of ``Σ κ`` is reached."""
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy={energy!r} must be in [0, 1]")
    pairs = _Pairs(mu, lam)
    if pairs.total == 0:
        raise ValueError("the total energy Σμ·Σλ is zero: the factors carry no curvature")
    if energy == 0.0:
        return math.inf, 0
    if energy == 1.0:
        # exact rule: every positive pair (rounding in the energy sums must not drop the smallest ones)
        positive = pairs.count(5e-324)
        t = pairs.largest_threshold(lambda t: pairs.count(t) >= positive)
    else:
        target = energy * pairs.total
        t = pairs.largest_threshold(lambda t: pairs.energy(t) >= target)
    return t, pairs.count(t)


def _pairs_for_fraction(fraction: float, total: int) -> int:
    x = fraction * total
    k = round(x) if abs(x - round(x)) < 1e-6 else math.ceil(x)
    return int(min(max(k, 0), total))


def threshold_for_keep_fraction(mu: Tensor, lam: Tensor, fraction: float) -> tuple[float, int]:
    """``(threshold, num_pairs_kept)`` keeping the top ``⌈fraction · m · n⌉`` pairs by ``κ`` (ties kept together)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1]")
    pairs = _Pairs(mu, lam)
    k = _pairs_for_fraction(fraction, pairs.m * pairs.n)
    if k == 0:
        return math.inf, 0
    t = pairs.largest_threshold(lambda t: pairs.count(t) >= k)
    return t, pairs.count(t)


def pair_mask(mu: Tensor, lam: Tensor, threshold: float) -> Tensor:
    """Boolean ``[m, n]`` mask ``μ_i λ_j ≥ threshold`` in the given (not necessarily sorted) order."""
    mu64, lam64 = mu.to(torch.float64).reshape(-1), lam.to(torch.float64).reshape(-1)
    out = torch.empty(mu64.numel(), lam64.numel(), dtype=torch.bool, device=mu64.device)
    rows = max(1, _MASK_CHUNK_ELEMENTS // max(1, lam64.numel()))  # bounds the float64 temporary
    for start in range(0, mu64.numel(), rows):
        out[start : start + rows] = torch.outer(mu64[start : start + rows], lam64) >= threshold
    return out
