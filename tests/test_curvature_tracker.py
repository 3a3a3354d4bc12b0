"""KFACTracker against a brute-force per-example reference (float64), plus invariances and misconfiguration."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch import nn

from memcurve.curvature import (
    KFACTracker,
    LayerFactors,
    fisher_backward,
    fisher_loss,
    merge_sums,
    normalize_sums,
    sample_targets,
    select_linear_layers,
)
from memcurve.curvature.tracker import GRAM_BLOCK

RTOL = 1e-10  # float64: only summation order differs between the reference and the hooks
ATOL = 1e-12
FLOAT32_RTOL = 1e-5  # float32 accumulation of a float32 model against the float64 reference
FLOAT32_ATOL = 1e-6
SEED = 1234
MC = 2
CLASSES = 5


class SeqModel(nn.Module):
    """A tiny causal sequence model: per-position MLP with a causal running mean between the layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, CLASSES, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x))
        h = h.cumsum(dim=1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]  # position t sees ≤ t
        return self.fc2(h)


def make_model(kind: str) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, CLASSES))
        names = ["0", "2"]
    elif kind == "seq":
        model, names = SeqModel(), ["fc1", "fc2"]
    else:
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=8,
            patch_size=2,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=CLASSES,
            in_chans=1,
        )
        names = ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.proj", "blocks.1.mlp.fc2"]
    return model.double().eval(), names


