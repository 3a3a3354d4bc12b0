"""Sharded parameters (FSDP2's ``fully_shard``, FSDP1): shard a model's repeated blocks, tell whether a module or a
strategy shards its parameters, and read a parameter whole.

memcurve's LightningModules call :func:`fully_shard_blocks` from ``configure_model`` when Lightning's
``ModelParallelStrategy`` lends them a device mesh; any other module can do the same in its own ``configure_model``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "fully_shard_blocks",
    "parameters_sharded",
    "repeated_blocks",
    "shards_parameters",
    "single_process_copy",
    "whole",
    "whole_parameters",
]


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model``: the children of the ``nn.ModuleList`` / ``nn.Sequential`` whose children are all of one
    class and which holds the most parameters (a transformer's decoder layers, a ViT's blocks); ``[]`` if none."""
    best: list[nn.Module] = []
    best_size = 0
    for module in model.modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = list(module), size
    return best


def fully_shard_blocks(
    model: nn.Module, mesh: Any, blocks: Sequence[nn.Module] | None = None, **options: Any
) -> nn.Module:
    """FSDP2: ``fully_shard`` each block (default :func:`repeated_blocks`), then ``model`` itself, over ``mesh``.

    Each block's parameters are gathered for its own forward and backward only; the root call gathers what is left
    (embeddings, final norm, head) around the whole forward. Module names do not change (FSDP2 swaps classes, not
    modules), so layer patterns, factor files and checkpoints keep their names. ``options`` go to ``fully_shard``
    (``mp_policy``, ``reshard_after_forward``, ...)."""
    from torch.distributed.fsdp import fully_shard

    for block in repeated_blocks(model) if blocks is None else blocks:
        fully_shard(block, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


def _is_dtensor(tensor: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def parameters_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters that are shards (FSDP2 ``DTensor`` parameters, FSDP1 flat parameters or
    wrappers): such a module cannot be copied and run on one process."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        FullyShardedDataParallel = ()
    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        return True
    return any(_is_dtensor(p) or getattr(p, "_is_flat_param", False) for p in module.parameters())


def shards_parameters(strategy: Any) -> bool:
    """Whether a Lightning strategy shards the module's parameters (FSDP, FSDP2 through ``ModelParallelStrategy``,
    DeepSpeed): its live module cannot be copied for single-process work once the strategy has set it up."""
    name = type(strategy).__name__
    return any(kind in name for kind in ("FSDP", "ModelParallel", "DeepSpeed"))


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in full: a ``DTensor`` (an FSDP2 parameter outside its forward) gathered, anything else as is.
    A collective for a ``DTensor``: every rank of its mesh must call it."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def single_process_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` to run on one process: outside inference mode (a copy made in a validation hook must
    not hold inference tensors) and without the device mesh ``ModelParallelStrategy`` lent the original, so its
    ``configure_model`` does not shard it again under the single-device Trainer that runs it."""
    if parameters_sharded(module):
        raise ValueError(
            f"{type(module).__name__}'s parameters are sharded (FSDP): a copy would hold shards, not the model; copy "
            "it before the strategy shards it"
        )
    with torch.inference_mode(False), torch.no_grad():
        duplicate = copy.deepcopy(module)
    if getattr(duplicate, "_device_mesh", None) is not None:
        duplicate._device_mesh = None
    return duplicate


@contextlib.contextmanager
def whole_parameters(module: nn.Module) -> Iterator[None]:
    """Within: the parameters of FSDP1 units in ``module`` are whole (``summon_full_params``, no write-back), with
    their original shapes; pass the root wrapper (a Lightning strategy's ``model``) to gather every unit. A
    collective: every rank must enter. FSDP2 parameters stay ``DTensor``s (their ``shape`` is already the whole
    shape; :func:`whole` gathers values); anything else: nothing happens."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        yield
        return
    if not any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(module, writeback=False):
        yield
