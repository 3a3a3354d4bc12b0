"""Memorization metrics for classifiers trained on noisy labels.

On a training set where some labels were corrupted ("noised"), three accuracies tell memorization apart
from generalization:

- noised-label accuracy (``mem/noised_acc``): prediction == the corrupted label on noised examples.
  A model can only get these right by memorizing the (input, wrong label) pair.
- ground-truth recovery (``mem/gt_recovery``): prediction == the true label on noised examples.
- clean training accuracy (``mem/clean_train_acc``): prediction == the (unchanged) label on clean examples.

Each metric has a functional form and a ``torchmetrics.Metric`` class whose states are a correct count and
a total count, summed across processes (``dist_reduce_fx="sum"``), so a distributed evaluation that shards
the data without padding gives exactly the single-process value. A metric with no example in its subset
returns NaN: an accuracy over an empty set is undefined, and 0 would read as "nothing memorized".

The evaluation pass (:func:`evaluate_memorization`: the whole training set, unaugmented, in eval mode) and its
schedule and logging (:func:`memorization_due`, :func:`log_memorization`) live here too, written once for the two
places that log the ``mem/`` tags: ``NoisyLabelClassifier.on_validation_epoch_end`` and the
``MemorizationEval`` callback (for any other LightningModule). They take the trainer and module duck-typed, so
this floor imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "MEMORIZATION_BATCH_KEYS",
    "MEMORIZATION_TAGS",
    "CleanTrainAccuracy",
    "GroundTruthRecovery",
    "MemorizationMetrics",
    "NoisedLabelAccuracy",
    "check_memorization_datamodule",
    "clean_train_accuracy",
    "evaluate_memorization",
    "ground_truth_recovery",
    "log_memorization",
    "memorization_due",
    "noised_label_accuracy",
]

MEMORIZATION_BATCH_KEYS = ("image", "label", "true_label", "is_noised")
# Logged metric -> the example count that must be positive for it to be defined (logged).
MEMORIZATION_TAGS = {"noised_acc": "num_noised", "gt_recovery": "num_noised", "clean_train_acc": "num_clean"}


def _as_predictions(preds: Tensor) -> Tensor:
    """Accept class indices [N] or logits/probabilities [N, C]."""
    if preds.ndim == 2:
        return preds.argmax(dim=-1)
    if preds.ndim != 1:
        raise ValueError(f"preds must be class indices [N] or scores [N, C]; got shape {tuple(preds.shape)}")
    return preds


def _check_shapes(preds: Tensor, **others: Tensor) -> None:
    for name, tensor in others.items():
        if tensor.shape != preds.shape:
            raise ValueError(f"{name} must have shape {tuple(preds.shape)} like preds; got {tuple(tensor.shape)}")


def _masked_counts(preds: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    preds = _as_predictions(preds)
    _check_shapes(preds, target=target, mask=mask)
    mask = mask.bool()
    correct = ((preds == target) & mask).sum()
    return correct, mask.sum()


def _ratio(correct: Tensor, total: Tensor) -> Tensor:
    if total == 0:
        return torch.tensor(float("nan"))
    return correct.double().div(total).float()


def noised_label_accuracy(preds: Tensor, noisy_labels: Tensor, is_noised: Tensor) -> Tensor:
    """Fraction of noised examples predicted as their corrupted label (memorization)."""
    return _ratio(*_masked_counts(preds, noisy_labels, is_noised))


def ground_truth_recovery(preds: Tensor, true_labels: Tensor, is_noised: Tensor) -> Tensor:
    """Fraction of noised examples predicted as their true label."""
    return _ratio(*_masked_counts(preds, true_labels, is_noised))


def clean_train_accuracy(preds: Tensor, true_labels: Tensor, is_noised: Tensor) -> Tensor:
    """Accuracy on the training examples whose label was not corrupted."""
    return _ratio(*_masked_counts(preds, true_labels, ~is_noised.bool()))


class _MaskedAccuracy(Metric):
    """Accuracy over the subset selected by a mask; states are summed counts."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, preds: Tensor, target: Tensor, mask: Tensor) -> None:
        correct, total = _masked_counts(preds, target, mask)
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        return _ratio(self.correct, self.total)


class NoisedLabelAccuracy(_MaskedAccuracy):
    """Streaming :func:`noised_label_accuracy`."""

    def update(self, preds: Tensor, noisy_labels: Tensor, is_noised: Tensor) -> None:
        self._accumulate(preds, noisy_labels, is_noised)


class GroundTruthRecovery(_MaskedAccuracy):
    """Streaming :func:`ground_truth_recovery`."""

    def update(self, preds: Tensor, true_labels: Tensor, is_noised: Tensor) -> None:
        self._accumulate(preds, true_labels, is_noised)


class CleanTrainAccuracy(_MaskedAccuracy):
    """Streaming :func:`clean_train_accuracy`."""

    def update(self, preds: Tensor, true_labels: Tensor, is_noised: Tensor) -> None:
        self._accumulate(preds, true_labels, ~is_noised.bool())


