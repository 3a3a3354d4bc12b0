"""ScheduledAnalysis: the shared "when" and "where" of the analysis callbacks (KFACFactors, BandActivationProbe).

When: an analysis runs at one of four moments: at the end of ``fit``, every N training epochs, at every checkpoint
save (what it produced is recorded in the checkpoint under :attr:`checkpoint_key`, and the callback state saved
in that checkpoint already lists it; a second save of the same training step, e.g. ``last.ckpt`` after the top-k
file, reuses the result), or at the end of ``trainer.validate`` (to analyse a finished checkpoint). Subclasses
implement :meth:`run`.

Where: outputs go to ``output_dir`` (default ``<log_dir>/<default_subdir>``) under names from
:meth:`output_names` (templates that may use ``{epoch}`` and ``{step}``). Nothing of another run is overwritten:

* ``setup`` refuses an ``output_dir`` that is a file, not writable or on a full disk, and a fixed output name
  (no ``{epoch}``/``{step}``) that already exists;
* before training (``on_train_start``, after a ``ckpt_path=`` resume has restored the state), existing files
  matching a templated name are refused in a fresh run; a resumed run takes them as its own (they are the run it
  resumes, which it may rewrite for the steps it replays);
* right before the work, every concrete path is checked again; files written by this callback (this run, or the
  run it resumes, through the saved state) may be replaced.

``overwrite=True`` lifts all but the folder checks. Decisions are taken on global rank zero (the writer) and
broadcast, so every rank raises together.

State (``state_dict``, keyed by a ``state_key`` built from the arguments only, so it is the same in the resumed
run): ``saved_paths`` (the main output of each run, newest last) and ``written`` (every file written).
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from memcurve.utils.files import check_output_folder, refuse_overwriting

__all__ = ["TEMPLATE_FIELDS", "WHEN", "ScheduledAnalysis", "check_name_template"]

WHEN = ("fit_end", "every_n_epochs", "checkpoint", "validate")
TEMPLATE_FIELDS = ("epoch", "step")


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def check_name_template(argument: str, template: str) -> None:
    """Refuse (one line naming ``argument``) a file-name template with fields other than ``{epoch}``/``{step}``
    or with a folder in it."""
    try:
        fields = _fields(template)
    except ValueError as error:
        raise ValueError(
            f"{argument}={template!r} is not a valid name template ({error}); use {{epoch}} and {{step}}"
        ) from error
    unknown = [name for name in fields if name.split(".")[0].split("[")[0] not in TEMPLATE_FIELDS]
    if unknown or not template or "/" in template or os.sep in template:
        raise ValueError(
            f"{argument}={template!r} must be a file name (no folder) whose only fields are {{epoch}} and {{step}}"
        )
    try:
        template.format(epoch=0, step=0)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as error:
        raise ValueError(f"{argument}={template!r} cannot be formatted with epoch and step numbers: {error}") from error


def _template_regex(template: str) -> re.Pattern[str]:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(r".+?")
    return re.compile("".join(parts))


class ScheduledAnalysis(pl.Callback):
    """Calls :meth:`run` at the moment named by ``self.when`` (set by the subclass, checked against ``WHEN``) and
    guards the files it writes (see the module docstring)."""

    when: str = "fit_end"
    every_n_epochs: int = 1
    checkpoint_key: str = "analysis"
    layers: list[str] | None = None
    filename: str = ""
    output_dir: str | None = None
    overwrite: bool = False
    default_subdir: str = "analysis"
    saved_paths: list[str]  # main output of each run so far (the newest last), kept in the Trainer's checkpoints

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError

    def checkpoint_record(self, result: Any) -> dict[str, Any]:
        """What a ``when="checkpoint"`` run leaves in the checkpoint dict."""
        return {"result": result}

    # -- outputs ---------------------------------------------------------------------------------------
    def output_names(self) -> list[str]:
        """Name templates (``{epoch}``, ``{step}``) of the files one run writes."""
        return [self.filename]

    def output_folder(self, trainer: pl.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / self.default_subdir

    def output_files(self, trainer: pl.Trainer) -> list[Path]:
        """The files the next run writes (names formatted with the trainer's epoch and global step)."""
        folder = self.output_folder(trainer)
        return [
            folder / name.format(epoch=trainer.current_epoch, step=trainer.global_step) for name in self.output_names()
        ]

    @property
    def _owned(self) -> set[str]:
        """Absolute paths this callback may replace: written by it, or by the run it resumes."""
        return self.__dict__.setdefault("_owned_paths", set())

    def _output_argument(self) -> str:
        return "output_dir/filename" if self.output_dir else "filename (in the default output_dir)"

    def _decide(self, trainer: pl.Trainer, check: Any) -> None:
        """Run ``check()`` on global rank zero; every rank raises its one-line ValueError."""
        message = None
        if trainer.is_global_zero:
            try:
                check()
            except ValueError as error:
                message = str(error)
        message = trainer.strategy.broadcast(message, src=0)
        if message is not None:
            raise ValueError(message)

    def check_outputs_at_setup(self, trainer: pl.Trainer, stage: str) -> None:
        """The output folder, fixed output names, and (outside ``fit``) templated names: one-line errors."""
        folder = self.output_folder(trainer)
        argument = "output_dir" if self.output_dir else f"output_dir (default <log_dir>/{self.default_subdir})"

        def check() -> None:
            check_output_folder(argument, folder)
            if self.overwrite:
                return
            fixed = [folder / name for name in self.output_names() if not _fields(name)]
            refuse_overwriting(self._output_argument(), fixed, self._owned)
            if stage != "fit":  # no resume outside fit: templated names are checked now
                self._refuse_template_matches(folder)

        self._decide(trainer, check)
        self._checked_templates = stage != "fit"

    def _refuse_template_matches(self, folder: Path) -> None:
        if not folder.is_dir():
            return
        patterns = [_template_regex(name) for name in self.output_names() if _fields(name)]
        if not patterns:
            return
        existing = [p for p in sorted(folder.iterdir()) if any(r.fullmatch(p.name) for r in patterns)]
        refuse_overwriting(self._output_argument(), existing, self._owned)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Templated names, once the state of a ``ckpt_path=`` resume is restored."""
        if getattr(self, "_checked_templates", False) or self.overwrite:
            return
        self._checked_templates = True
        folder = self.output_folder(trainer)
        if trainer.ckpt_path is not None:  # resuming: files of this naming are the resumed run's own
            patterns = [_template_regex(name) for name in self.output_names() if _fields(name)]
            if folder.is_dir() and patterns:
                self._owned.update(
                    os.path.abspath(p) for p in folder.iterdir() if any(r.fullmatch(p.name) for r in patterns)
                )
            return
        self._decide(trainer, lambda: self._refuse_template_matches(folder))

    def claim_outputs(self, trainer: pl.Trainer) -> list[Path]:
        """The files the next run writes, checked (none of another run is replaced unless ``overwrite``); call it
        before the work, on every rank."""
        paths = self.output_files(trainer)
        if not self.overwrite:
            self._decide(trainer, lambda: refuse_overwriting(self._output_argument(), paths, self._owned))
        return paths

    def record_written(self, *paths: str | os.PathLike) -> None:
        """Remember files this callback wrote (they may be replaced by it later)."""
        self._owned.update(os.path.abspath(p) for p in paths)
        written = self.__dict__.setdefault("_written", [])
        written.extend(str(p) for p in paths if str(p) not in written)

    # -- hooks -----------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "fit_end":
            self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "every_n_epochs" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.when == "checkpoint":
            # One run per training step: ModelCheckpoint may save the same step twice (top-k file, then last.ckpt).
            step = (trainer.current_epoch, trainer.global_step)
            last = self.__dict__.get("_checkpoint_run")
            result = last[1] if last is not None and last[0] == step else self.run(trainer, pl_module)
            self.__dict__["_checkpoint_run"] = (step, result)
            checkpoint[self.checkpoint_key] = self.checkpoint_record(result)
            # Lightning took the callbacks' state before this hook: the checkpoint's copy must list this output too.
            states = checkpoint.get("callbacks")
            if isinstance(states, dict) and self.state_key in states:
                states[self.state_key] = self.state_dict()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "validate" and trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    # Several analyses may share a Trainer: each keeps its own state, under a key made of its arguments only.
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            layers=self.layers, when=self.when, filename=self.filename, output_dir=self.output_dir
        )

    def state_dict(self) -> dict[str, Any]:
        return {"saved_paths": list(self.saved_paths), "written": list(self.__dict__.get("_written", []))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved_paths = list(state_dict.get("saved_paths", []))
        self.__dict__["_written"] = list(state_dict.get("written", []))
        self._owned.update(os.path.abspath(p) for p in [*self.saved_paths, *self.__dict__["_written"]])
