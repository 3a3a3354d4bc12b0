"""CheckpointPruning: the base of the pruning callbacks (KFACPruning, SVDPruning, BalancedSubnetPruning).

A pruning callback never touches the live model or the original checkpoint file. When a checkpoint has been
written (every save with ``when="checkpoint"``; one ``fit-end.ckpt`` with ``when="fit_end"``) it hands the
checkpoint to the one edit pipeline (:func:`memcurve.editing.edit_checkpoint`): edited copies go to
``<checkpoint dir>/edited/<name>-<tag>.ckpt`` (outside the folder Lightning searches for ``last``/``best``), the
original and the edited weights are scored with the module's ``evaluation_metrics`` (``evaluate``), rows are appended
to ``pruning_report.json`` / ``.csv`` and logged to TensorBoard under
``prune/<method>/<kind>/L<layer set>/<metric>``.

The hook point is the strategy's ``CheckpointIO``: the callback wraps it so it learns the path of every file the
Trainer writes, on global rank zero, right after the write. Evaluation then runs on rank zero over the whole
(unsharded) data, so a DDP run reports the same figures as one process.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from memcurve.curvature.tracker import select_linear_layers
from memcurve.editing import (
    EDIT_KEY,
    BalancedSubnetSettings,
    EditRequest,
    EditRow,
    OutputGuard,
    Scorer,
    check_scorable,
    edit_checkpoint,
    log_rows,
    write_report,
)
from memcurve.editing.pipeline import FactorSource
from memcurve.editing.request import layer_patterns
from memcurve.utils.arguments import check_choice

__all__ = ["WHEN", "CheckpointPruning"]

WHEN = ("checkpoint", "fit_end")
REPORT_NAME = "pruning_report"


class _NotifyingCheckpointIO(CheckpointIO):
    """Delegates to the strategy's CheckpointIO and tells the pruning callbacks where each checkpoint went."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner
        self.listeners: list[CheckpointPruning] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        for listener in self.listeners:
            listener.on_checkpoint_written(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None):
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class CheckpointPruning(pl.Callback):
    """Edits a copy of each written checkpoint with :attr:`requests` (set by the subclass).

    Args:
        layers: module-name patterns (globs or ``re:<regex>``) of the linear layers to edit.
        when: ``checkpoint`` (after every checkpoint the Trainer writes) or ``fit_end`` (one ``fit-end.ckpt``).
        evaluate: score the original and the edited weights with the module's ``evaluation_metrics``.
        output_dir: folder of the report (default ``<log_dir>/pruning``).
        save_pruned: write the edited checkpoints (False: report only).
    """

    requests: list[EditRequest]

    def __init__(
        self,
        layers: list[str],
        when: str = "checkpoint",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
    ) -> None:
        self.layers = list(layer_patterns(layers))
        check_choice("when", when, WHEN)
        self.when = when
        self.evaluate = evaluate
        self.output_dir = output_dir
        self.save_pruned = save_pruned
        self.rows: list[EditRow] = []
        self.layer_names: list[str] = []
        self.guard = OutputGuard()
        self._trainer: pl.Trainer | None = None
        self._armed = when == "checkpoint"

    @property
    def method(self) -> str:
        return self.requests[0].method

    # -- what a subclass may refine ----------------------------------------------------------------------
    def factors_for(self, checkpoint: dict[str, Any]) -> FactorSource:
        """The factors the requests need for this checkpoint (None: the method uses none)."""
        return None

    def bsn_settings(self) -> BalancedSubnetSettings | None:
        return None

    # -- hooks -----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.layer_names = select_linear_layers(pl_module, self.layers)
        if self.evaluate:
            check_scorable(pl_module)
        self._trainer = trainer
        checkpoint_io = trainer.strategy.checkpoint_io
        if not isinstance(checkpoint_io, _NotifyingCheckpointIO):
            checkpoint_io = _NotifyingCheckpointIO(checkpoint_io)
            trainer.strategy.checkpoint_io = checkpoint_io
        if self not in checkpoint_io.listeners:
            checkpoint_io.listeners.append(self)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "fit_end":
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        self._armed = True
        try:
            trainer.save_checkpoint(folder / "fit-end.ckpt")
        finally:
            self._armed = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        checkpoint_io = trainer.strategy.checkpoint_io
        if isinstance(checkpoint_io, _NotifyingCheckpointIO) and self in checkpoint_io.listeners:
            checkpoint_io.listeners.remove(self)

    # -- the work (global rank zero, after a checkpoint file was written) ------------------------------------
    def on_checkpoint_written(self, checkpoint: dict[str, Any], path: Path) -> None:
        if not self._armed or checkpoint.get(EDIT_KEY) is not None:
            return
        trainer = self._trainer
        module = trainer.lightning_module
        rows = edit_checkpoint(
            checkpoint,
            path,
            self.requests,
            module=module,
            datamodule=trainer.datamodule,
            factors=self.factors_for(checkpoint),
            bsn=self.bsn_settings(),
            scorer=Scorer(module, trainer.datamodule) if self.evaluate else None,
            save=self.save_pruned,
            guard=self.guard,
            log=rank_zero_info,
        )
        self.rows.extend(rows)
        folder = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or ".") / "pruning"
        write_report(folder, rows, REPORT_NAME)
        if isinstance(trainer.logger, TensorBoardLogger):
            log_rows(trainer.logger.experiment, rows)

    @property
    def state_key(self) -> str:
        # Several pruning callbacks (methods, layer sets) may share a Trainer: each keeps its own state.
        return self._generate_state_key(requests=[request.tag for request in self.requests])

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [EditRow(**row) for row in state_dict.get("rows", [])]
