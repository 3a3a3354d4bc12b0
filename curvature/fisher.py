"""Targets and losses for the Fisher backward passes that feed ``G``.

Fisher types (the argument ``fisher`` here, in ``FactorSettings`` and in stored factor files):

* ``sampled`` (the true Fisher, Monte-Carlo): targets ``y ~ p_θ(y | x)`` drawn from the model's own
  softmax, ``mc_samples`` independent draws per position. Each draw gets its own backward pass, so the
  tracker adds ``g_d g_dᵀ`` per draw and ``G`` is the average over draws of ``g gᵀ`` (never ``(Σg)(Σg)ᵀ``).
* ``empirical``: the data labels are the targets (one backward pass; ``mc_samples`` must be 1).

Loss. ``fisher_loss`` is the SUM of the cross-entropy over examples and counted positions (not the mean),
so the gradient reaching a layer at a position is that example's own per-position gradient ``g``,
independent of the batch size. Positions excluded by ``mask`` (or labelled ``ignore_index``) contribute
no loss; tell the tracker the same positions (``KFACTracker.set_mask``) so they are not counted either.

Seeding. Draws are counter-based: a position's uniform number is a fixed hash of ``(seed, example index,
position, draw)`` (32-bit "lowbias32" integer hash, two streams combined into a 53-bit float), turned
into a class by inverse-CDF sampling on the float64 softmax. A draw therefore depends only on that
example's logits and its global ``example_index`` — never on the batch size, the batch composition, the
padded length (for right padding; the position is the index in the given tensor), the device or the
rank. Bits are identical run to run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from memcurve.utils.arguments import check_choice

FISHER_TYPES = ("sampled", "empirical")

_MASK32 = 0xFFFFFFFF
_ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # float64 softmax chunk: 32 MiB, bounds memory for LM vocabularies


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow (16-bit halves)."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """Chris Wellons' lowbias32 integer hash: a bijection of [0, 2**32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _split64(value: Tensor) -> tuple[Tensor, Tensor]:
    return value & _MASK32, (value >> 32) & _MASK32


