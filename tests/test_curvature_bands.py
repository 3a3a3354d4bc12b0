"""Curvature bands: exact band means against a brute-force loop over every pair, counts, ties, invariances."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from memcurve.curvature import LayerEigen, LayerFactors, eigendecompose_layer, threshold_for_keep_fraction
from memcurve.curvature.bands import (
    STATISTICS,
    BandBasis,
    band_labels,
    band_means,
    band_rank_bounds,
    check_band_edges,
    kfac_band_counts,
    kfac_band_thresholds,
    sample_band_pairs,
    sampled_band_means,
    svd_band_counts,
)

EDGES = (0.1, 0.25, 0.5)
EXACT = {"rtol": 1e-12, "atol": 1e-14}  # float64, same sums in another order


def random_layer(m: int, n: int, seed: int, samples: int = 200) -> LayerEigen:
    """Eigendecomposition of random covariance factors A [n, n] and G [m, m]."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(samples, n, generator=gen, dtype=torch.float64) * torch.rand(n, generator=gen, dtype=torch.float64)
    g = torch.randn(samples, m, generator=gen, dtype=torch.float64) * torch.rand(m, generator=gen, dtype=torch.float64)
    return eigendecompose_layer(LayerFactors(a.T @ a / samples, g.T @ g / samples, samples, samples))


def brute_force_bands(mu: torch.Tensor, lam: torch.Tensor, edges) -> torch.Tensor:
    """Band index [m, n] of every pair: sort all κ, thresholds t_b = k_b-th largest, band = #{b : κ < t_b}."""
    kappa = torch.outer(mu, lam)
    ordered = kappa.flatten().sort(descending=True).values
    total = kappa.numel()
    thresholds = []
    for e in edges:
        k = math.ceil(e * total) if abs(e * total - round(e * total)) >= 1e-6 else round(e * total)
        thresholds.append(ordered[k - 1] if k > 0 else math.inf)
    return sum((kappa < t).long() for t in thresholds)


def brute_force_means(x: torch.Tensor, layer: LayerEigen, edges, statistic: str) -> torch.Tensor:
    """Mean of ||u_i v_jᵀ x|| (or its square) over the pairs of each band, one explicit outer product per pair."""
    band = brute_force_bands(layer.eigvals_G, layer.eigvals_A, edges)
    sums = torch.zeros(len(edges) + 1, dtype=torch.float64)
    m, n = band.shape
    for i in range(m):
        for j in range(n):
            z = torch.outer(layer.eigvecs_G[:, i], layer.eigvecs_A[:, j])  # unvec of v_j ⊗ u_i
            norm = torch.linalg.vector_norm(z @ x)
            sums[band[i, j]] += norm if statistic == "norm" else norm**2
    sizes = torch.bincount(band.flatten(), minlength=len(edges) + 1).to(torch.float64)
    return sums / sizes


