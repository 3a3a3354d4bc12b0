"""Eigendecomposition of K-FAC factors.

Conventions: each factor is symmetrised (``(M + Mᵀ)/2``; float32 accumulation leaves it slightly
asymmetric), decomposed with float64 ``torch.linalg.eigh``, negative eigenvalues are clamped to 0 (the
factors are PSD by construction; a warning is raised if a negative one is larger than
``NEGATIVE_WARN_RTOL`` times the largest eigenvalue, which means the input was not a covariance), and the
pairs are sorted by eigenvalue in descending order. Eigenvectors are the COLUMNS of the returned matrix,
with a deterministic sign: the entry of largest magnitude of each column is positive.

Naming follows the paper: ``A`` has eigenvalues ``λ`` (``eigvals_A``), ``G`` has ``μ`` (``eigvals_G``);
the Fisher block ``G ⊗ A`` has eigenvalues ``κ = μ_i λ_j`` with eigenvector ``u_i ⊗ v_j``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from memcurve.curvature.tracker import LayerFactors

NEGATIVE_WARN_RTOL = 1e-4


@dataclass
class LayerEigen:
    """Eigendecomposition of one layer's factors (float64, eigenvalues descending, eigenvectors as columns)."""

    eigvals_A: Tensor
    eigvecs_A: Tensor
    eigvals_G: Tensor
    eigvecs_G: Tensor
    count_A: int
    count_G: int


def symmetric_eigh(matrix: Tensor, name: str = "matrix") -> tuple[Tensor, Tensor]:
    """``(eigenvalues descending ≥ 0, eigenvectors as columns)`` of a PSD matrix, in float64."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name}: expected a square matrix, got shape {tuple(matrix.shape)}")
    m = matrix.to(torch.float64)
    if not torch.isfinite(m).all():
        raise ValueError(f"{name}: contains inf or nan")
    m = (m + m.T) / 2
    vals, vecs = torch.linalg.eigh(m)
    vals, vecs = vals.flip(0), vecs.flip(1)  # eigh sorts ascending
    if vals.numel() and vals[-1] < 0:
        scale = float(vals[0].clamp_min(0))
        if -float(vals[-1]) > NEGATIVE_WARN_RTOL * scale:
            warnings.warn(
                f"{name}: eigenvalue {float(vals[-1]):.3e} is negative beyond rounding (largest {scale:.3e}); "
                "is it really a covariance? Clamping to 0.",
                RuntimeWarning,
                stacklevel=2,
            )
        vals = vals.clamp_min(0)
    if vecs.numel():
        pivot = vecs.abs().argmax(dim=0)
        signs = torch.sign(vecs.gather(0, pivot[None]))[0]
        vecs = vecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    return vals, vecs


def eigendecompose_layer(factors: LayerFactors, name: str = "<layer>") -> LayerEigen:
    """Eigendecomposition of one layer's ``A`` and ``G``."""
    lam, v = symmetric_eigh(factors.A, f"layer {name!r} A")
    mu, u = symmetric_eigh(factors.G, f"layer {name!r} G")
    return LayerEigen(lam, v, mu, u, factors.count_A, factors.count_G)


def eigendecompose(factors: Mapping[str, LayerFactors]) -> dict[str, LayerEigen]:
    """``{name: LayerEigen}`` for ``{name: LayerFactors}`` (e.g. the output of ``KFACTracker.finalize``)."""
    return {name: eigendecompose_layer(f, name) for name, f in factors.items()}
