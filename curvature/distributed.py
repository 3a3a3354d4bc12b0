"""Cross-rank reduction of K-FAC sums and counts.

The reduction runs whenever ``torch.distributed`` is initialised with more than one rank, on any backend
(gloo included; it never depends on CUDA being available). Sums and counts are summed, and only then
divided (``LayerSums.normalize``), so every rank ends with the factors of the union of all ranks' data:
``A = Σ_ranks A_sum / Σ_ranks count_A``. Before reducing, the ranks check that they hold the same layers
with the same shapes and dtypes, so a mismatch fails with a message instead of a hang or garbage.

Communication device: NCCL needs CUDA tensors, gloo is used with CPU tensors, any other backend string
(e.g. ``"cpu:gloo,cuda:nccl"``) gets the tensors where they are. Results are copied back to the device
the sums live on.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from memcurve.curvature.tracker import LayerSums


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with a world size above one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return tensor.device


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
    device = _comm_device(out[names[0]].A_sum, group)
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


def all_reduce_tensors(*tensors: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, ...]:
    """Sum the tensors over all ranks in one collective (any backend; a no-op on a single process).

    Returns new tensors on the devices of the inputs; every rank must call this collectively.
    """
    if not is_distributed() or not tensors:
        return tensors
    device = _comm_device(tensors[0], group)
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.device))
        start += t.numel()
    return tuple(out)
