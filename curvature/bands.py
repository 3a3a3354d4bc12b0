"""Curvature bands: how strongly inputs of a layer activate each percentile band of its K-FAC spectrum.

Section 3.1 / Figure 2 of the paper. The Fisher block of a layer ``W ∈ R^{m x n}`` is ``G ⊗ A`` with
eigenpairs ``(μ_i, u_i)`` of ``G`` (output side, ``m``) and ``(λ_j, v_j)`` of ``A`` (input side, ``n``):
the pair ``(i, j)`` has curvature ``κ_ij = μ_i λ_j`` and the rank-one direction ``Z_ij = u_i v_jᵀ``. For a
layer input ``x`` the activation through the pair is ``||Z_ij x|| = ||u_i|| |v_jᵀ x| = |v_jᵀ x|``.

Bands. The ``m·n`` pairs sorted by ``κ`` descending are split at rank fractions ``edges = (e_1 < … <
e_{B-1})`` (default ``(0.1, 0.25, 0.5)``: top 10%, 10–25%, 25–50%, bottom 50%). Band ``b`` holds the ranks
``[k_{b-1}, k_b)`` with ``k_0 = 0``, ``k_B = m·n`` and ``k_b = ⌈e_b · m·n⌉`` (a product within 1e-6 of an
integer is rounded first, so 0.1 of 100 pairs is 10) — the rounding of
:func:`~memcurve.curvature.selection.threshold_for_keep_fraction`.

Ties are settled by value, never by index order: ``t_b`` is the ``k_b``-th largest ``κ`` and a pair is in
band ``b`` iff ``t_{b-1} > κ ≥ t_b`` (``t_0 = +inf``, ``t_B = -inf``). Pairs tied with a boundary value
all go to the higher-curvature band, so a band can hold a few more (the one above) or fewer (the one below)
pairs than ``k_b - k_{b-1}``, and a band is empty when a tie spans it (typically many ``κ = 0`` pairs of a
rank-deficient factor; its mean is then NaN). Consequently the band "0–10%" is exactly the set of pairs
that a keep-fraction edit of 0.1 keeps. Everything depends on the values of ``μ`` and ``λ`` only; scaling
``A`` or ``G`` by a positive constant changes no band (up to float rounding of exact ties).

Exact band means. With ``z = V_Aᵀ x`` and ``c_b(j) = #{i : (i, j) ∈ band b}`` the mean activation of band
``b`` over its pairs is ``mean_b(x) = Σ_j c_b(j) |z_j| / Σ_j c_b(j)`` — O(n) per input once the counts are
known. For fixed ``j`` the pairs of a band are a contiguous run of ``μ`` in descending order, so ``c_b(j)``
is a difference of two counts ``#{i : μ_i λ_j ≥ t}``, each a searchsorted over the sorted ``μ`` (with the
exact float64 products of :mod:`memcurve.curvature.selection`); the thresholds ``t_b`` come from the same
O(n log m) counts by bisection (≤ 64 steps), so a 4096 x 11008 layer takes milliseconds and the ``κ``
matrix is never built. ``Σ_b c_b(j) = m`` for every ``j`` and ``Σ_b Σ_j c_b(j) = m·n``.

Statistics. ``"norm"`` averages ``|v_jᵀ x| = ||Z_ij x||`` over the band's pairs (the paper's ``||Zx||₂``;
the probe's figures show this one); ``"energy"`` averages the squared projections ``(v_jᵀ x)² = ||Z_ij
x||²``, i.e. the activation energy per pair. A check on both: over the data and positions the factors
were computed on, ``E[(v_jᵀ x)²] = λ_j`` (``A`` is the uncentred second moment), so the mean energy of band
``b`` there is ``Σ_j c_b(j) λ_j / Σ_j c_b(j)``; the groups are compared by how they deviate from it.

Sampled means (the paper's method, "we sample instead of computing each one") draw pairs uniformly with
replacement from each band (:func:`sample_band_pairs`) and average ``||u_i|| |v_jᵀ x|`` over them
(:func:`sampled_band_means`); they estimate the exact means and exist for comparison.

SVD baseline. ``W = U_W S V_Wᵀ``: the ``r = min(m, n)`` singular directions ``k`` (activation ``|v_kᵀ x|``)
are banded by the rank of ``s_k`` among the singular values, sorted descending, with the same rounding and
tie rules (each direction counts once: ``c_b(k) ∈ {0, 1}``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from memcurve.curvature.eigen import LayerEigen
from memcurve.curvature.selection import _Pairs, _pairs_for_fraction

__all__ = [
    "DEFAULT_BAND_EDGES",
    "STATISTICS",
    "BandBasis",
    "band_labels",
    "band_means",
    "band_rank_bounds",
    "check_band_edges",
    "kfac_band_counts",
    "kfac_band_thresholds",
    "sample_band_pairs",
    "sampled_band_means",
    "svd_band_counts",
]

DEFAULT_BAND_EDGES = (0.1, 0.25, 0.5)
STATISTICS = ("norm", "energy")


def check_band_edges(edges: Sequence[float], argument: str = "bands") -> tuple[float, ...]:
    """The band edges as a tuple of floats; raises unless they are strictly increasing numbers in (0, 1)."""
    if isinstance(edges, (str, bytes)) or not isinstance(edges, Sequence):
        raise TypeError(f"{argument}={edges!r} must be a list of rank fractions in (0, 1), e.g. [0.1, 0.25, 0.5]")
    if len(edges) == 0:
        raise ValueError(f"{argument}=[] is empty; give at least one rank fraction in (0, 1), e.g. [0.1, 0.25, 0.5]")
    for e in edges:
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0.0 < e < 1.0 or not math.isfinite(e):
            raise ValueError(f"{argument}={list(edges)!r}: every edge must be a number strictly between 0 and 1")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"{argument}={list(edges)!r}: the edges must be strictly increasing")
    return tuple(float(e) for e in edges)


def band_labels(edges: Sequence[float]) -> tuple[str, ...]:
    """Names of the bands by rank percentile, highest curvature first: ``("0-10%", "10-25%", …, "50-100%")``."""
    points = [0.0, *check_band_edges(edges), 1.0]
    return tuple(f"{round(lo * 100, 6):g}-{round(hi * 100, 6):g}%" for lo, hi in itertools.pairwise(points))


def band_rank_bounds(edges: Sequence[float], total: int) -> list[int]:
    """``[k_0 = 0, k_1, …, k_B = total]``: band ``b`` holds the ranks ``[k_{b-1}, k_b)`` (before tie handling)."""
    edges = check_band_edges(edges)
    return [0, *(_pairs_for_fraction(e, total) for e in edges), total]


def _thresholds(pairs: _Pairs, edges: tuple[float, ...]) -> list[float]:
    """``t_b`` = the ``k_b``-th largest ``κ`` (``inf`` for ``k_b = 0``) for the inner edges."""
    total = pairs.m * pairs.n
    out = []
    for k in band_rank_bounds(edges, total)[1:-1]:
        out.append(math.inf if k == 0 else pairs.largest_threshold(lambda t, k=k: pairs.count(t) >= k))
    return out


def kfac_band_thresholds(mu: Tensor, lam: Tensor, edges: Sequence[float] = DEFAULT_BAND_EDGES) -> Tensor:
    """float64 ``[B-1]``: ``t_b``, the ``k_b``-th largest ``κ = μ_i λ_j`` (non-increasing in ``b``)."""
    return torch.tensor(_thresholds(_Pairs(mu, lam), check_band_edges(edges)), dtype=torch.float64)


def _cumulative_counts(mu: Tensor, lam: Tensor, edges: tuple[float, ...]) -> np.ndarray:
    """int64 ``[B+1, n]``: row ``b`` is ``#{i : μ_i λ_j ≥ t_b}`` per ``λ_j`` in the given order (rows 0 and B: 0, m)."""
    lam_np = torch.as_tensor(lam).detach().to("cpu", torch.float64).reshape(-1).numpy()
    by_lam = _Pairs(lam, mu)  # rows are the sorted λ, so boundary() counts, per λ_j, the μ_i with μ_i λ_j < t
    m, n = by_lam.n, by_lam.m
    order = np.argsort(lam_np, kind="stable")  # by_lam.mu[k] == lam_np[order[k]]
    cumulative = np.zeros((len(edges) + 2, n), dtype=np.int64)
    for b, t in enumerate(_thresholds(by_lam, edges), start=1):
        cumulative[b, order] = m - by_lam.boundary(t)
    cumulative[-1] = m
    return cumulative