def uniforms(seed: int, example_index: Tensor, positions: int, draws: int) -> Tensor:
    """Float64 uniforms in [0, 1) of shape ``[draws, B, positions]`` keyed by (seed, example, position, draw)."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed} must be in [0, 2**63)")
    idx = example_index.to(torch.int64)
    if (idx < 0).any():
        raise ValueError("example_index must be non-negative")
    dev = idx.device
    s_lo, s_hi = seed & _MASK32, (seed >> 32) & _MASK32
    h = _hash32(torch.full_like(idx, 0x9E3779B9 ^ s_lo))
    h = _hash32(h ^ s_hi)
    e_lo, e_hi = _split64(idx)
    h = _hash32(_hash32(h ^ e_lo) ^ e_hi)  # [B]
    pos = torch.arange(positions, dtype=torch.int64, device=dev)
    h = _hash32(h[:, None] ^ pos[None, :])  # [B, P]
    d = torch.arange(draws, dtype=torch.int64, device=dev)
    h = _hash32(h[None] ^ d[:, None, None])  # [D, B, P]
    hi = _hash32(h ^ 0x68E31DA4) >> 5  # 27 bits
    lo = _hash32(h ^ 0xB5297A4D) >> 6  # 26 bits
    return (hi * 67108864 + lo).to(torch.float64) / 9007199254740992.0  # (hi·2^26 + lo) / 2^53


def sample_targets(logits: Tensor, *, seed: int, example_index: Tensor | Sequence[int], mc_samples: int = 1) -> Tensor:
    """Draw ``mc_samples`` targets per position from ``softmax(logits)``; returns int64 ``[mc, *logits.shape[:-1]]``.

    ``logits`` is ``[B, C]`` or ``[B, *, C]``; ``example_index`` [B] holds each example's global index in the
    data set (see the module docstring for why draws do not depend on the batch).
    """
    if logits.dim() < 2:
        raise ValueError(f"logits must be [batch, ..., classes], got shape {tuple(logits.shape)}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples} must be >= 1")
    B, C = logits.shape[0], logits.shape[-1]
    idx = torch.as_tensor(example_index, dtype=torch.int64, device=logits.device).reshape(-1)
    if idx.numel() != B:
        raise ValueError(f"example_index has {idx.numel()} entries for a batch of {B}")
    flat = logits.detach().reshape(B, -1, C)
    P = flat.shape[1]
    u = uniforms(seed, idx, P, mc_samples).reshape(mc_samples, B * P).T  # [rows, mc]
    flat = flat.reshape(B * P, C)
    out = torch.empty(B * P, mc_samples, dtype=torch.int64, device=logits.device)
    step = max(1, _ROWS_PER_CHUNK_ELEMENTS // C)
    for start in range(0, B * P, step):
        cdf = torch.softmax(flat[start : start + step].to(torch.float64), dim=-1).cumsum(dim=-1)
        # scale u by the last cdf entry: rounding can leave it below 1, and this keeps zero-probability
        # classes (flat cdf steps) impossible to draw
        values = (u[start : start + step] * cdf[:, -1:]).contiguous()
        out[start : start + step] = torch.searchsorted(cdf, values, right=True).clamp_(max=C - 1)
    return out.T.reshape(mc_samples, *logits.shape[:-1])


def fisher_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Sum over examples and positions of the cross-entropy (computed in float32 or better).

    ``mask`` (bool, shape ``logits.shape[:-1]``) excludes positions; so do targets equal to ``ignore_index``.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(dtype),
        targets.reshape(-1).long(),
        reduction="none",
        ignore_index=ignore_index,
    )
    if mask is not None:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")
        losses = torch.where(mask.reshape(-1).to(torch.bool), losses, losses.new_zeros(()))
    return losses.sum()


def _backward(loss: Tensor, inputs: Sequence[Tensor] | None, retain_graph: bool) -> None:
    if inputs is None:
        loss.backward(retain_graph=retain_graph)
    elif inputs:
        torch.autograd.grad(loss, list(inputs), retain_graph=retain_graph, allow_unused=True)


def fisher_backward(
    logits: Tensor,
    *,
    fisher: str = "sampled",
    labels: Tensor | None = None,
    seed: int = 0,
    example_index: Tensor | Sequence[int] | None = None,
    mc_samples: int = 1,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    inputs: Sequence[Tensor] | None = None,
) -> Tensor:
    """Run the backward pass(es) of the Fisher loss; returns the detached loss averaged over draws (for logging).

    ``sampled``: ``mc_samples`` backward passes, one per draw (the graph is retained between them).
    ``empirical``: one backward pass with ``labels``.

    Without ``inputs`` parameter ``.grad`` fields accumulate as usual (zero them afterwards if the model is
    trained later). With ``inputs`` (e.g. ``KFACTracker.take_outputs()``, the tracked layers' outputs) the
    gradient is computed only down to those tensors with ``torch.autograd.grad``: no ``.grad`` is touched and
    no weight gradient is computed, which is all the tracker's output hooks need.
    """
    check_choice("fisher", fisher, FISHER_TYPES)
    if fisher == "empirical":
        if labels is None:
            raise ValueError("fisher='empirical' needs labels (the data targets)")
        if mc_samples != 1:
            raise ValueError(
                f"mc_samples={mc_samples}: the empirical Fisher uses the fixed labels, mc_samples must be 1"
            )
        loss = fisher_loss(logits, labels, mask, ignore_index)
        _backward(loss, inputs, retain_graph=False)
        return loss.detach()
    if example_index is None:
        raise ValueError("fisher='sampled' needs example_index (each example's global index, for seeding)")
    targets = sample_targets(logits, seed=seed, example_index=example_index, mc_samples=mc_samples)
    total = logits.new_zeros((), dtype=torch.float64)
    for d in range(mc_samples):
        loss = fisher_loss(logits, targets[d], mask, ignore_index)
        _backward(loss, inputs, retain_graph=d < mc_samples - 1)
        total += loss.detach()
    return total / mc_samples
