"""Weight edits (kronecker, separable, svd) against dense float64 references, bias conventions, state dicts, errors."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from memcurve.curvature import (
    KFACTracker,
    LayerEigen,
    LayerFactors,
    eigendecompose,
    fisher_backward,
    kappa,
    load_factors,
    save_factors,
)
from memcurve.curvature.edit import EDIT_METHODS, LayerEdit, edit_layer, edit_state_dict

F64 = torch.float64
ATOL = 1e-12  # float64 products of a few orthogonal matrices with O(1) entries
RTOL = 1e-12
FLOAT32_ATOL = 1e-6  # a float32 weight edited in float64 and rounded back
M, N = 5, 4  # out, in


def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def make_eigen(mu: torch.Tensor, lam: torch.Tensor, seed: int = 0) -> LayerEigen:
    g = torch.Generator().manual_seed(seed)
    mu, lam = torch.as_tensor(mu, dtype=F64), torch.as_tensor(lam, dtype=F64)
    return LayerEigen(lam, orthogonal(lam.numel(), g), mu, orthogonal(mu.numel(), g), 10, 10)


def random_eigen(m: int = M, n: int = N, seed: int = 0) -> LayerEigen:
    """Distinct positive spectra, descending (no ties in κ almost surely)."""
    g = torch.Generator().manual_seed(1000 + seed)
    mu = torch.sort(torch.rand(m, generator=g, dtype=F64) ** 3 + 1e-3, descending=True).values
    lam = torch.sort(torch.rand(n, generator=g, dtype=F64) ** 3 + 1e-3, descending=True).values
    return make_eigen(mu, lam, seed)


def random_weight(m: int = M, n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(2000 + seed), dtype=F64)


def brute_kept(mu: torch.Tensor, lam: torch.Tensor, energy=None, keep_fraction=None) -> torch.Tensor:
    """Kept-pair mask by sorting every κ (independent of curvature.selection)."""
    k = kappa(mu, lam)
    s = torch.sort(k.reshape(-1), descending=True).values
    if energy is not None:
        t = s[int(torch.nonzero(s.cumsum(0) >= energy * float(k.sum()))[0])]
    else:
        t = s[math.ceil(keep_fraction * k.numel() - 1e-9) - 1]
    return k >= t


def explicit_projection(eigen: LayerEigen, kept: torch.Tensor) -> torch.Tensor:
    """``P = Σ_kept z zᵀ`` with ``z = vec(u_i v_jᵀ) = u_i ⊗ v_j`` (row-major vec)."""
    u, v = eigen.eigvecs_G, eigen.eigvecs_A
    p = torch.zeros(u.shape[0] * v.shape[0], u.shape[0] * v.shape[0], dtype=F64)
    for i, j in kept.nonzero().tolist():
        z = torch.kron(u[:, i], v[:, j])
        assert torch.allclose(z, torch.outer(u[:, i], v[:, j]).reshape(-1))  # the vec convention
        p += torch.outer(z, z)
    return p


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


# -- kronecker ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "criterion", [("energy", 0.3), ("energy", 0.6), ("energy", 0.9), ("keep_fraction", 0.25), ("keep_fraction", 0.5)]
)
def test_kronecker_equals_explicit_kronecker_projection(seed, criterion):
    eigen, w = random_eigen(seed=seed), random_weight(seed=seed)
    kwargs = {criterion[0]: criterion[1]}
    kept = brute_kept(eigen.eigvals_G, eigen.eigvals_A, **kwargs)
    result = edit_layer(w, eigen, **kwargs)
    p = explicit_projection(eigen, kept)
    torch.testing.assert_close(result.weight.reshape(-1), p @ w.reshape(-1), rtol=RTOL, atol=ATOL)
    k = kappa(eigen.eigvals_G, eigen.eigvals_A)
    assert result.kept_pairs == int(kept.sum()) and result.total_pairs == M * N
    assert result.kept_fraction == int(kept.sum()) / (M * N)
    assert result.threshold == float(k[kept].min())
    assert result.energy_kept == pytest.approx(float(k[kept].sum() / k.sum()), rel=RTOL)
    assert result.relative_change == pytest.approx(float((result.weight - w).norm() / w.norm()), rel=RTOL)
    assert result.bias is None and not result.homogeneous and result.kept_G is None
    again = edit_layer(result.weight, eigen, **kwargs)  # a projection: idempotent
    torch.testing.assert_close(again.weight, result.weight, rtol=RTOL, atol=ATOL)
    assert again.relative_change < 1e-12


@pytest.mark.parametrize("method", EDIT_METHODS)
@pytest.mark.parametrize("criterion", ["energy", "keep_fraction"])
def test_keeping_everything_is_the_identity(method, criterion):
    eigen, w = random_eigen(seed=3), random_weight(seed=3)
    result = edit_layer(w, None if method == "svd" else eigen, method=method, **{criterion: 1.0})
    torch.testing.assert_close(result.weight, w, rtol=RTOL, atol=ATOL)
    assert result.kept_fraction == 1.0 and result.relative_change < 1e-12
    assert result.energy_kept == pytest.approx(1.0, rel=RTOL)


def test_tiny_energy_keeps_only_the_top_pair():
    eigen, w = random_eigen(seed=4), random_weight(seed=4)
    u, v = eigen.eigvecs_G[:, 0], eigen.eigvecs_A[:, 0]
    result = edit_layer(w, eigen, energy=1e-9)
    torch.testing.assert_close(result.weight, (u @ w @ v) * torch.outer(u, v), rtol=RTOL, atol=ATOL)
    assert result.kept_pairs == 1 and result.threshold == float(eigen.eigvals_G[0] * eigen.eigvals_A[0])


def test_keep_fraction_counts_and_ties():
    eigen, w = random_eigen(seed=5), random_weight(seed=5)
    for k in range(1, M * N + 1):
        assert edit_layer(w, eigen, keep_fraction=k / (M * N)).kept_pairs == k
    assert edit_layer(w, eigen, keep_fraction=0.26).kept_pairs == 6  # ⌈0.26 · 20⌉ = ⌈5.2⌉
    assert edit_layer(w, eigen, keep_fraction=1e-9).kept_pairs == 0  # 2e-8 pairs round to none: W' = 0
    # ties: μ_1 = μ_2, so the 2nd-ranked pair ties with the 3rd and both are kept
    tied = make_eigen([3.0, 2.0, 2.0, 1.0, 0.5], [4.0, 1.0, 0.5, 0.25], seed=6)
    result = edit_layer(w, tied, keep_fraction=2 / 20)
    assert result.kept_pairs == 3 and result.threshold == 8.0
    # keeping tied pairs together keeps whole eigenspaces: rotating U_G inside the tied plane changes nothing
    c, s = math.cos(0.7), math.sin(0.7)
    rotation = torch.eye(M, dtype=F64)
    rotation[1:3, 1:3] = torch.tensor([[c, -s], [s, c]], dtype=F64)
    rotated = LayerEigen(tied.eigvals_A, tied.eigvecs_A, tied.eigvals_G, tied.eigvecs_G @ rotation, 10, 10)
    for kwargs in ({"keep_fraction": 2 / 20}, {"energy": 0.7}):
        torch.testing.assert_close(
            edit_layer(w, rotated, **kwargs).weight, edit_layer(w, tied, **kwargs).weight, rtol=RTOL, atol=ATOL
        )


def test_eigenvalue_order_does_not_matter():
    eigen, w = random_eigen(seed=7), random_weight(seed=7)
    pg, pa = torch.tensor([3, 0, 4, 1, 2]), torch.tensor([2, 3, 0, 1])
    shuffled = LayerEigen(
        eigen.eigvals_A[pa], eigen.eigvecs_A[:, pa], eigen.eigvals_G[pg], eigen.eigvecs_G[:, pg], 1, 1
    )
    for method in ("kronecker", "separable"):
        a = edit_layer(w, eigen, method=method, energy=0.8)
        b = edit_layer(w, shuffled, method=method, energy=0.8)
        torch.testing.assert_close(a.weight, b.weight, rtol=RTOL, atol=ATOL)
        assert (a.kept_pairs, a.threshold) == (b.kept_pairs, b.threshold)


def test_zero_curvature_pairs_are_dropped_at_energy_one():
    eigen = make_eigen([3.0, 2.0, 1.0, 0.5, 0.25], [2.0, 1.0, 0.5, 0.0], seed=8)  # input direction v_4 is dead
    w = random_weight(seed=8)
    result = edit_layer(w, eigen, energy=1.0)
    v = eigen.eigvecs_A[:, 3]
    torch.testing.assert_close(result.weight, w - torch.outer(w @ v, v), rtol=RTOL, atol=ATOL)
    assert result.kept_pairs == 15 and result.energy_kept == 1.0


# -- separable ----------------------------------------------------------------------------------------------------
def test_separable_equals_kronecker_on_a_block_mask():
    # the 6 largest κ form the block {0, 1} x {0, 1, 2}: min inside 90·30 = 2700 > max outside 100·0.5 = 50
    mu, lam = [100.0, 90.0, 1.0, 0.5], [50.0, 40.0, 30.0, 0.2, 0.1, 0.05]
    eigen, w = make_eigen(mu, lam, seed=9), random_weight(4, 6, seed=9)
    kron = edit_layer(w, eigen, keep_fraction=6 / 24)
    assert kron.kept_pairs == 6
    for kwargs in ({"keep_fraction": 0.5}, {"energy": 0.99}):  # 2 of 4 and 3 of 6; 190/191.5 and 120/120.35
        sep = edit_layer(w, eigen, method="separable", **kwargs)
        assert (sep.kept_G, sep.kept_A, sep.kept_pairs, sep.total_pairs) == (2, 3, 6, 24)
        torch.testing.assert_close(sep.weight, kron.weight, rtol=RTOL, atol=ATOL)
        assert sep.threshold == kron.threshold == 90.0 * 30.0
        assert sep.energy_kept == pytest.approx(kron.energy_kept, rel=RTOL)
        assert sep.energy_kept == pytest.approx((190 / 191.5) * (120 / 120.35), rel=RTOL)


def test_separable_formula():
    eigen, w = random_eigen(seed=10), random_weight(seed=10)
    result = edit_layer(w, eigen, method="separable", keep_fraction=0.5)  # ⌈2.5⌉ = 3 of G, 2 of A
    p_g, p_a = eigen.eigvecs_G[:, :3], eigen.eigvecs_A[:, :2]
    torch.testing.assert_close(result.weight, p_g @ p_g.T @ w @ p_a @ p_a.T, rtol=RTOL, atol=ATOL)
    assert (result.kept_G, result.kept_A, result.kept_pairs) == (3, 2, 6)
    again = edit_layer(result.weight, eigen, method="separable", keep_fraction=0.5)
    torch.testing.assert_close(again.weight, result.weight, rtol=RTOL, atol=ATOL)


# -- svd ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3])
def test_svd_rank_truncation_matches_reference(k):
    w = random_weight(6, 4, seed=11)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    reference = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    result = edit_layer(w, method="svd", keep_fraction=k / 4)
    torch.testing.assert_close(result.weight, reference, rtol=RTOL, atol=ATOL)
    assert (result.kept_pairs, result.total_pairs) == (k, 4)
    assert result.threshold == pytest.approx(float(s[k - 1] ** 2), rel=RTOL)
    assert result.energy_kept == pytest.approx(float((s[:k] ** 2).sum() / (s**2).sum()), rel=RTOL)
    assert result.relative_change == pytest.approx(float((s[k:] ** 2).sum().sqrt() / s.norm()), rel=RTOL)
    # energy is over σ²: just below the cumulative share of the top k directions keeps k, just above keeps k + 1
    share = float((s[:k] ** 2).sum() / (s**2).sum())
    assert edit_layer(w, method="svd", energy=share - 1e-9).kept_pairs == k
    assert edit_layer(w, method="svd", energy=min(share + 1e-9, 1.0)).kept_pairs == min(k + 1, 4)


# -- bias ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["kronecker", "separable"])
def test_homogeneous_bias_is_edited_with_the_weight(method):
    g = torch.Generator().manual_seed(12)
    eigen = random_eigen(M, N + 1, seed=12)  # A over [a; 1]
    w, b = random_weight(seed=12), torch.randn(M, generator=g, dtype=F64)
    x = torch.cat([w, b[:, None]], dim=1)
    augmented = edit_layer(x, eigen, method=method, energy=0.7)  # the same maths on [W | b] as a plain matrix
    result = edit_layer(w, eigen, bias=b, method=method, energy=0.7)
    assert result.homogeneous and result.bias is not None
    torch.testing.assert_close(result.weight, augmented.weight[:, :N], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(result.bias, augmented.weight[:, N], rtol=RTOL, atol=ATOL)
    assert result.relative_change == pytest.approx(augmented.relative_change, rel=RTOL)
    assert result.kept_pairs == augmented.kept_pairs and result.total_pairs == M * (N + 1)
    assert edit_layer(w, eigen, bias=b, method=method, energy=0.7, homogeneous=True).weight.equal(result.weight)
    shifted = edit_layer(w, eigen, bias=b + 1, method=method, energy=0.7)  # the bias enters the weight's edit
    assert not torch.allclose(shifted.weight, result.weight)


def test_excluded_bias_is_untouched():
    eigen, w = random_eigen(seed=13), random_weight(seed=13)
    b = torch.ones(M, dtype=F64)
    with_bias = edit_layer(w, eigen, bias=b, energy=0.7, homogeneous=False)
    assert with_bias.bias is None and not with_bias.homogeneous
    assert with_bias.weight.equal(edit_layer(w, eigen, energy=0.7).weight)
    state = {"fc.weight": w, "fc.bias": b}
    for method, layers in (("kronecker", {"fc": eigen}), ("svd", None)):
        new, _ = edit_state_dict(state, layers, ["fc"], method=method, energy=0.7)
        assert new["fc.bias"] is b


def test_float32_weight_comes_back_float32():
    eigen, w = random_eigen(M, N + 1, seed=14), random_weight(seed=14)
    b = torch.randn(M, dtype=F64)
    reference = edit_layer(w, eigen, bias=b, energy=0.8)
    result = edit_layer(w.float(), eigen, bias=b.float(), energy=0.8)
    assert result.weight.dtype == result.bias.dtype == torch.float32
    torch.testing.assert_close(result.weight, reference.weight.float(), rtol=0, atol=FLOAT32_ATOL)
    torch.testing.assert_close(result.bias, reference.bias.float(), rtol=0, atol=FLOAT32_ATOL)


# -- state dicts -------------------------------------------------------------------------------------------------
def state_and_layers() -> tuple[OrderedDict, dict[str, LayerEigen]]:
    g = torch.Generator().manual_seed(15)
    state = OrderedDict(
        [
            ("net.0.weight", torch.randn(M, N, generator=g, dtype=F64)),
            ("net.0.bias", torch.randn(M, generator=g, dtype=F64)),
            ("net.2.weight", torch.randn(3, M, generator=g)),  # float32, no bias
            ("norm.weight", torch.ones(3)),
            ("steps", torch.tensor(7)),
        ]
    )
    state._metadata = {"": {"version": 1}}  # as torch's state_dict() carries
    return state, {"net.0": random_eigen(M, N + 1, seed=15), "net.2": random_eigen(3, M, seed=16)}


@pytest.mark.parametrize("method", EDIT_METHODS)
def test_edit_state_dict_copies_and_leaves_the_input_untouched(method):
    state, layers = state_and_layers()
    before = {k: bits(v) for k, v in state.items()}
    objects = dict(state)
    new, results = edit_state_dict(state, None if method == "svd" else layers, ["net.0"], method=method, energy=0.6)
    assert list(state) == list(before) and all(state[k] is objects[k] for k in state)
    assert all(torch.equal(bits(state[k]), before[k]) for k in state)  # bit for bit
    assert type(new) is OrderedDict and new is not state and new._metadata == state._metadata
    assert list(new) == list(state) and list(results) == ["net.0"] and isinstance(results["net.0"], LayerEdit)
    for key in ("net.2.weight", "norm.weight", "steps"):
        assert new[key] is state[key]
    assert new["net.0.weight"] is results["net.0"].weight and new["net.0.weight"] is not state["net.0.weight"]
    assert not torch.allclose(new["net.0.weight"], state["net.0.weight"])
    if method == "svd":
        assert new["net.0.bias"] is state["net.0.bias"]
    else:
        assert new["net.0.bias"] is results["net.0"].bias and results["net.0"].homogeneous
        reference = edit_layer(
            state["net.0.weight"], layers["net.0"], bias=state["net.0.bias"], method=method, energy=0.6
        )
        assert new["net.0.weight"].equal(reference.weight) and new["net.0.bias"].equal(reference.bias)


def test_edit_state_dict_float32_layer_and_homogeneous_flags():
    state, layers = state_and_layers()
    new, results = edit_state_dict(
        state, layers, ["net.2", "net.0"], keep_fraction=0.5, homogeneous={"net.0": True, "net.2": False}
    )
    assert new["net.2.weight"].dtype == torch.float32 and list(results) == ["net.2", "net.0"]
    assert results["net.2"].kept_pairs == math.ceil(0.5 * 3 * M) and not results["net.2"].homogeneous
    assert results["net.0"].summary()["kept_pairs"] == results["net.0"].kept_pairs


def test_edit_state_dict_with_a_factor_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4, bias=False)).double()
    with KFACTracker(model, ["0", "2"], bias="homogeneous", dtype=F64) as tracker:
        fisher_backward(model(torch.randn(32, 6, dtype=F64)), seed=0, example_index=torch.arange(32))
    settings = {**tracker.settings(), "fisher": "sampled", "mc_samples": 1}
    path = save_factors(tmp_path / "f.safetensors", eigendecompose(tracker.finalize()), model=model, settings=settings)
    stored = load_factors(path, model)
    new, results = edit_state_dict(model.state_dict(), stored, ["0", "2"], energy=0.9)
    assert results["0"].homogeneous and not results["2"].homogeneous  # layer 2 has no bias: A stays 8 x 8
    model.load_state_dict(new)
    assert model[0].weight.equal(results["0"].weight) and model[0].bias.equal(results["0"].bias)
    raw = save_factors(tmp_path / "raw.safetensors", tracker.finalize(), model=model, settings=settings)
    with pytest.raises(ValueError, match="kind 'factors'; editing needs kind 'eigen'"):
        edit_state_dict(model.state_dict(), load_factors(raw), ["0"], energy=0.9)


# -- misconfiguration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"energy": 0.0}, ValueError, r"energy=0.0 must be in \(0, 1\]"),
        ({"energy": 1.5}, ValueError, r"energy=1.5 must be in \(0, 1\]"),
        ({"energy": -0.1}, ValueError, r"energy=-0.1 must be in \(0, 1\]"),
        ({"energy": math.nan}, ValueError, r"energy=nan must be in \(0, 1\]"),
        ({"energy": True}, TypeError, r"energy=True must be a real number"),
        ({"energy": "0.5"}, TypeError, r"energy='0.5' must be a real number"),
        ({"keep_fraction": 0}, ValueError, r"keep_fraction=0 must be in \(0, 1\]"),
        ({"keep_fraction": 2}, ValueError, r"keep_fraction=2 must be in \(0, 1\]"),
        ({"energy": 0.5, "keep_fraction": 0.5}, ValueError, "exactly one of energy or keep_fraction"),
        ({}, ValueError, "exactly one of energy or keep_fraction; got energy=None, keep_fraction=None"),
        ({"energy": 0.5, "method": "lowrank"}, ValueError, r"method='lowrank' is not supported; choose one of"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    state, layers = state_and_layers()
    eigen = layers["net.0"]
    with pytest.raises(error, match=match):
        edit_layer(state["net.0.weight"], eigen, bias=state["net.0.bias"], **kwargs)
    with pytest.raises(error, match=match):
        edit_state_dict(state, layers, ["net.0"], **kwargs)


def test_layer_errors():
    state, layers = state_and_layers()
    w, b, eigen = state["net.0.weight"], state["net.0.bias"], layers["net.0"]
    with pytest.raises(
        ValueError,
        match=r"layer 'net.1' has no 'net.1.weight' in the state dict; layers with a "
        r"weight: \['net.0', 'net.2', 'norm'\]",
    ):
        edit_state_dict(state, layers, ["net.1"], energy=0.5)
    with pytest.raises(ValueError, match=r"layer 'norm' has no factors; layers with factors: \['net.0', 'net.2'\]"):
        edit_state_dict(state, layers, ["norm"], energy=0.5)
    with pytest.raises(ValueError, match=r"layer 'norm': the weight must be a 2-D tensor"):
        edit_state_dict(state, None, ["norm"], method="svd", energy=0.5)
    with pytest.raises(
        ValueError,
        match=r"layer 'net.0': eigvecs_A / eigvals_A have shapes \(3, 3\) / \(3,\), the "
        r"weight of shape \(out, in\) = \(5, 4\) needs \(4, 4\)",
    ):
        edit_state_dict(state, {"net.0": random_eigen(M, 3)}, ["net.0"], energy=0.5)
    with pytest.raises(ValueError, match=r"layer 'net.2': eigvecs_G / eigvals_G have shapes \(5, 5\) / \(5,\)"):
        edit_state_dict(state, {"net.2": random_eigen(M, M)}, ["net.2"], energy=0.5)
    with pytest.raises(ValueError, match=r"layer 'net.0': homogeneous=False but its A factor is 5 x 5 for 4 inputs"):
        edit_state_dict(state, layers, ["net.0"], energy=0.5, homogeneous={"net.0": False})
    with pytest.raises(ValueError, match=r"'fc'.* homogeneous bias coordinate .* but no bias was given"):
        edit_layer(w, eigen, energy=0.5, name="fc")
    with pytest.raises(ValueError, match=r"the bias has shape \(4,\), expected \(5,\)"):
        edit_layer(w, eigen, bias=b[:4], energy=0.5)
    with pytest.raises(TypeError, match="expected a LayerEigen, got LayerFactors; eigendecompose"):
        edit_layer(w, LayerFactors(torch.eye(N + 1), torch.eye(M), 1, 1), bias=b, energy=0.5)
    with pytest.raises(ValueError, match=r"method='kronecker' needs the layers' eigendecompositions"):
        edit_state_dict(state, None, ["net.0"], energy=0.5)
    with pytest.raises(ValueError, match=r"method='svd' uses no curvature factors"):
        edit_state_dict(state, layers, ["net.0"], method="svd", energy=0.5)
    with pytest.raises(ValueError, match=r"method='svd' uses no curvature factors"):
        edit_layer(w, eigen, method="svd", energy=0.5)
    with pytest.raises(ValueError, match=r"method='separable' needs the layer's LayerEigen"):
        edit_layer(w, method="separable", energy=0.5)
    with pytest.raises(ValueError, match="homogeneous=True needs K-FAC factors"):
        edit_layer(w, method="svd", energy=0.5, homogeneous=True)
    with pytest.raises(ValueError, match="layer_names is empty"):
        edit_state_dict(state, layers, [], energy=0.5)
    with pytest.raises(TypeError, match=r"layer_names must be a sequence of layer names, got 'net\.0'"):
        edit_state_dict(state, layers, "net.0", energy=0.5)
    with pytest.raises(ValueError, match=r"layer_names lists \['net.0'\] more than once"):
        edit_state_dict(state, layers, ["net.0", "net.0"], energy=0.5)


def test_undefined_energy_errors():
    w = random_weight(seed=17)
    dead = make_eigen([0.0] * M, [1.0] * N)
    with pytest.raises(ValueError, match=r"layer 'fc': the eigenvalues μ of G are all zero"):
        edit_layer(w, dead, energy=0.5, name="fc")
    with pytest.raises(ValueError, match=r"layer 'fc': the eigenvalues μ of G are all zero"):
        edit_layer(w, dead, method="separable", energy=0.5, name="fc")
    assert edit_layer(w, dead, keep_fraction=0.5).kept_pairs == M * N  # all κ tie at 0: every pair is kept
    with pytest.raises(ValueError, match="singular values of the weight are all zero"):
        edit_layer(torch.zeros(M, N, dtype=F64), method="svd", energy=0.5)
    with pytest.raises(ValueError, match="mu has negative values"):
        edit_layer(w, make_eigen([-1.0] * M, [1.0] * N), energy=0.5)
