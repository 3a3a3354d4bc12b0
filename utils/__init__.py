"""Shared utilities, one copy each: atomic writes, argument checks, rank helpers, evaluation shard samplers.

The lowest floor of memcurve: imports nothing else of it (and nothing of Lightning or transformers).
"""

from memcurve.utils.arguments import check_choice, check_positive_int
from memcurve.utils.distributed import all_reduce_tensors, comm_device, is_distributed, rank_and_world
from memcurve.utils.files import atomic_write
from memcurve.utils.sampling import UnpaddedDistributedSampler, unpadded_shard_sampler

__all__ = [
    "UnpaddedDistributedSampler",
    "all_reduce_tensors",
    "atomic_write",
    "check_choice",
    "check_positive_int",
    "comm_device",
    "is_distributed",
    "rank_and_world",
    "unpadded_shard_sampler",
]
