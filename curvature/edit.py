"""Weight edits that remove the low-curvature directions of linear layers (the paper's §4), as pure functions.

Setting. A layer ``s = W a (+ b)`` with ``W ∈ R^{m x n}`` (``m = out_features``, ``n = in_features``) has K-FAC
factors ``A = U_A diag(λ) U_Aᵀ`` (input side: ``LayerEigen.eigvals_A`` / ``eigvecs_A``) and ``G = U_G diag(μ)
U_Gᵀ`` (output side: ``eigvals_G`` / ``eigvecs_G``), eigenvectors as orthonormal COLUMNS (as
``eigen.eigendecompose`` returns them; orthonormality is assumed, not checked). The eigenvalues may come in any
order.

vec convention. Row-major, ``vec(W) = W.reshape(-1)``. Then ``vec(g aᵀ) = g ⊗ a``, the Fisher block of ``W`` is
``G ⊗ A``, and pair ``(i, j)`` is the direction ``u_i v_jᵀ`` (``vec = u_i ⊗ v_j``) with curvature ``κ_ij = μ_i
λ_j``. These directions are orthonormal for the Frobenius inner product and the coordinate of ``W`` along pair
``(i, j)`` is ``C_ij = u_iᵀ W v_j``, i.e. ``C = U_Gᵀ W U_A`` (``m x n``, aligned with ``selection.pair_mask``).

Methods (``EDIT_METHODS``), each with exactly one of ``energy`` or ``keep_fraction`` in ``(0, 1]``:

* ``kronecker`` (the paper's evaluated method, default): keep the pairs with the largest ``κ``;
  ``W' = U_G (C ⊙ M) U_Aᵀ`` with ``M = pair_mask(μ, λ, t)``. ``energy``: ``t`` from
  ``selection.threshold_for_energy`` — the top pairs by ``κ`` until ``energy · Σκ`` is reached (``Σκ = Σμ · Σλ``);
  ``keep_fraction``: ``t`` from ``threshold_for_keep_fraction`` — the top ``⌈keep_fraction · m · n⌉`` pairs.
* ``separable``: keep the top eigenvectors of ``G`` and of ``A`` separately, each by the same rule applied to one
  spectrum (``energy`` of ``Σμ`` resp. ``Σλ``, or ``⌈keep_fraction · m⌉`` resp. ``⌈keep_fraction · n⌉``
  eigenvectors); ``W' = P_G P_Gᵀ W P_A P_Aᵀ`` with ``P`` the kept eigenvector columns. The kept pairs are the
  product set, so they hold ``(Σ_kept μ / Σμ)(Σ_kept λ / Σλ)`` — about ``energy²`` — of ``Σκ``.
* ``svd`` (the data-free baseline): ``W = U diag(σ) Vᵀ`` (thin SVD, ``r = min(m, n)`` directions); keep the top
  singular directions, ``W' = U_k diag(σ_k) V_kᵀ``. ``energy`` is measured over ``σ²``: the smallest set of top
  directions whose ``Σσ²`` reaches ``energy · ‖W‖_F²`` (the fraction of the squared Frobenius norm kept);
  ``keep_fraction`` keeps ``⌈keep_fraction · r⌉`` directions (a rank fraction). No factors are needed.

Every edit is an orthogonal projection of ``W`` (of ``[W | b]``, see Bias) for the Frobenius inner product: it is
idempotent and ``0 ≤ ‖W' − W‖_F / ‖W‖_F ≤ 1``.

Selection rules and ties are those of ``curvature.selection`` (the one-spectrum rules of ``separable`` and ``svd``
call the same functions with the other spectrum ``[1]``): a direction is kept iff its score (``κ``, ``μ`` / ``λ``,
``σ²`` for svd energy, ``σ`` for svd keep fraction) is ``≥`` the threshold; all directions tied with the threshold
are kept together, so the count can exceed ``⌈keep_fraction · N⌉`` or the minimal energy count. This keeps
whole eigenspaces, which makes the edit independent of the basis ``eigh`` chose inside a degenerate eigenspace.
``energy = 1`` keeps every direction of positive score: zero-curvature pairs (e.g. an input that is always 0)
and zero singular values are removed; with positive spectra it is the identity. A ``keep_fraction`` so small
that ``keep_fraction · N`` rounds to 0 keeps nothing (``W' = 0``). An energy fraction of a spectrum that is all
zero is undefined and raises.

Bias. With factors collected under ``bias="exclude"`` (``A`` is ``n x n``) only ``W`` is edited and the bias is
left untouched. With ``bias="homogeneous"`` (``A`` is ``(n+1) x (n+1)``, the layer's ``homogeneous`` flag in the
factor file) the augmented matrix ``X = [W | b]`` is edited as a whole and the new bias is its last column; the
norms and ``relative_change`` are then those of ``X``. The convention is read from the shape of ``A`` (it is
unambiguous), and a ``homogeneous`` flag, when given, must agree with it. ``svd`` never touches the bias.

Weight layout. ``W`` is the ``out x in`` matrix. ``nn.Linear`` stores it so (layout ``"out_in"``); a transformers
``Conv1D`` (GPT-2) stores ``Wᵀ`` (layout ``"in_out"``). ``edit_layer`` / ``edit_state_dict`` take the layout
(``edit_state_dict`` reads it from a loaded factor file's per-layer metadata — it is never guessed from the shape,
which is ambiguous for square layers), edit the ``out x in`` matrix and return the new weight in the stored layout.

Precision. All maths in float64 on the weight's device (the CPU for MPS, which has no float64); the new weight
(and bias) are cast back to the original dtype and device. Inputs are never modified in place.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memcurve.curvature.eigen import LayerEigen
from memcurve.curvature.layers import WEIGHT_LAYOUTS, as_out_in, check_layout, from_out_in
from memcurve.curvature.selection import energy_fraction, pair_mask, threshold_for_energy, threshold_for_keep_fraction
from memcurve.curvature.storage import StoredFactors

EDIT_METHODS = ("kronecker", "separable", "svd")
_LISTED = 20  # names shown in "available" lists before eliding


@dataclass
class LayerEdit:
    """The outcome of editing one layer (``weight`` in the layout the layer stores it, see the module docstring).

    ``kept_pairs`` / ``total_pairs`` count eigen-pairs ``(i, j)`` (kronecker, separable: ``m · n`` in all) or
    singular directions (svd: ``min(m, n)``). ``threshold`` is the smallest kept score: the ``κ`` threshold
    (kronecker), ``min kept μ · min kept λ`` (separable; pairs outside the product set may have larger ``κ``),
    the smallest kept ``σ²`` (svd); ``inf`` when nothing is kept. ``energy_kept`` is the fraction of ``Σκ`` kept
    (of ``Σσ²`` for svd; ``nan`` if that total is 0). Norms are Frobenius norms of the edited matrix (``[W | b]``
    when ``homogeneous``), so they add up in squares across layers.
    """

    method: str
    weight: Tensor
    bias: Tensor | None  # the new bias when edited jointly (homogeneous), else None: the bias is untouched
    homogeneous: bool
    kept_pairs: int
    total_pairs: int
    threshold: float
    energy_kept: float
    change_norm: float  # ‖W' − W‖_F
    weight_norm: float  # ‖W‖_F
    kept_G: int | None = None  # separable: eigenvectors of G kept
    kept_A: int | None = None  # separable: eigenvectors of A kept

    @property
    def kept_fraction(self) -> float:
        """``kept_pairs / total_pairs``."""
        return self.kept_pairs / self.total_pairs

    @property
    def relative_change(self) -> float:
        """``‖W' − W‖_F / ‖W‖_F`` (0 for a zero matrix, which no edit changes)."""
        return self.change_norm / self.weight_norm if self.weight_norm > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable numbers (no tensors) for reports."""
        return {
            "method": self.method,
            "homogeneous": self.homogeneous,
            "kept_pairs": self.kept_pairs,
            "total_pairs": self.total_pairs,
            "kept_fraction": self.kept_fraction,
            "threshold": self.threshold,
            "energy_kept": self.energy_kept,
            "relative_change": self.relative_change,
            "change_norm": self.change_norm,
            "weight_norm": self.weight_norm,
            "kept_G": self.kept_G,
            "kept_A": self.kept_A,
        }


@dataclass
class _Projection:
    matrix: Tensor
    kept_pairs: int
    total_pairs: int
    threshold: float
    energy_kept: float
    kept_G: int | None = None
    kept_A: int | None = None


# -- validation ---------------------------------------------------------------------------------------------------
def _check_method(method: str) -> None:
    if method not in _PROJECTIONS:
        raise ValueError(f"method={method!r} is not supported; choose one of {EDIT_METHODS}")


def check_strength(energy: float | None, keep_fraction: float | None) -> tuple[str, float]:
    """``("energy" | "keep_fraction", value)`` after checking that exactly one is given and lies in (0, 1]."""
    if (energy is None) == (keep_fraction is None):
        raise ValueError(
            f"give exactly one of energy or keep_fraction; got energy={energy!r}, keep_fraction={keep_fraction!r}"
        )
    arg, value = ("energy", energy) if energy is not None else ("keep_fraction", keep_fraction)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg}={value!r} must be a real number in (0, 1]")
    if not 0.0 < float(value) <= 1.0:  # also rejects nan
        raise ValueError(f"{arg}={value!r} must be in (0, 1]")
    return arg, float(value)


def _listing(names: Sequence[str]) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_LISTED])
    return f"[{shown}{f', … ({len(names)} in all)' if len(names) > _LISTED else ''}]" if names else "none"


def _check_layer(
    name: str, weight: Tensor, bias: Tensor | None, eigen: LayerEigen | None, homogeneous: bool | None
) -> bool:
    """Validate shapes; returns whether ``[W | b]`` is edited jointly (homogeneous factors)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"layer {name!r}: the weight must be a 2-D tensor (out, in), got {shape}")
    if not weight.is_floating_point():
        raise TypeError(f"layer {name!r}: the weight has dtype {weight.dtype}, expected a floating point dtype")
    m, n = weight.shape
    if eigen is None:  # svd
        if homogeneous:
            raise ValueError(
                f"layer {name!r}: homogeneous=True needs K-FAC factors; the svd edit never touches the bias"
            )
        return False
    if not isinstance(eigen, LayerEigen):
        raise TypeError(
            f"layer {name!r}: expected a LayerEigen, got {type(eigen).__name__}; eigendecompose factors first "
            "(memcurve.curvature.eigendecompose)"
        )
    shapes = {key: tuple(getattr(eigen, key).shape) for key in ("eigvecs_G", "eigvals_G", "eigvecs_A", "eigvals_A")}
    if (shapes["eigvecs_G"], shapes["eigvals_G"]) != ((m, m), (m,)):
        raise ValueError(
            f"layer {name!r}: eigvecs_G / eigvals_G have shapes {shapes['eigvecs_G']} / {shapes['eigvals_G']}, the "
            f"weight of shape (out, in) = {(m, n)} needs {(m, m)} / {(m,)} (a transformers Conv1D stores its weight "
            "as (in, out): give its weight_layout 'in_out')"
        )
    allowed_a = {n: "exclude", n + 1: "homogeneous"}
    d_a = shapes["eigvals_A"][0] if len(shapes["eigvals_A"]) == 1 else -1
    if d_a not in allowed_a or shapes["eigvecs_A"] != (d_a, d_a):
        raise ValueError(
            f"layer {name!r}: eigvecs_A / eigvals_A have shapes {shapes['eigvecs_A']} / {shapes['eigvals_A']}, the "
            f"weight of shape (out, in) = {(m, n)} needs {(n, n)} / {(n,)} (bias='exclude') or "
            f"{(n + 1, n + 1)} / {(n + 1,)} (bias='homogeneous')"
        )
    joint = d_a == n + 1
    if homogeneous is not None and bool(homogeneous) != joint:
        raise ValueError(
            f"layer {name!r}: homogeneous={homogeneous!r} but its A factor is {d_a} x {d_a} for {n} inputs, "
            f"i.e. homogeneous={joint} (collected with bias={allowed_a[d_a]!r})"
        )
    if joint:
        if bias is None:
            raise ValueError(
                f"layer {name!r}: the factors have a homogeneous bias coordinate (A is {d_a} x {d_a}) but no bias "
                "was given"
            )
        if not isinstance(bias, Tensor) or tuple(bias.shape) != (m,):
            shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"layer {name!r}: the bias has shape {shape}, expected ({m},)")
    return joint


