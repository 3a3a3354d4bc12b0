"""One owning rank per layer, and the reduction of every layer's sums onto its owner.

Owners (:func:`assign_owners`). Greedy least-loaded, largest layer first (Graham's LPT rule): layers sorted by
size (``d_in² + d_out²`` elements) descending, ties by name, each to the rank with the smallest load so far
(ties: the lowest rank). With equal sizes — gate and up projections of one model — this is exactly
round-robin (EleutherAI's bergson assigns round-robin by size); with unequal sizes plain round-robin can be far
from balanced (sizes 5, 4, 3, 3, 3 on two ranks: 11 vs 7), LPT is within 4/3 of the best split. Deterministic:
every rank computes the same owners from the same layer shapes, nothing is communicated.

The reduction (:func:`reduce_to_owners`) sends each layer to ONE owning rank (``torch.distributed.reduce``, on any
backend, gloo included), so after it a rank holds only the layers it owns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from memcurve.curvature.sums import FACTORS, LayerSums
from memcurve.utils.distributed import comm_device, is_distributed

__all__ = ["assign_owners", "check_owners", "reduce_to_owners"]


def assign_owners(layer_sizes: Mapping[str, int], world_size: int) -> dict[str, int]:
    """``{layer: owning rank}``: greedy least-loaded, largest layer first (see the module docstring).

    ``layer_sizes``: any additive measure of what an owner holds, e.g. ``d_A² + d_G²`` elements. The result is
    keyed in the order of ``layer_sizes``.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive integer")
    for name, size in layer_sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"layer {name!r}: size {size!r} must be a non-negative integer")
    load = [0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(layer_sizes, key=lambda n: (-layer_sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += layer_sizes[name]
    return {name: owners[name] for name in layer_sizes}


def check_owners(owners: Mapping[str, int], names: Iterable[str], world_size: int) -> None:
    missing = sorted(set(names) - set(owners))
    if missing:
        raise ValueError(f"owners has no rank for layers {missing}")
    bad = {n: r for n, r in owners.items() if not (isinstance(r, int) and 0 <= r < world_size)}
    if bad:
        raise ValueError(f"owners {bad} are not ranks of a world of size {world_size}")


def reduce_to_owners(
    sums: Mapping[str, LayerSums],
    owners: Mapping[str, int],
    *,
    factors: Sequence[str] = FACTORS,
    group: dist.ProcessGroup | None = None,
) -> dict[str, LayerSums]:
    """Sum every layer's sums and counts over all ranks onto its owner; returns the layers this rank owns.

    One ``torch.distributed.reduce(dst=owner)`` per tensor (the device follows the backend as in
    :mod:`memcurve.utils.distributed`: CUDA for NCCL, CPU for gloo) and one all-reduce of all counts. The
    inputs are not modified; each reduction works on a copy of one tensor, so the extra memory is one matrix.
    Drop the local sums afterwards (non-owners keep nothing). ``factors``: which of ``A_sum`` / ``G_sum`` to
    reduce (the others are passed through as they are, e.g. the 0 x 0 placeholders of a one-factor pass).
    A single process owns everything (the sums are returned as they are). Every rank must call this.
    """
    factors = tuple(factors)
    rank, world_size = (dist.get_rank(group), dist.get_world_size(group)) if is_distributed() else (0, 1)
    check_owners(owners, sums, world_size)
    if world_size == 1:
        return {name: s for name, s in sums.items() if owners[name] == rank}
    names = sorted(sums)
    signature = [
        (n, tuple(sums[n].A_sum.shape), tuple(sums[n].G_sum.shape), str(sums[n].A_sum.dtype), owners[n]) for n in names
    ]
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, signature, group=group)
    for other_rank, other in enumerate(gathered):
        if other != signature:
            raise RuntimeError(
                f"K-FAC sums or owners differ between ranks: rank {rank} has {signature}, rank {other_rank} has {other}"
            )
    if not names:
        return {}
    device = comm_device(sums[names[0]].A_sum, group)
    out: dict[str, LayerSums] = {}
    for name in names:
        owner = owners[name] if group is None else dist.get_global_rank(group, owners[name])
        parts = {}
        for attr in ("A_sum", "G_sum"):
            local = getattr(sums[name], attr)
            if attr[0] not in factors:
                parts[attr] = local
                continue
            buffer = local.to(device, copy=True)
            dist.reduce(buffer, dst=owner, op=dist.ReduceOp.SUM, group=group)
            parts[attr] = buffer.to(local.device) if owners[name] == rank else None
            del buffer
        if owners[name] == rank:
            out[name] = LayerSums(parts["A_sum"], parts["G_sum"], sums[name].count_A, sums[name].count_G)
    counts = torch.stack([c.to(device) for n in names for c in (sums[n].count_A, sums[n].count_G)]).to(torch.int64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    for i, name in enumerate(names):
        if name in out:
            s = out[name]
            s.count_A = counts[2 * i].to(s.count_A.device)
            s.count_G = counts[2 * i + 1].to(s.count_G.device)
    return out