def make_data(kind: str, batch: int, masked: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Inputs, labels and an optional mask (right padding for sequences, arbitrary holes for the ViT)."""
    g = torch.Generator().manual_seed(7)
    if kind == "mlp":
        x = torch.randn(batch, 6, generator=g, dtype=torch.float64)
        return x, torch.randint(CLASSES, (batch,), generator=g), None
    if kind == "seq":
        T = 5
        x = torch.randn(batch, T, 6, generator=g, dtype=torch.float64)
        labels = torch.randint(CLASSES, (batch, T), generator=g)
        lengths = torch.tensor([5, 3, 1, 4, 2, 5, 3])[:batch]
        mask = torch.arange(T)[None] < lengths[:, None] if masked else None
        return x, labels, mask
    x = torch.randn(batch, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(CLASSES, (batch,), generator=g)
    mask = None
    if masked:
        mask = torch.rand(batch, 17, generator=g) > 0.3
        mask[:, 0] = True
    return x, labels, mask


def loss_mask_for(kind: str, mask: torch.Tensor | None) -> torch.Tensor | None:
    return mask if kind == "seq" else None  # per-position logits only for the sequence model


def reference(model, names, x, labels, mask, *, fisher, mode, position, bias, drop_last, kind, index):
    """Per-example autograd and explicit loops over positions and draws: the definition of A and G."""
    modules = dict(model.named_modules())
    A, G, cA, cG = {}, {}, dict.fromkeys(names, 0), dict.fromkeys(names, 0)
    lmask = loss_mask_for(kind, mask)
    for n in range(x.shape[0]):
        store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep_io(module, args, out, name, store=store):
            store[name] = (args[0], out)

        handles = [modules[name].register_forward_hook(functools.partial(keep_io, name=name)) for name in names]
        logits = model(x[n : n + 1])
        for h in handles:
            h.remove()
        ln = None if lmask is None else lmask[n : n + 1]
        if fisher == "sampled":
            targets = sample_targets(logits, seed=SEED, example_index=index[n : n + 1], mc_samples=MC)
            losses = [fisher_loss(logits, targets[d], ln) for d in range(MC)]
        else:
            losses = [fisher_loss(logits, labels[n : n + 1], ln)]
        grads = [torch.autograd.grad(loss, [store[name][1] for name in names], retain_graph=True) for loss in losses]
        for li, name in enumerate(names):
            a = store[name][0][0].reshape(-1, store[name][0].shape[-1])
            T = a.shape[0]
            m = [True] * T if mask is None else mask[n].tolist()
            keep = [
                t
                for t in range(T)
                if m[t] and (not drop_last or (t + 1 < T and m[t + 1])) and (position == "all" or t == 0)
            ]
            if bias == "homogeneous" and modules[name].bias is not None:
                a = torch.cat([a, torch.ones(T, 1, dtype=a.dtype)], dim=1)
            A.setdefault(name, torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64))
            G.setdefault(name, torch.zeros(modules[name].out_features, modules[name].out_features, dtype=torch.float64))
            if not keep:
                continue
            if mode == "expand":
                for t in keep:
                    A[name] += torch.outer(a[t], a[t])
                    cA[name] += 1
            else:
                mean = sum(a[t] for t in keep) / len(keep)
                A[name] += torch.outer(mean, mean)
                cA[name] += 1
            for draw in grads:
                g = draw[li][0].reshape(-1, modules[name].out_features)
                if mode == "expand":
                    for t in keep:
                        G[name] += torch.outer(g[t], g[t])
                        cG[name] += 1
                else:
                    total = sum(g[t] for t in keep)
                    G[name] += torch.outer(total, total)
                    cG[name] += 1
    return {name: LayerFactors(A[name] / cA[name], G[name] / cG[name], cA[name], cG[name]) for name in names}


def tracked(model, names, x, labels, mask, *, fisher, kind, index, dtype=torch.float64, **settings):
    with KFACTracker(model, names, dtype=dtype, **settings) as tracker:
        tracker.set_mask(mask)
        logits = model(x)
        fisher_backward(
            logits,
            fisher=fisher,
            labels=labels,
            seed=SEED,
            example_index=index,
            mc_samples=MC if fisher == "sampled" else 1,
            mask=loss_mask_for(kind, mask),
        )
    return tracker.finalize()


def assert_factors_close(got, want, rtol=RTOL, atol=ATOL):
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name].count_A, got[name].count_G) == (want[name].count_A, want[name].count_G), name
        torch.testing.assert_close(got[name].A.double(), want[name].A, rtol=rtol, atol=atol, msg=f"{name} A")
        torch.testing.assert_close(got[name].G.double(), want[name].G, rtol=rtol, atol=atol, msg=f"{name} G")


CASES = [
    # kind, mode, fisher, position, masked, drop_last, bias
    ("mlp", "expand", "sampled", "all", False, False, "homogeneous"),
    ("mlp", "expand", "empirical", "all", False, False, "exclude"),
    ("mlp", "reduce", "sampled", "all", False, False, "exclude"),
    ("mlp", "reduce", "empirical", "all", False, False, "homogeneous"),
    ("seq", "expand", "sampled", "all", True, True, "exclude"),
    ("seq", "expand", "empirical", "all", True, False, "homogeneous"),
    ("seq", "expand", "sampled", "cls", False, False, "exclude"),
    ("seq", "reduce", "sampled", "all", True, False, "homogeneous"),
    ("seq", "reduce", "empirical", "all", True, True, "exclude"),
    ("vit", "expand", "sampled", "cls", False, False, "exclude"),
    ("vit", "expand", "empirical", "all", True, False, "exclude"),
    ("vit", "expand", "sampled", "all", True, False, "homogeneous"),
    ("vit", "reduce", "sampled", "all", True, False, "exclude"),
    ("vit", "reduce", "empirical", "cls", False, False, "homogeneous"),
]


@pytest.mark.parametrize(("kind", "mode", "fisher", "position", "masked", "drop_last", "bias"), CASES)
def test_matches_brute_force_reference(kind, mode, fisher, position, masked, drop_last, bias):
    model, names = make_model(kind)
    x, labels, mask = make_data(kind, 4, masked)
    index = torch.arange(10, 14)
    settings = {"mode": mode, "position": position, "bias": bias, "drop_last_position": drop_last}
    got = tracked(model, names, x, labels, mask, fisher=fisher, kind=kind, index=index, **settings)
    want = reference(
        model,
        names,
        x,
        labels,
        mask,
        fisher=fisher,
        kind=kind,
        index=index,
        mode=mode,
        position=position,
        bias=bias,
        drop_last=drop_last,
    )
    assert_factors_close(got, want)
    if bias == "homogeneous":
        for name in names:
            module = dict(model.named_modules())[name]
            assert got[name].A.shape[0] == module.in_features + int(module.bias is not None)


def test_float32_default_matches_float64_reference():
    model, names = make_model("vit")
    x, labels, mask = make_data("vit", 3, True)
    index = torch.arange(3)
    want = reference(
        model,
        names,
        x,
        labels,
        mask,
        fisher="sampled",
        kind="vit",
        index=index,
        mode="expand",
        position="all",
        bias="exclude",
        drop_last=False,
    )
    model32 = model.float()
    with KFACTracker(model32, names) as tracker:
        tracker.set_mask(mask)
        fisher_backward(model32(x.float()), seed=SEED, example_index=index, mc_samples=MC)
    got = tracker.finalize()
    assert all(f.A.dtype == torch.float32 and f.G.dtype == torch.float32 for f in got.values())
    assert_factors_close(got, want, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL)


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_invariant_to_batch_size_and_partition(mode):
    model, names = make_model("seq")
    x, _, mask = make_data("seq", 7, True)
    index = torch.arange(100, 107)
    settings = {"mode": mode, "dtype": torch.float64, "drop_last_position": True}

    def run(batches):
        with KFACTracker(model, names, **settings) as tracker:
            for sl in batches:
                tracker.set_mask(mask[sl])
                fisher_backward(model(x[sl]), seed=SEED, example_index=index[sl], mc_samples=MC, mask=mask[sl])
        return tracker

    whole = run([slice(0, 7)])
    ones = run([slice(i, i + 1) for i in range(7)])
    assert_factors_close(ones.finalize(), whole.finalize())
    halves = merge_sums(run([slice(0, 3)]).sums(), run([slice(3, 7)]).sums())
    assert_factors_close(normalize_sums(halves), whole.finalize())


def test_hooks_released_and_state_dict_untouched():
    model, names = make_model("vit")
    keys = list(model.state_dict())
    modules = dict(model.named_modules())
    with pytest.raises(RuntimeError, match="boom"), KFACTracker(model, names):
        assert all(len(modules[n]._forward_hooks) == 1 for n in names)
        assert list(model.state_dict()) == keys
        raise RuntimeError("boom")
    assert all(len(modules[n]._forward_hooks) == 0 for n in names)
    assert list(model.state_dict()) == keys


def test_untracked_forwards_are_ignored():
    model, names = make_model("mlp")
    x, labels, _ = make_data("mlp", 4, False)
    with KFACTracker(model, names, dtype=torch.float64) as tracker:
        with torch.no_grad():
            model(x)  # e.g. a validation step: no backward will follow
        tracker.enabled = False
        fisher_backward(model(x), fisher="empirical", labels=labels)
        tracker.enabled = True
        logits = model(x)
    fisher_backward(logits, fisher="empirical", labels=labels)  # after exit: not counted
    assert all(int(s.count_A) == 4 and int(s.count_G) == 0 for s in tracker.sums().values())
    with pytest.raises(RuntimeError, match="no output gradients"):
        tracker.finalize()


def test_select_linear_layers():
    model, _ = make_model("vit")
    assert select_linear_layers(model, "blocks.*.mlp.fc?") == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    with pytest.raises(ValueError, match=r"layer pattern 'decoder.\*' matches no nn.Linear module"):
        select_linear_layers(model, "decoder.*")
    assert select_linear_layers(model, ["re:blocks\\.1\\.attn\\.(qkv|proj)", "head"]) == [
        "blocks.1.attn.qkv",
        "blocks.1.attn.proj",
        "head",
    ]
    # blocks.0.mlp.* also matches the activation, dropouts and norm: skipped, or refused on request.
    assert select_linear_layers(model, "blocks.0.mlp.*") == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    with pytest.raises(TypeError, match=r"matches modules that are not nn.Linear: \['blocks.0.mlp.act \(GELU\)'"):
        select_linear_layers(model, "blocks.0.mlp.*", on_non_linear="error")
    with pytest.raises(ValueError, match=r"matches no nn.Linear module \(only \['blocks.0.norm1 \(LayerNorm\)'\]\)"):
        select_linear_layers(model, "blocks.0.norm1")
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        select_linear_layers(model, "re:blocks[")
    with pytest.raises(ValueError, match=r"on_non_linear='warn' is not supported"):
        select_linear_layers(model, "head", on_non_linear="warn")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "mean"}, ValueError, r"mode='mean' is not supported; choose one of \('expand', 'reduce'\)"),
        ({"position": "first"}, ValueError, r"position='first' is not supported"),
        ({"bias": "fold"}, ValueError, r"bias='fold' is not supported"),
        ({"dtype": torch.float16}, ValueError, r"dtype=torch.float16 is not supported"),
        ({"layer_names": ["blocks.0.norm1"]}, TypeError, r"'blocks.0.norm1' is a LayerNorm, not an nn.Linear"),
        ({"layer_names": ["blocks.9.mlp.fc1"]}, ValueError, r"'blocks.9.mlp.fc1' is not a module of the model"),
        ({"layer_names": "head"}, TypeError, r"not the string 'head'"),
        ({"layer_names": []}, ValueError, r"layer_names is empty"),
    ],
)
def test_misconfiguration(kwargs, error, match):
    model, names = make_model("vit")
    kwargs = {"layer_names": names, **kwargs}
    with pytest.raises(error, match=match):
        KFACTracker(model, **kwargs)


def test_bad_mask_and_position_fail_at_forward():
    model, names = make_model("vit")
    x, _, _ = make_data("vit", 2, False)
    with KFACTracker(model, names) as tracker:
        tracker.set_mask(torch.ones(2, 5, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"mask of shape \(2, 5\) does not match the layer input"):
            model(x)
    mlp, mlp_names = make_model("mlp")
    with KFACTracker(mlp, mlp_names, position="cls"), pytest.raises(ValueError, match="position='cls' needs inputs"):
        mlp(torch.randn(2, 6, dtype=torch.float64))
    tracker = KFACTracker(mlp, mlp_names)
    with tracker, pytest.raises(RuntimeError, match="cannot be entered twice"), tracker:
        pass


def test_wide_layers_use_blocked_gram_and_still_match_the_dense_reference():
    """Layers wider than GRAM_BLOCK accumulate only the upper blocks; the sums read back are complete and exact."""
    torch.manual_seed(0)
    d_in, d_out = GRAM_BLOCK + 45, 2 * GRAM_BLOCK + 9
    model = nn.Sequential(nn.Linear(d_in, d_out)).double()
    x = torch.randn(6, 5, d_in, dtype=torch.float64)
    upstream = torch.randn(6, 5, d_out, dtype=torch.float64)
    with KFACTracker(model, ["0"], dtype=torch.float64) as tracker:
        for rows, grads in zip(x.split(2), upstream.split(2)):  # several batches: the blocks accumulate
            model(rows).backward(grads)
    live = tracker.sums()["0"]
    a_rows, g_rows = x.reshape(-1, d_in), upstream.reshape(-1, d_out)
    torch.testing.assert_close(live.A_sum, a_rows.T @ a_rows, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(live.G_sum, g_rows.T @ g_rows, rtol=1e-12, atol=1e-10)
    factors = tracker.finalize(reduce_across_ranks=False)["0"]
    torch.testing.assert_close(factors.A, a_rows.T @ a_rows / 30, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factors.G, factors.G.T, rtol=0, atol=0)