@pytest.mark.parametrize(("m", "n", "seed"), [(7, 5, 0), (4, 9, 1), (12, 12, 2)])
@pytest.mark.parametrize("statistic", STATISTICS)
def test_exact_band_means_equal_a_loop_over_all_pairs(m, n, seed, statistic):
    layer = random_layer(m, n, seed)
    bands = BandBasis.from_kfac(layer, EDGES)
    xs = torch.randn(3, n, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    got = bands.means(xs, statistic)
    assert got.shape == (3, 4)
    for x, row in zip(xs, got):
        torch.testing.assert_close(row, brute_force_means(x, layer, EDGES, statistic), **EXACT)
    both = bands.means(xs[:, None], STATISTICS)  # one projection for both statistics, any leading dims
    assert both.shape == (3, 1, 2, 4)
    torch.testing.assert_close(both[:, 0, STATISTICS.index(statistic)], got, **EXACT)


@pytest.mark.parametrize(("m", "n"), [(1, 1), (3, 50), (64, 17), (300, 1200)])
def test_counts_sum_to_the_pairs_and_match_the_ranks(m, n):
    gen = torch.Generator().manual_seed(m + n)
    mu, lam = (torch.rand(k, generator=gen, dtype=torch.float64) ** 4 for k in (m, n))  # spread like spectra
    counts = kfac_band_counts(mu, lam, EDGES)
    assert counts.shape == (4, n) and counts.dtype == torch.int64 and (counts >= 0).all()
    assert (counts.sum(dim=0) == m).all()  # every A-eigenvector carries all m of its pairs
    assert int(counts.sum()) == m * n
    bounds = band_rank_bounds(EDGES, m * n)
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    assert counts.sum(dim=1).tolist() == sizes  # continuous spectra: no ties, the bands are exact rank ranges
    if m * n <= 5000:
        band = brute_force_bands(mu, lam, EDGES)
        reference = torch.stack([(band == b).sum(dim=0) for b in range(4)])
        assert torch.equal(counts, reference)


def test_top_band_is_what_a_keep_fraction_edit_keeps():
    layer = random_layer(20, 30, seed=3)
    for k, edge in enumerate(EDGES):
        t, kept = threshold_for_keep_fraction(layer.eigvals_G, layer.eigvals_A, edge)
        assert float(kfac_band_thresholds(layer.eigvals_G, layer.eigvals_A, EDGES)[k]) == t
        assert int(kfac_band_counts(layer.eigvals_G, layer.eigvals_A, EDGES)[: k + 1].sum()) == kept


@pytest.mark.parametrize("scale", [1e-6, 0.37, 8.0, 1e5])
@pytest.mark.parametrize("factor", ["A", "G"])
def test_bands_are_invariant_to_scaling_a_factor(scale, factor):
    layer = random_layer(9, 13, seed=4)
    scaled = LayerEigen(
        layer.eigvals_A * (scale if factor == "A" else 1.0),
        layer.eigvecs_A,
        layer.eigvals_G * (scale if factor == "G" else 1.0),
        layer.eigvecs_G,
        layer.count_A,
        layer.count_G,
    )
    counts = kfac_band_counts(layer.eigvals_G, layer.eigvals_A, EDGES)
    assert torch.equal(kfac_band_counts(scaled.eigvals_G, scaled.eigvals_A, EDGES), counts)
    x = torch.randn(5, 13, dtype=torch.float64)
    torch.testing.assert_close(BandBasis.from_kfac(scaled).means(x), BandBasis.from_kfac(layer).means(x), **EXACT)


def test_counts_follow_the_given_order_of_the_eigenvalues():
    layer = random_layer(6, 11, seed=5)
    perm_a, perm_g = torch.randperm(11), torch.randperm(6)
    shuffled = LayerEigen(
        layer.eigvals_A[perm_a], layer.eigvecs_A[:, perm_a], layer.eigvals_G[perm_g], layer.eigvecs_G[:, perm_g], 1, 1
    )
    counts = kfac_band_counts(layer.eigvals_G, layer.eigvals_A, EDGES)
    assert torch.equal(kfac_band_counts(shuffled.eigvals_G, shuffled.eigvals_A, EDGES), counts[:, perm_a])
    x = torch.randn(4, 11, dtype=torch.float64)
    torch.testing.assert_close(BandBasis.from_kfac(shuffled).means(x), BandBasis.from_kfac(layer).means(x), **EXACT)


def test_ties_at_a_boundary_go_to_the_higher_band():
    # κ = μλ: 2·{3, 1, 1, 1} and 1·{3, 1, 1, 1} -> values 6, 3, 2, 2, 2, 1, 1, 1 (8 pairs).
    mu = torch.tensor([2.0, 1.0], dtype=torch.float64)
    lam = torch.tensor([3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    # edges 0.25 / 0.5 -> k = 2, 4: t = 3 and 2; the three pairs at κ = 2 all join the 25-50% band
    counts = kfac_band_counts(mu, lam, (0.25, 0.5))
    assert counts.sum(dim=1).tolist() == [2, 3, 3]
    assert counts.tolist() == [[2, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1]]
    # a tie spanning a band: 0.25 / 0.3 -> k = 2, ⌈2.4⌉ = 3: t = 3 and 2, band 25-30% holds the whole tie
    assert kfac_band_counts(mu, lam, (0.25, 0.3)).sum(dim=1).tolist() == [2, 3, 3]
    # rank-deficient factors: 6 of the 8 pairs have κ = 0; the bottom band is empty and its mean NaN
    zeros = kfac_band_counts(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 1.0, 0.0, 0.0]), (0.1, 0.5))
    assert zeros.sum(dim=1).tolist() == [1, 7, 0]
    means = band_means(torch.ones(1, 4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), zeros)
    assert torch.isnan(means[0, 2]) and torch.isfinite(means[0, :2]).all()
    brute = brute_force_bands(mu, lam, (0.25, 0.5))
    assert torch.equal(torch.stack([(brute == b).sum(dim=0) for b in range(3)]), counts)


def test_sampled_means_agree_with_the_exact_ones():
    layer = random_layer(40, 30, seed=6)
    xs = torch.randn(64, 30, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    exact = BandBasis.from_kfac(layer).means(xs)
    samples = 4000
    pairs = sample_band_pairs(
        layer.eigvals_G, layer.eigvals_A, EDGES, samples, generator=torch.Generator().manual_seed(8)
    )
    band = brute_force_bands(layer.eigvals_G, layer.eigvals_A, EDGES)
    for b, (i, j) in enumerate(pairs):
        assert len(i) == len(j) == samples and (band[i, j] == b).all()  # every draw lies in its band
    sampled = sampled_band_means(xs, layer.eigvecs_A, layer.eigvecs_G, pairs)
    # per band, the sampled mean over the inputs is within 5 standard errors of the exact one
    activation = (xs @ layer.eigvecs_A).abs()
    for b in range(4):
        spread = activation.std() / math.sqrt(samples)
        assert abs(float(sampled[:, b].mean() - exact[:, b].mean())) < 5 * float(spread)
    energy = sampled_band_means(xs, layer.eigvecs_A, layer.eigvecs_G, pairs, "energy")
    torch.testing.assert_close(energy.mean(), BandBasis.from_kfac(layer).means(xs, "energy").mean(), rtol=0.05, atol=0)


def test_svd_bands_rank_the_singular_values():
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    bands = BandBasis.from_weight(weight, EDGES)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    # 6 singular values: k = ⌈0.6⌉, ⌈1.5⌉, 3 = 1, 2, 3 -> one direction per band, then three
    assert bands.pairs_per_band.tolist() == [1, 1, 1, 3]
    assert torch.equal(bands.counts, svd_band_counts(s, EDGES))
    x = torch.randn(10, generator=gen, dtype=torch.float64)
    reference = torch.stack(
        [torch.linalg.vector_norm(torch.outer(u[:, k], vh[k]) @ x) for k in range(6)]
    )  # ||u_k v_kᵀ x||, singular values descending
    expected = torch.stack([reference[0], reference[1], reference[2], reference[3:].mean()])
    torch.testing.assert_close(bands.means(x), expected, **EXACT)
    # ties by value: equal singular values share a band
    assert svd_band_counts(torch.tensor([2.0, 1.0, 1.0, 0.5]), (0.5,)).tolist() == [[1, 1, 1, 0], [0, 0, 0, 1]]


def test_band_labels_and_rank_bounds():
    assert band_labels(EDGES) == ("0-10%", "10-25%", "25-50%", "50-100%")
    assert band_labels([0.125]) == ("0-12.5%", "12.5-100%")
    assert band_rank_bounds(EDGES, 100) == [0, 10, 25, 50, 100]
    assert band_rank_bounds(EDGES, 7) == [0, 1, 2, 4, 7]  # ⌈0.7⌉, ⌈1.75⌉, ⌈3.5⌉


@pytest.mark.parametrize(
    ("edges", "error", "message"),
    [
        ([], ValueError, r"bands=\[\] is empty"),
        ([0.5, 0.25], ValueError, r"strictly increasing"),
        ([0.1, 0.1], ValueError, r"strictly increasing"),
        ([0.0, 0.5], ValueError, r"strictly between 0 and 1"),
        ([0.5, 1.0], ValueError, r"strictly between 0 and 1"),
        ([float("nan")], ValueError, r"strictly between 0 and 1"),
        (["0.1"], ValueError, r"strictly between 0 and 1"),
        (0.1, TypeError, r"must be a list of rank fractions"),
    ],
)
def test_bad_band_edges_are_refused(edges, error, message):
    with pytest.raises(error, match=message):
        check_band_edges(edges)


def test_bad_arguments_of_the_functions():
    layer = random_layer(3, 4, seed=10)
    bands = BandBasis.from_kfac(layer)
    with pytest.raises(ValueError, match=r"statistic='l1' is not supported"):
        bands.means(torch.zeros(4, dtype=torch.float64), "l1")
    with pytest.raises(ValueError, match=r"inputs have 5 features, the basis expects 4"):
        bands.means(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"negative values"):
        kfac_band_counts(torch.tensor([1.0, -1.0]), torch.ones(3))
    with pytest.raises(ValueError, match=r"samples_per_band=0 must be a positive integer"):
        sample_band_pairs(layer.eigvals_G, layer.eigvals_A, EDGES, 0)