def kfac_band_counts(mu: Tensor, lam: Tensor, edges: Sequence[float] = DEFAULT_BAND_EDGES) -> Tensor:
    """int64 ``[B, n]``: ``c_b(j)``, the number of pairs ``(i, j)`` in band ``b``, in the given order of ``λ``.

    ``μ`` (the ``m`` eigenvalues of ``G``) and ``λ`` (the ``n`` of ``A``) may come in any order; the bands
    depend on their values only (see the module docstring for ranks and ties).
    """
    cumulative = _cumulative_counts(mu, lam, check_band_edges(edges))
    return torch.from_numpy(np.diff(cumulative, axis=0))


def svd_band_counts(singular_values: Tensor, edges: Sequence[float] = DEFAULT_BAND_EDGES) -> Tensor:
    """int64 ``[B, r]`` of 0/1: the band of each singular direction, by the rank of its singular value."""
    s = torch.as_tensor(singular_values).detach().to(torch.float64).reshape(-1)
    return kfac_band_counts(torch.ones(1, dtype=torch.float64), s, edges)  # κ = 1 · s_k is exactly s_k


def band_means(x: Tensor, basis: Tensor, counts: Tensor, statistic: str | Sequence[str] = "norm") -> Tensor:
    """Exact band means ``Σ_j c_b(j) a_j / Σ_j c_b(j)`` with ``a = |basisᵀ x|`` (``"norm"``) or its square.

    ``x`` is ``[..., n]``, ``basis`` ``[n, r]`` (directions as columns), ``counts`` ``[B, r]``; computed in the
    dtype of ``x`` and ``basis`` (which must agree). Returns ``[..., B]`` for one statistic, ``[..., S, B]``
    for a sequence of ``S`` statistics (one projection serves all). An empty band gives NaN.
    """
    names = [statistic] if isinstance(statistic, str) else list(statistic)
    for name in names:
        if name not in STATISTICS:
            raise ValueError(f"statistic={name!r} is not supported; choose one of {STATISTICS}")
    if x.shape[-1] != basis.shape[0]:
        raise ValueError(f"inputs have {x.shape[-1]} features, the basis expects {basis.shape[0]}")
    if counts.dim() != 2 or counts.shape[1] != basis.shape[1]:
        raise ValueError(f"counts of shape {tuple(counts.shape)} do not match a basis of {basis.shape[1]} directions")
    z = x @ basis
    w = counts.to(device=z.device, dtype=z.dtype)
    w = w / w.sum(dim=1, keepdim=True)  # 0/0 = NaN: an empty band has a NaN mean
    out = [(z.abs() if name == "norm" else z.square()) @ w.T for name in names]
    return out[0] if isinstance(statistic, str) else torch.stack(out, dim=-2)


