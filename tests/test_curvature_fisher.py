"""Fisher targets: seeded, batch-independent draws; G of a softmax layer against its closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memcurve.curvature import KFACTracker, fisher_backward, fisher_loss, sample_targets

EXACT_RTOL = 1e-12  # float64 closed forms that only differ in summation order
EXACT_ATOL = 1e-14
MC_ATOL = 1e-2  # Monte-Carlo error of 64 inputs x 256 draws on entries of size ~0.14 (observed ~3e-3)
FREQ_ATOL = 1.5e-2  # class frequencies of 20,000 draws (standard error ≤ 3.6e-3)


def softmax_layer() -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False)).double()
    with torch.no_grad():
        model[0].weight.mul_(3)  # peaked predictive distributions, far from uniform
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, x


def outer_mean(g: torch.Tensor) -> torch.Tensor:
    return (g[..., :, None] * g[..., None, :]).reshape(-1, g.shape[-1], g.shape[-1]).mean(0)


def test_same_seed_same_bits_and_different_seed_differs():
    logits = torch.randn(5, 7, 11, generator=torch.Generator().manual_seed(0))
    a = sample_targets(logits, seed=3, example_index=torch.arange(5), mc_samples=4)
    b = sample_targets(logits, seed=3, example_index=torch.arange(5), mc_samples=4)
    c = sample_targets(logits, seed=4, example_index=torch.arange(5), mc_samples=4)
    assert a.shape == (4, 5, 7) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)

    model, x = softmax_layer()
    results = []
    for _ in range(2):
        with KFACTracker(model, ["0"]) as tracker:
            fisher_backward(model(x), seed=3, example_index=torch.arange(64), mc_samples=3)
        results.append(tracker.finalize()["0"].G)
    assert torch.equal(results[0], results[1])


def test_draws_do_not_depend_on_batch_order_size_or_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 9, generator=g)
    index = torch.tensor([40, 2, 17, 5, 33, 8])
    full = sample_targets(logits, seed=1, example_index=index, mc_samples=3)
    single = torch.cat(
        [sample_targets(logits[i : i + 1], seed=1, example_index=index[i : i + 1], mc_samples=3) for i in range(6)],
        dim=1,
    )
    assert torch.equal(full, single)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(sample_targets(logits[perm], seed=1, example_index=index[perm], mc_samples=3), full[:, perm])
    padded = torch.cat([logits, torch.randn(6, 3, 9, generator=g)], dim=1)  # longer right padding
    assert torch.equal(sample_targets(padded, seed=1, example_index=index, mc_samples=3)[:, :, :4], full)
    more_draws = sample_targets(logits, seed=1, example_index=index, mc_samples=5)
    assert torch.equal(more_draws[:3], full)


def test_draw_frequencies_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, -30.0]])
    draws = sample_targets(logits, seed=0, example_index=[0], mc_samples=20_000).reshape(-1)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    torch.testing.assert_close(freq, torch.softmax(logits.double(), -1)[0], rtol=0, atol=FREQ_ATOL)
    assert freq[4] == 0  # p ≈ 1e-14: never drawn in 20,000


def test_sampled_G_is_the_average_over_draws_of_g_gT():
    """Exact: for z = Wx and a summed cross-entropy, g = p - onehot(y) for each drawn y."""
    model, x = softmax_layer()
    index = torch.arange(64)
    with KFACTracker(model, ["0"], dtype=torch.float64) as tracker:
        logits = model(x)
        fisher_backward(logits, seed=9, example_index=index, mc_samples=3)
    f = tracker.finalize()["0"]
    targets = sample_targets(logits, seed=9, example_index=index, mc_samples=3)
    p = torch.softmax(logits.detach(), -1)
    g = p[None] - nn.functional.one_hot(targets, 4).double()  # [draws, N, C]
    assert (f.count_A, f.count_G) == (64, 3 * 64)
    torch.testing.assert_close(f.G, outer_mean(g), rtol=EXACT_RTOL, atol=EXACT_ATOL)
    torch.testing.assert_close(f.A, x.T @ x / 64, rtol=EXACT_RTOL, atol=EXACT_ATOL)


def test_empirical_G_uses_the_labels():
    model, x = softmax_layer()
    labels = torch.randint(4, (64,), generator=torch.Generator().manual_seed(2))
    with KFACTracker(model, ["0"], dtype=torch.float64) as tracker:
        logits = model(x)
        fisher_backward(logits, fisher="empirical", labels=labels)
    g = torch.softmax(logits.detach(), -1) - nn.functional.one_hot(labels, 4).double()
    torch.testing.assert_close(tracker.finalize()["0"].G, outer_mean(g), rtol=EXACT_RTOL, atol=EXACT_ATOL)


def test_sampled_fisher_expectation_matches_analytic_softmax_fisher():
    """G_true = E_x[diag(p) - p pᵀ] for logits z = W x."""
    model, x = softmax_layer()
    with KFACTracker(model, ["0"], dtype=torch.float64) as tracker:
        logits = model(x)
        fisher_backward(logits, seed=0, example_index=torch.arange(64), mc_samples=256)
    p = torch.softmax(logits.detach(), -1)
    g_true = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    torch.testing.assert_close(tracker.finalize()["0"].G, g_true, rtol=0, atol=MC_ATOL)


def test_fisher_loss_is_a_masked_sum():
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = torch.randint(5, (3, 4), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ce = nn.functional.cross_entropy(logits.permute(0, 2, 1), targets, reduction="none")
    torch.testing.assert_close(fisher_loss(logits, targets), ce.sum(), rtol=EXACT_RTOL, atol=0)
    torch.testing.assert_close(fisher_loss(logits, targets, mask), ce[mask].sum(), rtol=EXACT_RTOL, atol=0)
    ignored = targets.masked_fill(~mask, -100)
    torch.testing.assert_close(fisher_loss(logits, ignored), ce[mask].sum(), rtol=EXACT_RTOL, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fisher": "true"}, r"fisher='true' is not supported; choose one of \('sampled', 'empirical'\)"),
        ({"fisher": "empirical"}, "needs labels"),
        ({"fisher": "empirical", "labels": torch.zeros(2, dtype=torch.long), "mc_samples": 2}, "must be 1"),
        ({"fisher": "sampled"}, "needs example_index"),
        ({"example_index": [0, 1], "mc_samples": 0}, "mc_samples=0 must be >= 1"),
        ({"example_index": [0, 1, 2]}, "example_index has 3 entries for a batch of 2"),
        ({"example_index": [0, 1], "seed": -1}, r"seed=-1 must be in \[0, 2\*\*63\)"),
    ],
)
def test_misconfiguration(kwargs, match):
    logits = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        fisher_backward(logits, **kwargs)


def test_backward_to_tracked_outputs_matches_full_backward_and_leaves_grads_alone():
    """``inputs=tracker.take_outputs()`` gives the same factors without touching any ``.grad``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    x = torch.randn(10, 6, dtype=torch.float64)
    results = []
    for use_inputs in (False, True):
        model.zero_grad(set_to_none=True)
        with KFACTracker(model, ["0", "2"], dtype=torch.float64, record_outputs=use_inputs) as tracker:
            logits = model(x)
            outputs = tracker.take_outputs() if use_inputs else None
            fisher_backward(logits, seed=3, example_index=torch.arange(10), mc_samples=2, inputs=outputs)
        results.append(tracker.finalize(reduce_across_ranks=False))
        grads = [p.grad for p in model.parameters()]
        assert all(g is None for g in grads) == use_inputs
    for name in ("0", "2"):
        torch.testing.assert_close(results[0][name].G, results[1][name].G, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(results[0][name].A, results[1][name].A, rtol=1e-12, atol=1e-14)
