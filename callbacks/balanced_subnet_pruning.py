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
:class:`~memcurve.callbacks.checkpoint_pruning.CheckpointPruning`): ``edited/<name>-bsn-r<ratio>-L<id>.ckpt``, the
original kept, before/after metrics, report rows with ``method="bsn"`` and the ``ratio`` (kept pairs = unmasked
weights). TensorBoard: ``prune/bsn/ratio/L<layer set>/<metric>`` with the ratio in parts per million as the step
(0 = unedited).
"""

from __future__ import annotations

import numbers
from typing import Literal

import lightning.pytorch as pl

from memcurve.callbacks.checkpoint_pruning import CheckpointPruning
from memcurve.data.held_out import HeldOutSettings
from memcurve.editing import BalancedSubnetSettings, check_bsn_module
from memcurve.editing.auto import AUTO, Budget
from memcurve.editing.protocol import strength_requests

__all__ = ["BalancedSubnetPruning"]


class BalancedSubnetPruning(CheckpointPruning):
    """Learn a BalancedSubnet mask in a copy of the fit-end (or every) checkpoint; the live model and the original
    stay untouched.

    Args:
        layers: module-name patterns of the linear layers to mask (the paper: the MLP matrices).
        ratio: fraction(s) of each layer's weights to prune, each in (0, 1); one mask and checkpoint per value
            (paper's best: 0.0015).
        settings: how the mask is trained (:class:`~memcurve.editing.BalancedSubnetSettings`; default: the paper's
            best run).
        when, evaluate, output_dir, save_pruned: see CheckpointPruning.
    """

    def __init__(
        self,
        layers: list[str],
        ratio: float | list[float] | Literal["auto"] = 0.0015,
        settings: BalancedSubnetSettings | None = None,
        when: str = "fit_end",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
        budget: Budget | None = None,
        held_out: HeldOutSettings | None = None,
    ) -> None:
        if settings is not None and not isinstance(settings, BalancedSubnetSettings):
            raise TypeError(f"settings must be a BalancedSubnetSettings, not {type(settings).__name__}")
        super().__init__(layers, when, evaluate, output_dir, save_pruned, budget, held_out)
        ratios = ratio if ratio == AUTO else [ratio] if isinstance(ratio, numbers.Real) else list(ratio or [])
        self.requests = strength_requests("bsn", self.layers, ratio=ratios)
        self.check_auto()
        self.settings = settings or BalancedSubnetSettings()

    def bsn_settings(self) -> BalancedSubnetSettings:
        return self.settings

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_bsn_module(pl_module)
        super().setup(trainer, pl_module, stage)
