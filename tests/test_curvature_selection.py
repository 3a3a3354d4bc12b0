"""Pair selection by κ = μλ against a brute-force sort of all pairs, including ties and zeros."""

from __future__ import annotations

import math
import time

import pytest
import torch

from memcurve.curvature import (
    count_pairs_above,
    energy_fraction,
    kappa,
    pair_mask,
    threshold_for_energy,
    threshold_for_keep_fraction,
)

SPEED_LIMIT_S = 1.0  # 4096 x 11008 spectra (an OLMo-7B MLP): the brief asks for well under a second
ENERGIES = [0.01, 0.1, 0.25, 0.5, 0.6, 0.8, 0.9, 0.95, 0.99, 0.999]
FRACTIONS = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0]


def brute_energy(mu, lam, energy):
    k = kappa(mu, lam).reshape(-1)
    s = torch.sort(k, descending=True).values
    first = int(torch.nonzero(s.cumsum(0) >= energy * float(k.sum()))[0])
    t = float(s[first])
    return t, int((k >= t).sum())


def brute_fraction(mu, lam, fraction):
    k = kappa(mu, lam).reshape(-1)
    n = math.ceil(fraction * k.numel() - 1e-9)
    t = float(torch.sort(k, descending=True).values[n - 1])
    return t, int((k >= t).sum())


def spectra(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "continuous":
        return (
            torch.rand(23, generator=g, dtype=torch.float64) ** 4,
            torch.rand(37, generator=g, dtype=torch.float64) ** 4,
        )
    # small integers: many ties between and within rows, zeros, and exact float64 sums at group boundaries
    mu = torch.randint(0, 4, (9,), generator=g).double()
    lam = torch.randint(0, 5, (13,), generator=g).double()
    mu[0], lam[0] = 3, 4  # non-zero total
    return mu, lam


@pytest.mark.parametrize("kind", ["continuous", "integer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_energy_threshold_equals_brute_force(kind, seed):
    mu, lam = spectra(kind, seed)
    for energy in ENERGIES + ([1.0] if kind == "integer" else []):
        want = brute_energy(mu, lam, energy)
        got = threshold_for_energy(mu, lam, energy)
        assert got == want, (energy, got, want)
        assert count_pairs_above(mu, lam, got[0]) == got[1]
        assert torch.equal(pair_mask(mu, lam, got[0]), kappa(mu, lam) >= want[0])
        assert energy_fraction(mu, lam, got[0]) >= energy * (1 - 1e-12)


@pytest.mark.parametrize("kind", ["continuous", "integer"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_fraction_threshold_equals_brute_force(kind, seed):
    mu, lam = spectra(kind, seed)
    for fraction in FRACTIONS:
        assert threshold_for_keep_fraction(mu, lam, fraction) == brute_fraction(mu, lam, fraction), fraction


def test_ties_are_kept_together_and_order_does_not_matter():
    mu = torch.tensor([2.0, 1.0, 1.0, 0.0])
    lam = torch.tensor([1.0, 1.0, 0.5])
    # κ sorted: 2, 2, 1, 1, 1, 1, 1, 0.5, 0.5, 0, 0, 0 — energy 10 in total
    assert threshold_for_keep_fraction(mu, lam, 3 / 12) == (1.0, 7)  # the 3rd pair ties with 4 more
    assert threshold_for_energy(mu, lam, 0.4) == (2.0, 2)  # exactly 4 of 10
    assert threshold_for_energy(mu, lam, 1.0) == (0.5, 9)  # zero pairs carry no energy
    assert threshold_for_keep_fraction(mu, lam, 1.0) == (0.0, 12)
    perm_mu, perm_lam = torch.tensor([2, 0, 3, 1]), torch.tensor([2, 0, 1])
    t, _ = threshold_for_energy(mu[perm_mu], lam[perm_lam], 0.7)
    assert t == threshold_for_energy(mu, lam, 0.7)[0]
    assert torch.equal(pair_mask(mu[perm_mu], lam[perm_lam], t), pair_mask(mu, lam, t)[perm_mu][:, perm_lam])


def test_edges_and_errors():
    mu, lam = spectra("continuous", 0)
    assert threshold_for_energy(mu, lam, 0.0) == (math.inf, 0)
    assert threshold_for_keep_fraction(mu, lam, 0.0) == (math.inf, 0)
    assert not pair_mask(mu, lam, math.inf).any()
    with pytest.raises(ValueError, match=r"energy=1.5 must be in \[0, 1\]"):
        threshold_for_energy(mu, lam, 1.5)
    with pytest.raises(ValueError, match=r"fraction=-0.1 must be in \[0, 1\]"):
        threshold_for_keep_fraction(mu, lam, -0.1)
    with pytest.raises(ValueError, match="mu has negative values"):
        threshold_for_energy(-mu, lam, 0.5)
    with pytest.raises(ValueError, match="total energy Σμ·Σλ is zero"):
        threshold_for_energy(torch.zeros(3), lam, 0.5)


def test_large_spectra_are_fast():
    g = torch.Generator().manual_seed(0)
    mu = torch.sort(torch.rand(4096, generator=g, dtype=torch.float64) ** 8, descending=True).values
    lam = torch.sort(torch.rand(11008, generator=g, dtype=torch.float64) ** 8, descending=True).values
    start = time.perf_counter()
    t, kept = threshold_for_energy(mu, lam, 0.9)
    elapsed_energy = time.perf_counter() - start
    start = time.perf_counter()
    t_frac, kept_frac = threshold_for_keep_fraction(mu, lam, 0.01)
    elapsed_fraction = time.perf_counter() - start
    assert elapsed_energy < SPEED_LIMIT_S and elapsed_fraction < SPEED_LIMIT_S, (elapsed_energy, elapsed_fraction)
    # the threshold is tight: one ulp above it the kept energy (count) falls short
    assert energy_fraction(mu, lam, t) >= 0.9 > energy_fraction(mu, lam, math.nextafter(t, math.inf))
    assert count_pairs_above(mu, lam, t) == kept
    assert kept_frac >= math.ceil(0.01 * 4096 * 11008) > count_pairs_above(mu, lam, math.nextafter(t_frac, math.inf))
