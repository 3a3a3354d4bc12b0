"""Rank helpers and cross-rank tensor sums on any backend (gloo included; never dependent on CUDA).

Communication device: NCCL needs CUDA tensors, gloo is used with CPU tensors, any other backend string
(e.g. ``"cpu:gloo,cuda:nccl"``) gets the tensors where they are. Results are copied back to the device
the inputs live on.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_tensors", "comm_device", "is_distributed", "rank_and_world"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with a world size above one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.device:
    """The device collectives of ``group``'s backend need (CUDA for NCCL, CPU for gloo, else where ``tensor`` is)."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return tensor.device


def all_reduce_tensors(*tensors: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, ...]:
    """Sum the tensors over all ranks in one collective (any backend; a no-op on a single process).

    Returns new tensors on the devices of the inputs; every rank must call this collectively.
    """
    if not is_distributed() or not tensors:
        return tensors
    device = comm_device(tensors[0], group)
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.device))
        start += t.numel()
    return tuple(out)
