"""UnlearningPruning: the gradient unlearning baselines — GA, GradDiff, NPO, SimNPO, RMU — as checkpoint edits.

What people reach for instead of a curvature edit (OpenUnlearning's trainers and defaults; the maths is in
:mod:`memcurve.editing.unlearning`): the weights of the selected ``nn.Linear`` layers of a copy of the checkpoint are
fine-tuned for ``steps`` optimizer steps to forget the memorized set while keeping retain data. Like BalancedSubnet,
each must be told which examples are memorized: the LightningModule provides

* ``balanced_subnet_data(datamodule, batch_size, max_forget=None, max_retain=None, seed=0) -> (forget, retain)``:
  sized re-iterable loaders (the causal LM: the memorized canaries and background training windows; the noisy-label
  classifier: the noised training examples and clean ones),

and its batches are read through its :class:`~memcurve.adapters.FisherAdapter` (no loss method needed).

The strength is the step count, a positive integer (more steps = a stronger edit); the edit after ``n`` steps is
exactly the first ``n`` steps of any longer run, so a list of step counts is a list of points on one trajectory, and
``steps="auto"`` chooses the largest count within a held-out ``budget`` (bisection over an integer grid,
:class:`~memcurve.editing.protocol.AutoSettings` ``min_steps`` / ``max_steps``). Each count is its own run on a deep
copy of the module loaded with the checkpoint's weights (never the live model), exported like the other edits (see
:class:`~memcurve.callbacks.checkpoint_pruning.CheckpointPruning`): ``edited/<name>-<method>-s<steps>-L<id>.ckpt``
beside the original (kept), before/after metrics, report rows with the ``method`` and ``steps``. TensorBoard:
``prune/<method>/steps/L<layer set>/<metric>`` with the step count in parts per million as the step (0 = unedited).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Literal

import lightning.pytorch as pl

from memcurve.callbacks.checkpoint_pruning import CheckpointPruning
from memcurve.data.held_out import HeldOutSettings
from memcurve.editing import (
    UNLEARNING_METHODS,
    UnlearningSettings,
    check_requests,
    check_unlearning_module,
)
from memcurve.editing.auto import AUTO, Budget
from memcurve.editing.protocol import strength_requests
from memcurve.utils.arguments import check_choice

__all__ = ["UnlearningPruning"]


class UnlearningPruning(CheckpointPruning):
    """Unlearn the memorized set from a copy of the fit-end (or every) checkpoint by a gradient method; the live model
    and the original stay untouched.

    Args:
        layers: module-name patterns of the linear layers whose weights train (RMU's original: the ``mlp.down_proj``
            of the steered block and the two below it).
        method: ``ga``, ``graddiff``, ``npo``, ``simnpo`` or ``rmu``.
        steps: number(s) of unlearning steps, each a positive integer; one run and checkpoint per value; or ``auto``
            (the largest count within ``budget`` on the selection split).
        settings: the rest of the run (:class:`~memcurve.editing.UnlearningSettings`: learning rate, batch size,
            the method's hyperparameters, RMU's layer; default: OpenUnlearning's); its ``method`` and ``steps`` are
            replaced by ``method`` and each of ``steps``.
        when, evaluate, output_dir, save_pruned, budget, held_out: see CheckpointPruning.
    """

    def __init__(
        self,
        layers: list[str],
        method: str = "npo",
        steps: int | list[int] | Literal["auto"] = 10,
        settings: UnlearningSettings | None = None,
        when: str = "fit_end",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
        budget: Budget | None = None,
        held_out: HeldOutSettings | None = None,
    ) -> None:
        check_choice("method", method, UNLEARNING_METHODS)
        if settings is not None and not isinstance(settings, UnlearningSettings):
            raise TypeError(f"settings must be an UnlearningSettings, not {type(settings).__name__}")
        super().__init__(layers, when, evaluate, output_dir, save_pruned, budget, held_out)
        counts = steps if steps == AUTO else [steps] if isinstance(steps, numbers.Real) else list(steps or [])
        self.requests = strength_requests(method, self.layers, steps=counts)
        self.check_auto()
        self.settings = dataclasses.replace(settings or UnlearningSettings(), method=method)

    def unlearning_settings(self) -> UnlearningSettings:
        """The settings of every run (each request replaces ``method`` and ``steps``)."""
        return self.settings

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_unlearning_module(pl_module, self.method)
        if trainer.datamodule is None:
            raise ValueError(
                f"UnlearningPruning(method={self.method!r}) needs a DataModule: the forget and retain data come from "
                f"{type(pl_module).__name__}.balanced_subnet_data(datamodule, ...); pass datamodule= to the Trainer"
            )
        # The module's data method, the layers and RMU's steered block, before any training step.
        check_requests(self.requests, pl_module, datamodule=trainer.datamodule, unlearning=self.settings)
        super().setup(trainer, pl_module, stage)
