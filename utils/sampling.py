"""Evaluation shards: every example exactly once across ranks, in order, with no padding."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["UnpaddedDistributedSampler", "loader_like", "unpadded_shard_sampler"]


def loader_like(
    loader: DataLoader, dataset: Dataset, batch_size: int | None = None, sampler: Sampler | None = None
) -> DataLoader:
    """``dataset`` read in order the way ``loader`` reads its own: its batch size (or ``batch_size``), workers,
    collate function and pinning; never shuffled, no batch dropped (``sampler``: e.g. one rank's shard)."""
    return DataLoader(
        dataset,
        batch_size=batch_size or loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1,
        sampler=sampler,
        shuffle=False,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
        persistent_workers=loader.persistent_workers,
    )


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r reads examples r, r+W, r+2W, ... in order, with no padding.

    The stock DistributedSampler repeats examples to even out the shards, which would count them twice in
    summed metric states; evaluation needs every example exactly once. Subclassing DistributedSampler keeps
    Lightning from injecting its own sampler.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def unpadded_shard_sampler(dataset: Dataset, trainer: Any = None) -> UnpaddedDistributedSampler | None:
    """This rank's unpadded shard when the ``trainer`` (or else an initialised process group) spans several
    processes; None for a single process."""
    if trainer is not None and trainer.world_size > 1:
        return UnpaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return UnpaddedDistributedSampler(dataset, dist.get_world_size(), dist.get_rank())
    return None