# -- the projections (float64 matrix in, float64 matrix out) -------------------------------------------------------
_UNIT = torch.ones(1, dtype=torch.float64)


def _select(values: Tensor, criterion: str, fraction: float, what: str) -> Tensor:
    """Boolean mask of the kept entries of one non-negative spectrum (the pair rules with the other spectrum [1])."""
    if criterion == "energy" and not (values != 0).any():
        raise ValueError(f"{what} are all zero: an energy fraction is undefined (use keep_fraction)")
    try:
        select = threshold_for_energy if criterion == "energy" else threshold_for_keep_fraction
        t, _ = select(values, _UNIT, fraction)
    except ValueError as exc:  # negative or non-finite values; the message says "mu"
        raise ValueError(f"{what}: {exc}") from exc
    return values >= t


def _spectra(eigen: LayerEigen, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    f64 = torch.float64
    return (
        eigen.eigvals_G.to(device, f64),
        eigen.eigvecs_G.to(device, f64),
        eigen.eigvals_A.to(device, f64),
        eigen.eigvecs_A.to(device, f64),
    )


def _project_kronecker(x: Tensor, eigen: LayerEigen | None, criterion: str, fraction: float) -> _Projection:
    mu, u_g, lam, u_a = _spectra(eigen, x.device)
    if criterion == "energy":
        for what, values in (("the eigenvalues μ of G", mu), ("the eigenvalues λ of A", lam)):
            if not (values != 0).any():
                raise ValueError(f"{what} are all zero: the factors carry no curvature (use keep_fraction)")
        t, kept = threshold_for_energy(mu, lam, fraction)
    else:
        t, kept = threshold_for_keep_fraction(mu, lam, fraction)
    mask = pair_mask(mu, lam, t)
    coefficients = u_g.T @ x @ u_a
    coefficients.mul_(mask)  # a fresh tensor: in place is safe
    total = float(mu.sum()) * float(lam.sum())
    energy = energy_fraction(mu, lam, t) if total > 0 else math.nan
    return _Projection(u_g @ coefficients @ u_a.T, kept, mask.numel(), t, energy)


def _project_separable(x: Tensor, eigen: LayerEigen | None, criterion: str, fraction: float) -> _Projection:
    mu, u_g, lam, u_a = _spectra(eigen, x.device)
    keep_g = _select(mu, criterion, fraction, "the eigenvalues μ of G")
    keep_a = _select(lam, criterion, fraction, "the eigenvalues λ of A")
    p_g, p_a = u_g[:, keep_g], u_a[:, keep_a]
    kept_g, kept_a = int(keep_g.sum()), int(keep_a.sum())
    kept = kept_g * kept_a
    threshold = float(mu[keep_g].min()) * float(lam[keep_a].min()) if kept else math.inf
    total = float(mu.sum()) * float(lam.sum())
    energy = float(mu[keep_g].sum()) * float(lam[keep_a].sum()) / total if total > 0 else math.nan
    matrix = p_g @ (p_g.T @ x @ p_a) @ p_a.T
    return _Projection(matrix, kept, mu.numel() * lam.numel(), threshold, energy, kept_g, kept_a)


def _project_svd(x: Tensor, eigen: LayerEigen | None, criterion: str, fraction: float) -> _Projection:
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    s2 = s * s
    if criterion == "energy":
        keep = _select(s2, criterion, fraction, "the singular values of the weight")
    else:
        keep = _select(s, criterion, fraction, "the singular values of the weight")
    kept = int(keep.sum())
    threshold = float(s2[keep].min()) if kept else math.inf
    total = float(s2.sum())
    energy = float(s2[keep].sum()) / total if total > 0 else math.nan
    return _Projection((u[:, keep] * s[keep]) @ vh[keep], kept, s.numel(), threshold, energy)


_PROJECTIONS: dict[str, Callable[[Tensor, LayerEigen | None, str, float], _Projection]] = {
    "kronecker": _project_kronecker,
    "separable": _project_separable,
    "svd": _project_svd,
}


# -- public API -------------------------------------------------------------------------------------------------------
def _edit(
    name: str,
    weight: Tensor,
    bias: Tensor | None,
    eigen: LayerEigen | None,
    method: str,
    criterion: tuple[str, float],
    joint: bool,
) -> LayerEdit:
    device = weight.device if weight.device.type != "mps" else torch.device("cpu")
    x = weight.detach().to(device, torch.float64)  # may alias a float64 weight: never modified in place below
    if joint:
        x = torch.cat([x, bias.detach().to(device, torch.float64)[:, None]], dim=1)
    try:
        result = _PROJECTIONS[method](x, eigen, *criterion)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from exc
    n = weight.shape[1]
    new_weight = result.matrix[:, :n].to(weight.device, weight.dtype).contiguous()
    new_bias = result.matrix[:, n].to(bias.device, bias.dtype).contiguous() if joint else None
    return LayerEdit(
        method=method,
        weight=new_weight,
        bias=new_bias,
        homogeneous=joint,
        kept_pairs=result.kept_pairs,
        total_pairs=result.total_pairs,
        threshold=result.threshold,
        energy_kept=result.energy_kept,
        change_norm=float(torch.linalg.matrix_norm(result.matrix - x)),
        weight_norm=float(torch.linalg.matrix_norm(x)),
        kept_G=result.kept_G,
        kept_A=result.kept_A,
    )


def edit_layer(
    weight: Tensor,
    eigen: LayerEigen | None = None,
    *,
    bias: Tensor | None = None,
    method: str = "kronecker",
    energy: float | None = None,
    keep_fraction: float | None = None,
    homogeneous: bool | None = None,
    name: str = "<layer>",
    weight_layout: str = "out_in",
) -> LayerEdit:
    """Edit one weight matrix (see the module docstring); the inputs are left untouched.

    ``eigen`` is required for ``kronecker`` / ``separable`` and must be None for ``svd``. ``bias`` is edited with
    ``W`` when the factors are homogeneous (``A`` is ``(in+1) x (in+1)``), otherwise ignored. ``homogeneous``
    (optional) asserts which convention the factors follow; ``name`` only labels error messages.
    ``weight_layout``: ``"out_in"`` (``nn.Linear``) or ``"in_out"`` (transformers ``Conv1D``, weight stored
    transposed); the returned weight has the same layout.
    """
    _check_method(method)
    criterion = check_strength(energy, keep_fraction)
    check_layout(weight_layout)
    if method == "svd" and eigen is not None:
        raise ValueError(f"layer {name!r}: method='svd' uses no curvature factors; pass eigen=None")
    if method != "svd" and eigen is None:
        raise ValueError(f"layer {name!r}: method={method!r} needs the layer's LayerEigen")
    if isinstance(weight, Tensor) and weight.dim() == 2:
        weight = as_out_in(weight, weight_layout)
    joint = _check_layer(name, weight, bias, eigen, homogeneous)
    return _stored_layout(_edit(name, weight, bias, eigen, method, criterion, joint), weight_layout)


def _stored_layout(result: LayerEdit, layout: str) -> LayerEdit:
    """``result`` with its (``out x in``) weight put back into the storage ``layout``."""
    if layout == "out_in":
        return result
    return dataclasses.replace(result, weight=from_out_in(result.weight, layout))


def edit_state_dict(
    state_dict: Mapping[str, Any],
    layers: Mapping[str, LayerEigen] | StoredFactors | None,
    layer_names: Sequence[str],
    *,
    method: str = "kronecker",
    energy: float | None = None,
    keep_fraction: float | None = None,
    homogeneous: Mapping[str, bool] | None = None,
    weight_layout: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, LayerEdit]]:
    """Edit the ``nn.Linear`` layers ``layer_names`` of a state dict; returns ``(new_state_dict, {layer: LayerEdit})``.

    ``state_dict`` maps ``f"{layer}.weight"`` (and ``.bias``) to tensors, e.g. a Lightning checkpoint's
    ``checkpoint["state_dict"]``. The result is a shallow copy (the same mapping type, so a ``torch`` state dict
    keeps its ``_metadata``) in which only the edited layers' tensors are replaced by new tensors; the input
    mapping and all its tensors are left bit-identical. ``layers`` holds the factors' eigendecompositions
    (``{name: LayerEigen}`` or a loaded ``StoredFactors`` of kind ``"eigen"``) for ``kronecker`` / ``separable``
    and must be None for ``svd``. ``homogeneous`` (optional, per layer) asserts the bias convention of the factors,
    e.g. from the factor file's layer metadata; it is otherwise read from the shape of ``A``. Every layer is
    validated before any is edited.

    Weight layout (per layer, ``"out_in"`` for ``nn.Linear``, ``"in_out"`` for a transformers ``Conv1D``): read
    from a ``StoredFactors``' layer metadata (files without it mean ``"out_in"``); with a plain mapping of
    ``LayerEigen`` (or ``svd``) pass ``weight_layout={layer: layout}`` for ``Conv1D`` layers (default
    ``"out_in"``). It is never guessed from the shape. The edited weights are returned in their stored layout.
    """
    _check_method(method)
    criterion = check_strength(energy, keep_fraction)
    if isinstance(layer_names, str) or not isinstance(layer_names, Sequence):
        raise TypeError(f"layer_names must be a sequence of layer names, got {layer_names!r}")
    names = list(layer_names)
    if not names:
        raise ValueError("layer_names is empty: name at least one layer to edit")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"layer_names lists {duplicates} more than once")
    layouts = dict(weight_layout or {})
    for name, layout in layouts.items():
        if layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"layer {name!r}: weight_layout {layout!r} is not one of {WEIGHT_LAYOUTS}")
    if isinstance(layers, StoredFactors):
        for name, layout in layers.weight_layouts().items():
            if layouts.setdefault(name, layout) != layout:
                raise ValueError(
                    f"layer {name!r}: weight_layout={layouts[name]!r} but {layers.path} records {layout!r}"
                )
        if layers.kind != "eigen":
            raise ValueError(
                f"{layers.path}: the factor file holds kind {layers.kind!r}; editing needs kind 'eigen' "
                "(eigendecompose the factors first)"
            )
        layers = layers.layers
    if method == "svd":
        if layers is not None or homogeneous is not None:
            raise ValueError("method='svd' uses no curvature factors: pass layers=None and homogeneous=None")
    elif layers is None:
        raise ValueError(f"method={method!r} needs the layers' eigendecompositions (layers is None)")

    available = [k.removesuffix(".weight") for k in state_dict if k.endswith(".weight")]
    plan = []
    for name in names:
        weight = state_dict.get(f"{name}.weight")
        if weight is None:
            raise ValueError(
                f"layer {name!r} has no {name + '.weight'!r} in the state dict; layers with a weight: "
                f"{_listing(available)}"
            )
        layout = layouts.get(name, "out_in")
        if isinstance(weight, Tensor) and weight.dim() == 2:
            weight = as_out_in(weight, layout)
        bias = state_dict.get(f"{name}.bias")
        eigen = None
        if method != "svd":
            if name not in layers:
                raise ValueError(f"layer {name!r} has no factors; layers with factors: {_listing(list(layers))}")
            eigen = layers[name]
        flag = None if homogeneous is None else homogeneous.get(name)
        plan.append((name, weight, bias, eigen, _check_layer(name, weight, bias, eigen, flag), layout))

    new_state_dict = copy.copy(state_dict) if isinstance(state_dict, dict) else dict(state_dict)
    results: dict[str, LayerEdit] = {}
    for name, weight, bias, eigen, joint, layout in plan:
        result = _stored_layout(_edit(name, weight, bias, eigen, method, criterion, joint), layout)
        new_state_dict[f"{name}.weight"] = result.weight
        if result.bias is not None:
            new_state_dict[f"{name}.bias"] = result.bias
        results[name] = result
    return new_state_dict, results