class MemorizationMetrics(torch.nn.Module):
    """The three memorization metrics fed from one batch of the evaluation pass.

    ``compute()`` returns ``{"noised_acc", "gt_recovery", "clean_train_acc"}`` plus the example counts
    ``num_noised`` and ``num_clean`` (floats, for logging).
    """

    def __init__(self, **metric_kwargs: Any) -> None:
        """``metric_kwargs`` go to every torchmetrics Metric (e.g. ``sync_on_compute=False`` when one process
        evaluates everything while the others do not take part)."""
        super().__init__()
        self.noised_acc = NoisedLabelAccuracy(**metric_kwargs)
        self.gt_recovery = GroundTruthRecovery(**metric_kwargs)
        self.clean_train_acc = CleanTrainAccuracy(**metric_kwargs)

    def update(self, preds: Tensor, noisy_labels: Tensor, true_labels: Tensor, is_noised: Tensor) -> None:
        preds = _as_predictions(preds)
        self.noised_acc.update(preds, noisy_labels, is_noised)
        self.gt_recovery.update(preds, true_labels, is_noised)
        self.clean_train_acc.update(preds, true_labels, is_noised)

    def compute(self) -> dict[str, float]:
        return {
            "noised_acc": float(self.noised_acc.compute()),
            "gt_recovery": float(self.gt_recovery.compute()),
            "clean_train_acc": float(self.clean_train_acc.compute()),
            "num_noised": float(self.noised_acc.total),
            "num_clean": float(self.clean_train_acc.total),
        }

    def reset(self) -> None:
        for metric in (self.noised_acc, self.gt_recovery, self.clean_train_acc):
            metric.reset()


# -- the evaluation pass, its schedule and its logging ------------------------------------------------------------
def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}


@torch.no_grad()
def evaluate_memorization(
    model: torch.nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    device: torch.device | str | None = None,
    sync: bool = True,
) -> dict[str, float]:
    """Memorization metrics of ``model`` (images -> logits) over ``dataloader`` of noisy-label batches (dicts with
    :data:`MEMORIZATION_BATCH_KEYS`); the :meth:`MemorizationMetrics.compute` dict.

    The model is put in eval mode for the pass and restored to its previous mode afterwards. ``sync``: sum the
    metric states over ranks (the loader is a shard); False when one process evaluates the whole data alone.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    metrics = MemorizationMetrics(sync_on_compute=sync).to(device)
    was_training = model.training
    model.eval()
    try:
        for batch in dataloader:
            missing = [key for key in MEMORIZATION_BATCH_KEYS if key not in batch]
            if missing:
                raise KeyError(
                    f"memorization batches need the keys {MEMORIZATION_BATCH_KEYS}; this one lacks {missing}"
                )
            batch = _to_device(batch, device)
            logits = model(batch["image"])
            metrics.update(logits, batch["label"], batch["true_label"], batch["is_noised"])
        return metrics.compute()
    finally:
        model.train(was_training)


def check_memorization_datamodule(datamodule: Any, owner: str, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``datamodule`` has a ``memorization_dataloader()`` (``owner`` names who asks,
    ``hint`` is appended to the message)."""
    if datamodule is None or not callable(getattr(datamodule, "memorization_dataloader", None)):
        raise ValueError(
            f"{owner} needs a datamodule with a memorization_dataloader() (e.g. "
            f"memcurve.data.NoisyLabelDataModule); got {type(datamodule).__name__}{hint}"
        )


def memorization_due(trainer: Any, every_n_epochs: int) -> bool:
    """Whether the memorization pass runs at this validation end: never while sanity checking; always outside
    ``fit`` (``trainer.validate``); during ``fit`` every ``every_n_epochs`` epochs and at the last epoch.

    ``trainer``: anything with ``sanity_checking``, ``state.fn``, ``current_epoch`` and ``max_epochs``.
    """
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != "fit":
        return True
    epoch = trainer.current_epoch + 1
    return epoch % every_n_epochs == 0 or epoch >= (trainer.max_epochs or 0)


def log_memorization(module: Any, trainer: Any, prefix: str = "mem/") -> dict[str, float]:
    """Run the memorization pass of ``module`` over ``trainer.datamodule.memorization_dataloader()`` and log
    ``{prefix}noised_acc``, ``{prefix}gt_recovery`` and ``{prefix}clean_train_acc`` through ``module.log`` (a
    metric whose subset is empty is not logged). Returns the :func:`evaluate_memorization` results.

    Callers decide when with :func:`memorization_due`. Under DDP every rank evaluates its unpadded shard and the
    metric sums the counts over ranks, so the figures equal a single-process run exactly; they are logged with
    ``sync_dist=False`` (already reduced).
    """
    results = evaluate_memorization(module, trainer.datamodule.memorization_dataloader(), module.device)
    for name, count in MEMORIZATION_TAGS.items():
        if results[count] > 0:
            module.log(f"{prefix}{name}", results[name], sync_dist=False)
    return results
