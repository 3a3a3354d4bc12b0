"""The one scorer of edits: the same metrics on the unedited and on the edited weights, for any LightningModule.

Contract, in order:

1. **``evaluation_metrics``** (optional, richer): a module that defines
   ``evaluation_metrics(datamodule, shard=False, reference_state_dict=None) -> {metric: float}`` is scored by it;
   ``evaluation_metrics(datamodule)`` alone is enough. ``shard=False`` is passed when the signature names ``shard``
   (or takes ``**kwargs``): one process scores all the data alone, so a DDP run reports the single-process figures.
   ``reference_state_dict`` is passed when named: metrics relative to the unedited model (the LM's nDCG) get the
   ORIGINAL weights. ``datamodule`` is the run's DataModule (None when the loaders were passed to ``fit``).
2. **The module's own validation loop** (the default, any module with a ``validation_step``): a separate
   single-device ``Trainer`` (no logger, no checkpoints, no callbacks, no progress bar; the live Trainer's device,
   precision, ``inference_mode`` and a non-zero ``limit_val_batches``) runs ``validate`` on a private copy of the
   module loaded with the original and then with each edited state dict, and every metric the module logs there
   (the dict ``Trainer.validate`` returns, one merged dict for several loaders) is the score. The validation data
   is the live Trainer's (``trainer.val_dataloaders`` — the DataModule's or the loaders passed to ``fit`` /
   ``validate`` — without a distributed sampler, so the whole set is scored), else the DataModule's
   ``val_dataloader()``. ``memcurve prune`` / ``compare`` have no running Trainer: they use the DataModule. The
   scoring Trainer runs no callback of the run or of the module, but lends it the run's DataModule:
   ``self.trainer.datamodule`` works in the module's validation hooks (no ``setup`` / ``teardown`` runs on it).

Either way the scored copy is made once per :class:`Scorer` (``copy.deepcopy``; the live model, its weights, its
train/eval mode and its Trainer are never touched), the unedited weights are scored once per checkpoint, and the
random-number state of the live run (torch, CUDA, numpy, random) is the same after scoring as before, so a run with
a pruning callback trains exactly like one without. A module with neither method, or with no validation data, is
refused by :func:`check_scorable` (the pruning callbacks call it in ``setup``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.trainer.connectors.data_connector import _DataHookSelector
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from memcurve.utils.sampling import loader_like
from memcurve.utils.sharding import parameters_sharded, single_process_copy

__all__ = ["Scorer", "check_scorable", "scores_by_validation", "validation_dataloaders"]

PRECISIONS = ("64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed")  # passed on to the copy
_QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric")


def scores_by_validation(module: Any) -> bool:
    """True when ``module`` is scored by its validation loop (it has no ``evaluation_metrics``)."""
    return not callable(getattr(module, "evaluation_metrics", None))


def check_scorable(
    module: Any, argument: str = "evaluate", *, trainer: pl.Trainer | None = None, datamodule: Any = None
) -> None:
    """Refuse (naming ``argument`` and the fix) a module that cannot be scored: neither ``evaluation_metrics`` nor a
    ``validation_step``, or (validation loop) no validation data in ``trainer`` / ``datamodule`` where that can be
    told before the run, or a module whose parameters are sharded (FSDP, FSDP2) and so cannot be copied."""
    name = type(module).__name__
    if parameters_sharded(module):
        raise ValueError(
            f"{argument}=True: {name}'s parameters are sharded (FSDP), so it cannot be copied and scored on one "
            f"process; score an unsharded copy made before the strategy sharded it (the pruning callbacks keep one "
            f"from setup), or pass {argument}=False"
        )
    if not scores_by_validation(module):
        return
    if not isinstance(module, pl.LightningModule) or not is_overridden("validation_step", module):
        raise TypeError(
            f"{argument}=True scores {name} with its own validation loop, but it has no validation_step; define "
            f"validation_step (logging its metrics) or evaluation_metrics(datamodule) -> dict, or pass {argument}=False"
        )
    if _validation_data_defined(trainer, datamodule) is False:
        raise ValueError(
            f"{argument}=True scores {name} with its own validation loop, but the run has no validation data; give "
            f"val_dataloaders to fit / validate, a DataModule with val_dataloader(), or pass {argument}=False"
        )


def _validation_data_defined(trainer: pl.Trainer | None, datamodule: Any) -> bool | None:
    """Whether the run has validation data (None: cannot tell)."""
    sources = []
    if trainer is not None:
        fn = getattr(trainer.state, "fn", None)
        loop = trainer.validate_loop if fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
        source = getattr(loop, "_data_source", None)  # what fit/validate were given (loaders, DataModule or module)
        if source is not None and getattr(source, "instance", None) is not None:
            sources.append(bool(source.is_defined()))
    if datamodule is not None:
        sources.append(_has_val_dataloader(datamodule))
    return any(sources) if sources else None


def _has_val_dataloader(datamodule: Any) -> bool:
    if isinstance(datamodule, pl.LightningDataModule):
        return is_overridden("val_dataloader", datamodule)
    return callable(getattr(datamodule, "val_dataloader", None))


def validation_dataloaders(trainer: pl.Trainer | None = None, datamodule: Any = None) -> list[DataLoader]:
    """The validation loaders a scorer runs: the live Trainer's (a distributed sampler replaced by the whole set in
    order), else ``datamodule.val_dataloader()``, else the source the Trainer was given; ``[]`` when there is none."""
    loaders: Any = None
    if trainer is not None:
        loaders = trainer.val_dataloaders
    if loaders is None and datamodule is not None and _has_val_dataloader(datamodule):
        loaders = datamodule.val_dataloader()
    if loaders is None and trainer is not None:
        fn = getattr(trainer.state, "fn", None)
        loop = trainer.validate_loop if fn == "validate" else trainer.fit_loop.epoch_loop.val_loop
        source = getattr(loop, "_data_source", None)
        if source is not None and getattr(source, "instance", None) is not None and source.is_defined():
            loaders = source.dataloader()
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, Sequence):
        loaders = [loaders]
    return [_unsharded(loader) for loader in loaders]


def _unsharded(loader: Any) -> Any:
    """``loader`` without a ``DistributedSampler`` (what Lightning injects under DDP): the whole set, in order."""
    if not isinstance(loader, DataLoader) or not isinstance(getattr(loader, "sampler", None), DistributedSampler):
        return loader
    return loader_like(loader, loader.dataset)


@contextlib.contextmanager
def _preserved_random_state() -> Iterator[None]:
    """Leave torch (CPU and CUDA), numpy and ``random`` as they were: scoring must not shift the live run's draws
    (creating a DataLoader iterator draws a seed from torch's global generator)."""
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No device banner and no "few workers" advice from the scoring Trainer (the live run printed its own)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # torch vs Lightning
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _LentDataModule(pl.Callback):
    """Lends the live run's DataModule to the scoring Trainer: ``trainer.datamodule`` (validation hooks read it, e.g.
    a memorization pass at epoch end) and its batch-transfer hooks, without attaching it — no ``prepare_data`` /
    ``setup`` / ``teardown`` run on it and its ``trainer`` stays the live one."""

    def __init__(self, datamodule: Any) -> None:
        self.datamodule = datamodule

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer.datamodule = self.datamodule  # after the DataModule's own setup hook would have run (it had none)
        connector = getattr(trainer, "_data_connector", None)
        if connector is not None and hasattr(connector, "_datahook_selector"):
            connector._datahook_selector = _DataHookSelector(pl_module, self.datamodule)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.datamodule = None  # before the teardown hooks: the live DataModule is not torn down

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        trainer.datamodule = None


def _unsynced(module: nn.Module) -> None:
    """A torchmetrics ``Metric`` of the copy computes on this process alone: under DDP only global rank zero scores,
    and a cross-process gather there would wait forever for the other ranks."""
    for child in module.modules():
        if hasattr(child, "_to_sync") and hasattr(child, "sync_on_compute"):
            child.sync_on_compute = False
            child._to_sync = False


class Scorer:
    """Scores state dicts with a private copy of ``module`` (see the module docstring for the contract).

    Args:
        module: the LightningModule (the live one is fine: it is copied, never modified).
        datamodule: the run's DataModule (``evaluation_metrics``' argument; validation data when there is no
            running ``trainer``; lent to the scoring Trainer). With ``loaders``, None lends no DataModule at all.
        trainer: the live Trainer, if any: its device, precision and limits are used (and its validation data
            unless ``loaders`` are given).
        loaders: score on exactly these loaders through the module's validation loop, even if it defines
            ``evaluation_metrics`` — how the held-out protocol scores one split (``selection`` sees nothing else).
    """

    def __init__(
        self,
        module: nn.Module,
        datamodule: Any = None,
        trainer: pl.Trainer | None = None,
        *,
        loaders: Sequence[Any] | None = None,
    ) -> None:
        if datamodule is None and trainer is not None and loaders is None:
            datamodule = trainer.datamodule
        if loaders is not None:  # these loaders, through the validation loop, whatever else the module offers
            if not isinstance(module, pl.LightningModule) or not is_overridden("validation_step", module):
                raise TypeError(
                    f"scoring {type(module).__name__} on given loaders (a held-out split) runs its validation loop, "
                    "but it has no validation_step; define one that logs the budget's metric"
                )
            if not loaders:
                raise ValueError("scoring on given loaders needs at least one loader")
        else:
            check_scorable(module, trainer=trainer, datamodule=datamodule)
        self.module = single_process_copy(module)
        if hasattr(self.module, "_metric_attributes"):
            # Lightning caches id(metric) -> attribute name during fit; the copy's metrics have other ids.
            self.module._metric_attributes = None
        self.datamodule = datamodule
        self.trainer = trainer
        self.by_validation = loaders is not None or scores_by_validation(module)
        self._loaders: list[Any] | None = list(loaders) if loaders is not None else None
        if self.by_validation:
            self.module.configure_callbacks = lambda: []  # the scoring Trainer runs no callback of the module's
            _unsynced(self.module)
            self._relative = self._shard = False
        else:
            parameters = inspect.signature(self.module.evaluation_metrics).parameters
            keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
            self._relative = "reference_state_dict" in parameters
            self._shard = "shard" in parameters or keywords
        self._before: dict[str, float] | None = None
        self._before_of: Mapping[str, Any] | None = None  # the state dict ``_before`` scores

    def __call__(self, state_dict: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float]:
        with torch.inference_mode(False), torch.no_grad():
            self.module.load_state_dict(state_dict)
        if self.by_validation:
            return self._validate()
        kwargs: dict[str, Any] = {"shard": False} if self._shard else {}
        if self._relative:
            kwargs["reference_state_dict"] = reference
        return {key: float(value) for key, value in self.module.evaluation_metrics(self.datamodule, **kwargs).items()}

    def before(self, original: Mapping[str, Any]) -> dict[str, float]:
        if self._before is None or self._before_of is not original:
            self._before, self._before_of = self(original, original), original
        return dict(self._before)

    # -- the validation loop -------------------------------------------------------------------------------
    def loaders(self) -> list[Any]:
        if self._loaders is None:
            self._loaders = validation_dataloaders(self.trainer, self.datamodule)
            if not self._loaders:
                raise ValueError(
                    f"evaluate=True scores {type(self.module).__name__} with its own validation loop, but there is no "
                    "validation data: no val_dataloaders in the Trainer and no datamodule.val_dataloader(); give one, "
                    "or define evaluation_metrics, or pass evaluate=False"
                )
        return self._loaders

    def scoring_trainer(self) -> pl.Trainer:
        """A fresh single-device Trainer on the live run's device (CPU without one)."""
        live = self.trainer
        device = live.strategy.root_device if live is not None else torch.device("cpu")
        options: dict[str, Any] = {}
        if live is not None:
            if live.precision in PRECISIONS:
                options["precision"] = live.precision
            options["inference_mode"] = live.validate_loop.inference_mode
            limit = live.limit_val_batches
            if limit not in (0, 0.0, None):
                options["limit_val_batches"] = limit
        return pl.Trainer(
            accelerator=device.type,
            strategy=SingleDeviceStrategy(device=device),
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[_LentDataModule(self.datamodule)] if isinstance(self.datamodule, pl.LightningDataModule) else [],
            num_sanity_val_steps=0,
            **options,
        )

    def _validate(self) -> dict[str, float]:
        loaders = self.loaders()
        with _preserved_random_state(), _quiet(), torch.inference_mode(False):
            results = self.scoring_trainer().validate(
                self.module, dataloaders=loaders if len(loaders) > 1 else loaders[0], verbose=False
            )
        merged: dict[str, float] = {}
        for result in results:
            merged.update({key: float(value) for key, value in result.items()})
        if not merged:
            raise ValueError(
                f"evaluate=True: {type(self.module).__name__}'s validation loop logged no metric (self.log in "
                "validation_step or on_validation_epoch_end); log one, or pass evaluate=False"
            )
        return merged
