"""The protocols between models and the analysis, and their defaults.

Both sides import this module: the callbacks (which read batches through an adapter) and the LightningModules
(which provide one, e.g. ``CausalLMModule.fisher_adapter()``). It depends on torch only (Lightning types appear in
annotations), so the framework-free factor pass of :mod:`memcurve.curvature` uses it too.

* :class:`FisherAdapter`: how the factor pass reads a batch — logits, data labels (empirical Fisher), example
  indices (seeding of the sampled Fisher), position and loss masks. :class:`ClassificationAdapter` covers image
  classifiers with dict or tuple batches.
* :class:`ProbeAdapter`: how the band probe runs a model and sorts examples into groups.
  :class:`ClassificationProbeAdapter` forms the ``noised`` / ``clean`` / ``val`` groups of a noisy-label run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["ClassificationAdapter", "ClassificationProbeAdapter", "FisherAdapter", "ProbeAdapter"]


# -- the factor pass -------------------------------------------------------------------------------------------
class FisherAdapter:
    """How the factor pass reads a batch. Override the methods for other batch layouts or models.

    ``drop_last_position``: the default of ``KFACFactors(drop_last_position=None)`` (True for causal LMs, whose
    last position has no next-token target).
    """

    drop_last_position: bool = False

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        """Model outputs ``[B, C]`` or ``[B, T, C]`` whose softmax is the predictive distribution."""
        raise NotImplementedError

    def labels(self, batch: Any) -> Tensor:
        """Data targets (empirical Fisher), shaped like ``logits.shape[:-1]``."""
        raise NotImplementedError

    def example_index(self, batch: Any) -> Tensor | None:
        """Global example indices ``[B]`` (seeding of the sampled Fisher); None to count examples instead."""
        return None

    def position_mask(self, batch: Any) -> Tensor | None:
        """Boolean ``[B, T]`` of positions the tracked layers should count (None: all)."""
        return None

    def loss_mask(self, batch: Any) -> Tensor | None:
        """Boolean mask over ``logits.shape[:-1]`` of positions that carry a loss (None: all)."""
        return None


def _get(batch: Any, key: str | int) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as error:
        keys = list(batch) if isinstance(batch, Mapping) else f"a {type(batch).__name__} of length {len(batch)}"
        raise KeyError(f"batch has no entry {key!r} (it has {keys}); configure the adapter's keys") from error


@dataclass
class ClassificationAdapter(FisherAdapter):
    """Classifier batches: dicts (``image``/``label``/``index``, memcurve's noisy-label batches) or tuples.

    Set ``index_key=None`` for batches without example indices.
    """

    input_key: str | int = "image"
    label_key: str | int = "label"
    index_key: str | int | None = "index"

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        return model(_get(batch, self.input_key))

    def labels(self, batch: Any) -> Tensor:
        return _get(batch, self.label_key)

    def example_index(self, batch: Any) -> Tensor | None:
        if self.index_key is None:
            return None
        if isinstance(batch, Mapping) and self.index_key not in batch:
            return None
        return _get(batch, self.index_key)


# -- the band probe --------------------------------------------------------------------------------------------
class ProbeAdapter:
    """How the probe runs a model and sorts examples into groups. Subclass for other models and batches.

    Attributes:
        groups: every group this adapter can form, in display order.
        contrast: ``(memorized, reference)`` groups whose relative difference the figure annotates, or None.
    """

    groups: ClassVar[tuple[str, ...]] = ()
    contrast: ClassVar[tuple[str, str] | None] = None

    def passes(self, trainer: Trainer, groups: Sequence[str]) -> list[tuple[str, DataLoader]]:
        """``(pass name, loader)`` for the data passes ``groups`` need; eval loaders, sharded without padding."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Any) -> None:
        """Run ``model`` on a batch already on its device (outputs are unused; hooks read the layer inputs)."""
        raise NotImplementedError

    def batch_groups(self, pass_name: str, batch: Any) -> Mapping[str, Tensor]:
        """Boolean ``[B]`` membership per group of the batch's examples (an example may be in no group)."""
        raise NotImplementedError

    def position_mask(self, batch: Any) -> Tensor | None:
        """Boolean ``[B, T]`` of real (non-padding) positions, or None when every position is real."""
        return None


def _datamodule_or_module(trainer: Trainer) -> Any:
    return trainer.datamodule if trainer.datamodule is not None else trainer.lightning_module


@dataclass
class ClassificationProbeAdapter(ProbeAdapter):
    """Noisy-label classification: ``noised`` / ``clean`` training examples and ``val`` examples.

    The training groups come from ``memorization_dataloader()`` (the whole training set, unaugmented, in
    order) split by ``batch[noised_key]``; ``val`` from ``val_dataloader()``. The model is called on
    ``batch[input_key]``.
    """

    groups: ClassVar[tuple[str, ...]] = ("noised", "clean", "val")
    contrast: ClassVar[tuple[str, str] | None] = ("noised", "clean")
    input_key: str | int = "image"
    noised_key: str | int = "is_noised"

    def passes(self, trainer: Trainer, groups: Sequence[str]) -> list[tuple[str, DataLoader]]:
        source = _datamodule_or_module(trainer)
        out = []
        if "noised" in groups or "clean" in groups:
            make = getattr(source, "memorization_dataloader", None)
            if not callable(make):
                raise ValueError(
                    "groups 'noised'/'clean' need a datamodule with memorization_dataloader() (e.g. "
                    f"memcurve.data.NoisyLabelDataModule); got {type(source).__name__}"
                )
            out.append(("train", make()))
        if "val" in groups:
            loader = source.val_dataloader()
            out.append(("val", loader[0] if isinstance(loader, (list, tuple)) else loader))
        return out

    def forward(self, model: nn.Module, batch: Any) -> None:
        model(batch[self.input_key])

    def batch_groups(self, pass_name: str, batch: Any) -> dict[str, Tensor]:
        if pass_name == "val":
            return {"val": torch.ones(len(batch[self.input_key]), dtype=torch.bool)}
        try:
            noised = torch.as_tensor(batch[self.noised_key]).bool()
        except (KeyError, IndexError, TypeError) as error:
            raise KeyError(
                f"training batches need {self.noised_key!r} to form the noised/clean groups; "
                "configure ClassificationProbeAdapter(noised_key=...)"
            ) from error
        return {"noised": noised, "clean": ~noised}
