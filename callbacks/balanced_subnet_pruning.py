"""BalancedSubnetPruning: the supervised baseline — a learned binary weight mask that forgets the memorized set.

BalancedSubnet (Sakarvadia et al., 2025) trains scores for every weight of the selected ``nn.Linear`` layers; the
forward pass drops the ``ratio`` fraction of each layer's weights with the smallest ``|score|`` (straight-through
estimator), the weights stay frozen, and the scores minimise ``−(1 − w)·L_forget + w·L_retain`` (forget = the
memorized examples, retain = clean data). The maths is in :mod:`memcurve.curvature.balanced_subnet`.

Unlike K-FAC editing, BalancedSubnet must be told which examples are memorized. The LightningModule provides the
data and the loss through two methods:

* ``balanced_subnet_data(datamodule, batch_size, max_forget=None, max_retain=None, seed=0) -> (forget, retain)``:
  sized re-iterable loaders (the noisy-label classifier: noised training examples with their noisy labels, and
  clean training examples);
* ``balanced_subnet_loss(batch) -> Tensor``: the mean loss of one batch (moving it to the module's device).

The mask is trained on a deep copy of the module loaded with the checkpoint's weights (never the live model), one
training per ratio, and exported like the other edits (see
:class:`~memcurve.callbacks.checkpoint_pruning.CheckpointPruning`): ``<name>-bsn-r<ratio>.ckpt`` beside the
original (which is kept), before/after metrics, report rows with ``method="balanced_subnet"`` and
``keep_fraction = 1 − ratio`` (kept pairs = unmasked weights). TensorBoard: ``prune/balanced_subnet/<metric>`` with
the pruned fraction in basis points (ratio · 10⁴) as the step (0 = unedited), and
``prune/balanced_subnet/{forget_loss,retain_loss}`` per mask-training epoch.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from memcurve.callbacks.checkpoint_pruning import CheckpointPruning, PruningRow, PruningSpec
from memcurve.curvature.balanced_subnet import (
    BSN_METHOD,
    SCORE_INITS,
    apply_masks,
    check_ratio,
    mask_edits,
    train_balanced_subnet,
)
from memcurve.utils.arguments import check_positive_int

__all__ = ["BalancedSubnetPruning"]

REQUIRED_METHODS = ("balanced_subnet_data", "balanced_subnet_loss")


def _check_range(name: str, value: Any, low: float, high: float = math.inf, open_low: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{name}={value!r} must be a number in {'(' if open_low else '['}{low}, {high}]")
    return float(value)


class BalancedSubnetPruning(CheckpointPruning):
    """Learn a BalancedSubnet mask at checkpoint time (the live model and the original file stay untouched).

    Args:
        layers: module-name patterns of the ``nn.Linear`` layers to mask (the paper: the MLP matrices).
        ratio: fraction(s) of each layer's weights to prune, each in (0, 1); one mask and checkpoint per value
            (paper's best: 0.0015).
        retain_weight: ``w`` of ``−(1 − w)·L_forget + w·L_retain``, in [0, 1] (paper's best: 0.7).
        epochs: mask-training epochs (one epoch = one pass over the longer of the forget and retain loaders).
        lr, momentum, weight_decay: SGD on the scores (original: 0.3 in the paper's best run, 0.9, 5e-4).
        batch_size: batch size of the forget and of the retain loader (original: 64).
        max_forget, max_retain: train on random subsets of at most this many forget / retain examples.
        score_init: ``kaiming`` (the original code: random scores) or ``magnitude`` (scores = |W|).
        seed: seeds the score initialisation, the subsets and the shuffling.
        when, evaluate, output_dir, save_pruned: see CheckpointPruning.
    """

    def __init__(
        self,
        layers: list[str],
        ratio: float | list[float] = 0.0015,
        retain_weight: float = 0.7,
        epochs: int = 5,
        lr: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 64,
        max_forget: int | None = None,
        max_retain: int | None = None,
        score_init: str = "kaiming",
        seed: int = 0,
        when: str = "checkpoint",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
    ) -> None:
        ratios = [ratio] if isinstance(ratio, numbers.Real) else list(ratio or [])
        if not ratios:
            raise ValueError(f"ratio={ratio!r} is empty: give the fraction(s) of each layer's weights to prune")
        ratios = [check_ratio(value) for value in ratios]
        self.retain_weight = _check_range("retain_weight", retain_weight, 0.0, 1.0)
        check_positive_int("epochs", epochs)
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_forget", max_forget, allow_none=True)
        check_positive_int("max_retain", max_retain, allow_none=True)
        self.lr = _check_range("lr", lr, 0.0, open_low=True)
        self.momentum = _check_range("momentum", momentum, 0.0)
        self.weight_decay = _check_range("weight_decay", weight_decay, 0.0)
        if score_init not in SCORE_INITS:
            raise ValueError(f"score_init={score_init!r} is not supported; choose one of {SCORE_INITS}")
        super().__init__(
            BSN_METHOD, layers, keep_fraction=[1.0 - value for value in ratios], when=when, evaluate=evaluate,
            output_dir=output_dir, save_pruned=save_pruned,
        )  # fmt: skip
        # The exact ratio of each spec (1 − (1 − r) is not always r in floating point).
        self.ratios = dict(zip(self.specs, ratios))
        self.epochs = epochs
        self.batch_size = batch_size
        self.max_forget = max_forget
        self.max_retain = max_retain
        self.score_init = score_init
        self.seed = seed
        self.histories: dict[str, list[dict[str, float]]] = {}
        self._module: pl.LightningModule | None = None
        self._datamodule: Any = None

    # -- checks ----------------------------------------------------------------------------------------
    @staticmethod
    def check_module(module: Any) -> None:
        missing = [name for name in REQUIRED_METHODS if not callable(getattr(module, name, None))]
        if missing:
            raise TypeError(
                f"BalancedSubnetPruning needs {type(module).__name__}.{' and .'.join(missing)}: the module must say "
                "which examples are memorized (balanced_subnet_data) and how to score a batch (balanced_subnet_loss)"
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_module(pl_module)
        super().setup(trainer, pl_module, stage)

    # -- the work --------------------------------------------------------------------------------------
    def prune_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: Path,
        module: pl.LightningModule | None,
        datamodule: Any,
        before: dict[str, float] | None = None,
    ) -> list[PruningRow]:
        self.check_module(module)
        if datamodule is None:
            raise ValueError("BalancedSubnetPruning needs the datamodule: it trains the mask on its forget/retain data")
        self._module, self._datamodule = module, datamodule
        try:
            return super().prune_checkpoint(checkpoint, path, module, datamodule, before=before)
        finally:
            self._module = self._datamodule = None

    def edit_state_dict(
        self, state_dict: dict[str, torch.Tensor], spec: PruningSpec, checkpoint: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self._module is None:
            raise RuntimeError("BalancedSubnetPruning.edit_state_dict runs inside prune_checkpoint (it needs the data)")
        ratio = self.ratios[spec]
        # A checkpoint written from a validation hook arrives under inference mode: train with autograd on.
        with torch.inference_mode(False), torch.enable_grad():
            trainee = copy.deepcopy(self._module)  # the live model is never modified
            trainee.load_state_dict(state_dict)
            forget, retain = trainee.balanced_subnet_data(
                self._datamodule, self.batch_size, max_forget=self.max_forget, max_retain=self.max_retain,
                seed=self.seed,
            )  # fmt: skip
            result = train_balanced_subnet(
                trainee,
                self.layer_names,
                forget,
                retain,
                _module_loss,
                ratio=ratio,
                retain_weight=self.retain_weight,
                epochs=self.epochs,
                lr=self.lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                score_init=self.score_init,
                seed=self.seed,
            )
            del trainee
        self.histories[spec.tag] = result.history
        first, last = result.history[0], result.history[-1]
        rank_zero_info(
            f"memcurve: {spec.tag}: {_examples(forget)} forget / {_examples(retain)} retain examples; training loss "
            f"forget {first['forget_loss']:.3f}->{last['forget_loss']:.3f}, "
            f"retain {first['retain_loss']:.3f}->{last['retain_loss']:.3f}"
        )
        edited = apply_masks(state_dict, result.masks)
        return edited, mask_edits(state_dict, edited, result.masks, scores=result.scores)

    # -- logging ---------------------------------------------------------------------------------------
    def log_rows(self, trainer: pl.Trainer, rows: Sequence[PruningRow]) -> None:
        if not isinstance(trainer.logger, TensorBoardLogger):
            return
        experiment = trainer.logger.experiment
        for row in rows:
            spec = PruningSpec(row.method, row.energy, row.keep_fraction)
            step = round(1e4 * self.ratios.get(spec, 1.0 - row.keep_fraction))  # basis points pruned
            for key, value in row.after.items():
                experiment.add_scalar(f"prune/{BSN_METHOD}/{key}", value, step)
            for key, value in row.before.items():
                experiment.add_scalar(f"prune/{BSN_METHOD}/{key}", value, 0)  # nothing pruned
            for entry in self.histories.get(spec.tag, []):
                for key in ("forget_loss", "retain_loss"):
                    experiment.add_scalar(f"prune/{BSN_METHOD}/{spec.tag}/{key}", entry[key], entry["epoch"])
        experiment.flush()


def _module_loss(module: Any, batch: Any) -> torch.Tensor:
    return module.balanced_subnet_loss(batch)


def _examples(loader: Any) -> str:
    dataset = getattr(loader, "dataset", None)
    return str(len(dataset)) if dataset is not None else f"{len(loader)} batches of"
