"""ScheduledAnalysis: the shared "when" of the analysis callbacks (KFACFactors, BandActivationProbe).

An analysis runs at one of four moments: at the end of ``fit``, every N training epochs, at every checkpoint
save (what it produced is recorded in the checkpoint under :attr:`checkpoint_key`), or at the end of
``trainer.validate`` (to analyse a finished checkpoint). Subclasses implement :meth:`run`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

__all__ = ["WHEN", "ScheduledAnalysis"]

WHEN = ("fit_end", "every_n_epochs", "checkpoint", "validate")


class ScheduledAnalysis(pl.Callback):
    """Calls :meth:`run` at the moment named by ``self.when`` (set by the subclass, checked against ``WHEN``)."""

    when: str = "fit_end"
    every_n_epochs: int = 1
    checkpoint_key: str = "analysis"
    layers: list[str] | None = None
    filename: str = ""
    saved_paths: list[str]  # files written so far (the newest last), kept in the Trainer's checkpoints

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError

    def checkpoint_record(self, result: Any) -> dict[str, Any]:
        """What a ``when="checkpoint"`` run leaves in the checkpoint dict."""
        return {"result": result}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "every_n_epochs" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.when == "checkpoint":
            checkpoint[self.checkpoint_key] = self.checkpoint_record(self.run(trainer, pl_module))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "validate" and trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    # Several analyses may share a Trainer: each keeps its own state.
    @property
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, when=self.when, filename=self.filename)

    def state_dict(self) -> dict[str, Any]:
        return {"saved_paths": list(self.saved_paths)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved_paths = list(state_dict.get("saved_paths", []))