@dataclass
class BandBasis:
    """The directions of a layer and how many pairs of each band each direction carries.

    ``basis`` ``[n, r]`` holds the input-side directions as columns (the eigenvectors of ``A`` for K-FAC,
    the right singular vectors of ``W`` for the SVD baseline), ``counts`` ``[B, r]`` the pairs per band and
    direction, ``labels`` the band names, highest curvature (or singular value) first.
    """

    basis: Tensor
    counts: Tensor
    labels: tuple[str, ...]

    @classmethod
    def from_kfac(cls, layer: LayerEigen, edges: Sequence[float] = DEFAULT_BAND_EDGES) -> BandBasis:
        """K-FAC bands of a layer's eigendecomposition (``c_b(j)`` over ``κ = μ_i λ_j``)."""
        counts = kfac_band_counts(layer.eigvals_G, layer.eigvals_A, edges)
        return cls(layer.eigvecs_A.to(torch.float64), counts, band_labels(edges))

    @classmethod
    def from_weight(cls, weight: Tensor, edges: Sequence[float] = DEFAULT_BAND_EDGES) -> BandBasis:
        """SVD-baseline bands of a weight ``[m, n]``: singular directions banded by singular value."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be a matrix [out, in], got shape {tuple(weight.shape)}")
        _, s, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
        return cls(vh.T.contiguous(), svd_band_counts(s, edges), band_labels(edges))

    @property
    def pairs_per_band(self) -> Tensor:
        """int64 ``[B]``: the number of pairs (or singular directions) in each band."""
        return self.counts.sum(dim=1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BandBasis:
        """A copy with the basis (and counts) on ``device`` and the basis in ``dtype``."""
        return BandBasis(self.basis.to(device=device, dtype=dtype), self.counts.to(device=device), self.labels)

    def means(self, x: Tensor, statistic: str | Sequence[str] = "norm") -> Tensor:
        """Exact band means of inputs ``x [..., n]``: ``[..., B]`` (``[..., S, B]`` for S statistics)."""
        return band_means(x.to(self.basis.dtype), self.basis, self.counts, statistic)


def sample_band_pairs(
    mu: Tensor,
    lam: Tensor,
    edges: Sequence[float] = DEFAULT_BAND_EDGES,
    samples_per_band: int = 1000,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Per band, ``(i, j)`` index tensors of ``samples_per_band`` pairs drawn uniformly with replacement.

    Indices refer to the given order of ``μ`` and ``λ``. Drawing ``j`` with probability ``c_b(j) / Σ c_b``
    and then one of the ``c_b(j)`` rows of band ``b`` in that column uniformly is a uniform draw over the
    band's pairs. An empty band gives empty tensors.
    """
    if not isinstance(samples_per_band, int) or isinstance(samples_per_band, bool) or samples_per_band < 1:
        raise ValueError(f"samples_per_band={samples_per_band!r} must be a positive integer")
    edges = check_band_edges(edges)
    cumulative = torch.from_numpy(_cumulative_counts(mu, lam, edges))
    mu64 = torch.as_tensor(mu).detach().to("cpu", torch.float64).reshape(-1)
    by_mu = torch.from_numpy(np.argsort(-mu64.numpy(), kind="stable"))  # rows by μ descending
    out = []
    for b in range(len(edges) + 1):
        start, counts = cumulative[b], cumulative[b + 1] - cumulative[b]
        if int(counts.sum()) == 0:
            out.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
            continue
        j = torch.multinomial(counts.to(torch.float64), samples_per_band, replacement=True, generator=generator)
        offset = (torch.rand(samples_per_band, generator=generator, dtype=torch.float64) * counts[j]).long()
        offset = torch.minimum(offset, counts[j] - 1)
        out.append((by_mu[start[j] + offset], j))
    return out


def sampled_band_means(
    x: Tensor, eigvecs_A: Tensor, eigvecs_G: Tensor, pairs: Sequence[tuple[Tensor, Tensor]], statistic: str = "norm"
) -> Tensor:
    """``[..., B]`` band means estimated from sampled pairs: the mean of ``||u_i v_jᵀ x||`` (or its square).

    ``||u_i v_jᵀ x|| = ||u_i|| · |v_jᵀ x|`` is evaluated as such (no unit-norm assumption). NaN for a band
    without samples.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic={statistic!r} is not supported; choose one of {STATISTICS}")
    dtype = torch.promote_types(x.dtype, eigvecs_A.dtype)
    x, V, U = x.to(dtype), eigvecs_A.to(dtype), eigvecs_G.to(dtype)
    means = []
    for i, j in pairs:
        if i.numel() == 0:
            means.append(torch.full(x.shape[:-1], math.nan, dtype=dtype, device=x.device))
            continue
        activation = (x @ V[:, j]).abs() * torch.linalg.vector_norm(U[:, i], dim=0)
        means.append((activation if statistic == "norm" else activation.square()).mean(dim=-1))
    return torch.stack(means, dim=-1)
