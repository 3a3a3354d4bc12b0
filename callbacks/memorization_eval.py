"""MemorizationEval: how much of the label noise a classifier has memorized, measured in eval mode.

Training-batch accuracy is a poor memorization measure (augmented inputs, a model that changes during the
epoch), so this callback runs a dedicated pass over the whole training set, unaugmented, in eval mode,
after validation every ``every_n_epochs`` epochs (and always at the last epoch and in ``trainer.validate``),
and logs ``mem/noised_acc``, ``mem/gt_recovery`` and ``mem/clean_train_acc``.

It is for LightningModules that do not measure memorization themselves (any module mapping images to logits,
trained on a :class:`~memcurve.data.NoisyLabelDataModule`). :class:`~memcurve.lightning_modules.NoisyLabelClassifier`
logs the same tags on its own (``memorization_eval_every_n_epochs``); the pass, its schedule and its logging are
one shared implementation, :func:`memcurve.metrics.log_memorization`.

Under DDP every rank evaluates a disjoint, unpadded shard and the metric counts are summed, so the
figures equal a single-process run exactly.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from memcurve.metrics.memorization import check_memorization_datamodule, log_memorization, memorization_due

__all__ = ["MemorizationEval"]


class MemorizationEval(pl.Callback):
    """Log memorization of noisy labels after validation.

    Args:
        every_n_epochs: evaluate every N epochs during fit (the last epoch is always evaluated).
        prefix: tag prefix of the logged metrics.
    """

    def __init__(self, every_n_epochs: int = 1, prefix: str = "mem/") -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs!r} must be a positive integer")
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.last_results: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_memorization_datamodule(trainer.datamodule, "MemorizationEval")

    def is_due(self, trainer: pl.Trainer) -> bool:
        """When the pass runs (:func:`memcurve.metrics.memorization_due`); override for another schedule."""
        return memorization_due(trainer, self.every_n_epochs)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_due(trainer):
            self.last_results = log_memorization(pl_module, trainer, self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"every_n_epochs": self.every_n_epochs, "last_results": dict(self.last_results)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_results = dict(state_dict.get("last_results", {}))
