"""Eigendecomposition conventions: symmetrised, float64, clamped, descending, deterministic signs."""

from __future__ import annotations

import warnings

import pytest
import torch

from memcurve.curvature import LayerFactors, eigendecompose, symmetric_eigh

RECON_ATOL = 1e-12  # float64 reconstruction error relative to the largest eigenvalue
ORTHO_ATOL = 1e-12


def random_psd(n: int, seed: int = 0, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(n, rank or n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x @ x.T


def test_reconstruction_order_and_orthonormality():
    a = random_psd(7)
    vals, vecs = symmetric_eigh(a.float())  # float32 input still decomposes in float64
    assert vals.dtype == vecs.dtype == torch.float64
    assert torch.all(vals[:-1] >= vals[1:]) and torch.all(vals >= 0)
    scale = RECON_ATOL * float(vals[0])
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, a.float().double(), rtol=0, atol=scale)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(7, dtype=torch.float64), rtol=0, atol=ORTHO_ATOL)
    vals64, vecs64 = symmetric_eigh(a)
    torch.testing.assert_close(vecs64 @ torch.diag(vals64) @ vecs64.T, a, rtol=0, atol=RECON_ATOL * float(vals64[0]))


def test_asymmetric_input_is_symmetrised():
    a = random_psd(5)
    skew = torch.randn(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1e-3
    vals, vecs = symmetric_eigh(a + skew - skew.T)  # the skew part must be ignored
    want_vals, want_vecs = symmetric_eigh(a)
    torch.testing.assert_close(vals, want_vals, rtol=0, atol=RECON_ATOL * float(want_vals[0]))
    torch.testing.assert_close(vecs, want_vecs, rtol=0, atol=1e-9)


def test_tiny_negative_eigenvalues_are_clamped_silently_large_ones_warn():
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    rounding = q @ torch.diag(torch.tensor([2.0, 1.0, -1e-13], dtype=torch.float64)) @ q.T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vals, _ = symmetric_eigh(rounding)
    assert vals.tolist()[2] == 0.0
    vals, _ = symmetric_eigh(random_psd(6, rank=3))  # rank deficient: eigenvalues 3-5 are rounding noise
    assert torch.all(vals >= 0) and float(vals[3:].max()) < RECON_ATOL * float(vals[0])
    indefinite = q @ torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64)) @ q.T
    with pytest.warns(RuntimeWarning, match="negative beyond rounding"):
        vals, _ = symmetric_eigh(indefinite, "bad")
    assert vals.tolist()[2] == 0.0


def test_sign_convention_is_deterministic():
    a = random_psd(6)
    _, vecs = symmetric_eigh(a)
    _, flipped = symmetric_eigh(
        torch.diag(torch.tensor([1.0, -1, 1, -1, 1, -1], dtype=torch.float64))
        @ a
        @ torch.diag(torch.tensor([1.0, -1, 1, -1, 1, -1], dtype=torch.float64))
    )
    pivot = vecs.abs().argmax(0)
    assert torch.all(vecs[pivot, torch.arange(6)] > 0)
    pivot = flipped.abs().argmax(0)
    assert torch.all(flipped[pivot, torch.arange(6)] > 0)


def test_eigendecompose_layers():
    factors = {"fc": LayerFactors(random_psd(4).float(), random_psd(3, 1).float(), 10, 20)}
    eig = eigendecompose(factors)["fc"]
    assert eig.eigvals_A.shape == (4,) and eig.eigvecs_A.shape == (4, 4)
    assert eig.eigvals_G.shape == (3,) and eig.eigvecs_G.shape == (3, 3)
    assert (eig.count_A, eig.count_G) == (10, 20)


@pytest.mark.parametrize(
    ("matrix", "match"),
    [
        (torch.zeros(2, 3), r"expected a square matrix, got shape \(2, 3\)"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "contains inf or nan"),
    ],
)
def test_bad_input(matrix, match):
    with pytest.raises(ValueError, match=match):
        symmetric_eigh(matrix)
