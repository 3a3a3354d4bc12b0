"""K-FAC accumulators of one layer (sums and counts), their normalisation and their cross-rank reduction.

The reduction runs whenever ``torch.distributed`` is initialised with more than one rank, on any backend
(gloo included; it never depends on CUDA being available). Sums and counts are summed, and only then
divided (``LayerSums.normalize``), so every rank ends with the factors of the union of all ranks' data:
``A = Σ_ranks A_sum / Σ_ranks count_A``. Before reducing, the ranks check that they hold the same layers
with the same shapes and dtypes, so a mismatch fails with a message instead of a hang or garbage.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from memcurve.utils.distributed import comm_device, is_distributed

__all__ = ["FACTORS", "LayerFactors", "LayerSums", "all_reduce_sums", "merge_sums", "normalize_sums"]

FACTORS = ("A", "G")


@dataclass
class LayerSums:
    """Unnormalised accumulators of one layer: ``A_sum = Σ a aᵀ``, ``G_sum = Σ g gᵀ`` and int64 counts."""

    A_sum: Tensor
    G_sum: Tensor
    count_A: Tensor
    count_G: Tensor

    def clone(self) -> LayerSums:
        return LayerSums(self.A_sum.clone(), self.G_sum.clone(), self.count_A.clone(), self.count_G.clone())

    def merged(self, other: LayerSums) -> LayerSums:
        """Sums of two disjoint parts of the data (e.g. two halves, or two ranks)."""
        if self.A_sum.shape != other.A_sum.shape or self.G_sum.shape != other.G_sum.shape:
            raise ValueError(
                f"cannot merge sums of different shapes: A {tuple(self.A_sum.shape)} vs {tuple(other.A_sum.shape)}, "
                f"G {tuple(self.G_sum.shape)} vs {tuple(other.G_sum.shape)}"
            )
        dev = self.A_sum.device
        return LayerSums(
            self.A_sum + other.A_sum.to(dev),
            self.G_sum + other.G_sum.to(dev),
            self.count_A + other.count_A.to(dev),
            self.count_G + other.count_G.to(dev),
        )

    def normalize(self, name: str = "<layer>") -> LayerFactors:
        """``A = A_sum / count_A``, ``G = G_sum / count_G``; raises if either count is zero."""
        count_A, count_G = int(self.count_A), int(self.count_G)
        if count_A == 0:
            raise RuntimeError(
                f"layer {name!r}: no activations were recorded (count_A = 0); did a forward pass "
                "with gradients enabled run inside the tracker, and does the mask keep any position?"
            )
        if count_G == 0:
            raise RuntimeError(
                f"layer {name!r}: no output gradients were recorded (count_G = 0); call backward() "
                "on the Fisher loss inside the tracker (see fisher.fisher_backward)"
            )
        if count_G % count_A != 0:
            warnings.warn(
                f"layer {name!r}: count_G = {count_G} is not a multiple of count_A = {count_A}: some forward passes "
                "had a different number of backward passes than others",
                RuntimeWarning,
                stacklevel=2,
            )
        return LayerFactors(A=self.A_sum / count_A, G=self.G_sum / count_G, count_A=count_A, count_G=count_G)


@dataclass
class LayerFactors:
    """Normalised K-FAC factors of one layer: ``A`` [d_in(+1), d_in(+1)], ``G`` [d_out, d_out] and their counts."""

    A: Tensor
    G: Tensor
    count_A: int
    count_G: int


def merge_sums(*parts: Mapping[str, LayerSums]) -> dict[str, LayerSums]:
    """Layer-wise sum of accumulators from disjoint parts of the data (same layers in every part)."""
    if not parts:
        raise ValueError("merge_sums needs at least one mapping of sums")
    names = set(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if set(part) != names:
            raise ValueError(f"part {i} has layers {sorted(part)}, part 0 has {sorted(names)}")
    out = {name: s.clone() for name, s in parts[0].items()}
    for part in parts[1:]:
        for name in names:
            out[name] = out[name].merged(part[name])
    return out


def normalize_sums(sums: Mapping[str, LayerSums]) -> dict[str, LayerFactors]:
    """``{name: LayerFactors}`` from (already reduced) sums."""
    return {name: s.normalize(name) for name, s in sums.items()}


def all_reduce_sums(sums: Mapping[str, LayerSums], group: dist.ProcessGroup | None = None) -> dict[str, LayerSums]:
    """Sum ``A_sum``, ``G_sum`` and the counts of every layer over all ranks (a no-op on a single process).

    Returns new ``LayerSums`` (the inputs are not modified). Every rank must call this collectively.
    """
    out = {name: s.clone() for name, s in sums.items()}
    if not is_distributed():
        return out
    names = sorted(out)
    signature = [(n, tuple(out[n].A_sum.shape), tuple(out[n].G_sum.shape), str(out[n].A_sum.dtype)) for n in names]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, signature, group=group)
    for rank, other in enumerate(gathered):
        if other != signature:
            raise RuntimeError(
                f"K-FAC sums differ between ranks: rank {dist.get_rank(group)} has {signature}, rank {rank} has {other}"
            )
    if not names:
        return out
    device = comm_device(out[names[0]].A_sum, group)
    for name in names:
        s = out[name]
        for attr in ("A_sum", "G_sum"):
            local = getattr(s, attr)
            buffer = local.to(device)
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
            setattr(s, attr, buffer.to(local.device))
    # all counts in one int64 tensor: one collective instead of 2 per layer
    counts = torch.stack([c.to(device) for n in names for c in (out[n].count_A, out[n].count_G)]).to(torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    for i, name in enumerate(names):
        s = out[name]
        s.count_A = counts[2 * i].to(s.count_A.device)
        s.count_G = counts[2 * i + 1].to(s.count_G.device)
    return out
