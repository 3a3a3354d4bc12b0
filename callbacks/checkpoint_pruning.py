"""CheckpointPruning: the base of the pruning callbacks (KFACPruning, SVDPruning, BalancedSubnetPruning).

A pruning callback never touches the live model or the original checkpoint file. When a checkpoint has been
written (``when="fit_end"``, the default: one ``fit-end.ckpt`` at the end of ``fit``; ``when="checkpoint"``: every
file the Trainer writes) it hands the checkpoint to the one edit pipeline
(:func:`memcurve.editing.edit_checkpoint`):

* edited copies go to ``<checkpoint dir>/edited/<name>-<tag>.ckpt``, outside the folder Lightning searches for
  ``last`` / ``best`` (``ckpt_path="last"`` always resumes from the original), named losslessly per method,
  strength and layer set; an existing file there is replaced only if this run wrote it or it is an edited copy of
  the same source (Lightning rewrites ``last.ckpt``); when Lightning removes a checkpoint (``ModelCheckpoint``'s
  ``save_top_k`` rotation) its edited copies are removed with it; ``fit-end.ckpt`` never replaces an existing file
  (``fit-end-v1.ckpt``, … as Lightning names versions);
* the original and the edited weights are scored (``evaluate``, see :mod:`memcurve.editing.scoring`: the module's
  ``evaluation_metrics`` when it has one, else its own validation loop on a copy);
* rows are appended to ``<output_dir>/pruning_report.json`` / ``.csv`` and logged to TensorBoard under
  ``prune/<method>/<kind>/L<layer set>/<metric>`` at step = strength in parts per million (the exact value under
  ``…/strength``; with ``when="checkpoint"`` each checkpoint adds its points to the same curves).

Everything that can be checked is checked in ``setup``, before any training step: the layers, that the module can
be scored, the report folder (``output_dir``) and the edited-copies folder (not a file, writable, disk not full),
that the strategy writes checkpoints through its ``CheckpointIO`` (:func:`check_checkpoint_strategy`: FSDP needs
``state_dict_type="full"``), and, for K-FAC, the factors (:class:`~memcurve.callbacks.KFACPruning`).

The hook point is the strategy's ``CheckpointIO``: the callback wraps it so it learns the path of every file the
Trainer writes or removes, on global rank zero, right after the write. Scoring then runs on rank zero over the whole
(unsharded) data, so a DDP run reports the same figures as one process. The rows and the files written survive a
resumed run (``state_dict``, stable ``state_key``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info

from memcurve.curvature.tracker import select_linear_layers
from memcurve.data.held_out import HeldOutSettings, global_seed, split_held_out
from memcurve.editing import (
    EDIT_KEY,
    EDITED_FOLDER,
    BalancedSubnetSettings,
    EditRequest,
    EditRow,
    OutputGuard,
    Scorer,
    UnlearningSettings,
    check_scorable,
    edit_checkpoint,
    log_rows,
    read_report,
    write_report,
)
from memcurve.editing.auto import Budget
from memcurve.editing.outputs import edited_checkpoint_path, remove_edited_copies
from memcurve.editing.pipeline import FactorSource
from memcurve.editing.protocol import AutoRequest, Protocol, single_validation_loader
from memcurve.editing.request import layer_patterns
from memcurve.editing.skills import memorized_min_level, plot_skills
from memcurve.utils.arguments import check_choice
from memcurve.utils.files import atomic_write, check_output_folder
from memcurve.utils.sharding import parameters_sharded, shards_parameters, single_process_copy

__all__ = ["FIT_END_NAME", "REPORT_NAME", "WHEN", "CheckpointPruning", "check_checkpoint_strategy"]

WHEN = ("fit_end", "checkpoint")
REPORT_NAME = "pruning_report"
FIT_END_NAME = "fit-end"


def check_checkpoint_strategy(strategy: Strategy) -> None:
    """Refuse a strategy that writes checkpoints without its ``CheckpointIO`` (where the pruning callbacks learn of
    each file): nothing would ever be pruned. FSDP with ``state_dict_type="sharded"``, ModelParallel with
    ``save_distributed_checkpoint=True``, DeepSpeed."""
    name = type(strategy).__name__
    later = "or prune a consolidated checkpoint afterwards with `memcurve prune`"
    if isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") != "full":
        raise ValueError(
            f"strategy={name}(state_dict_type={strategy._state_dict_type!r}) writes sharded checkpoints without the "
            "CheckpointIO the pruning callbacks listen to, so nothing would be pruned; use "
            "FSDPStrategy(state_dict_type='full') (YAML: trainer.strategy.init_args.state_dict_type: full), " + later
        )
    if isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_save_distributed_checkpoint", False):
        raise ValueError(
            f"strategy={name}(save_distributed_checkpoint=True) writes distributed checkpoints without the "
            "CheckpointIO the pruning callbacks listen to; pass save_distributed_checkpoint=False, " + later
        )
    if isinstance(strategy, DeepSpeedStrategy):
        raise ValueError(  # noqa: TRY004 - a value of the strategy argument, as the two above
            f"strategy={name} writes checkpoints through DeepSpeed, not the CheckpointIO the pruning callbacks listen "
            "to; use DDP or FSDPStrategy(state_dict_type='full'), " + later
        )


def _free_name(folder: Path) -> Path:
    """``<folder>/fit-end.ckpt``, or the first free ``fit-end-v<n>.ckpt`` (Lightning's way of versioning names)."""
    path, version = folder / f"{FIT_END_NAME}.ckpt", 0
    while path.exists():
        version += 1
        path = folder / f"{FIT_END_NAME}-v{version}.ckpt"
    return path


def _on_rank_zero(trainer: pl.Trainer, check: Callable[[], None]) -> None:
    """Run a file-system ``check`` on global rank zero (the writer) and raise its error on every rank together."""
    failure = None
    if trainer.is_global_zero:
        try:
            check()
        except (ValueError, OSError) as error:
            failure = (isinstance(error, FileExistsError), str(error))
    failure = trainer.strategy.broadcast(failure, src=0)
    if failure is not None:
        exists, message = failure
        raise (FileExistsError if exists else ValueError)(message)


class _NotifyingCheckpointIO(CheckpointIO):
    """Delegates to the strategy's CheckpointIO and tells the pruning callbacks what was written or removed.

    ``fit_end_saved`` (every rank) / ``fit_end`` (global rank zero: the checkpoint dict and path): the fit-end
    checkpoint of this fit, written once and shared by every ``when="fit_end"`` pruning callback."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner
        self.listeners: list[CheckpointPruning] = []
        self.fit_end_saved = False
        self.fit_end: tuple[dict[str, Any], Path] | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        for listener in list(self.listeners):
            listener.on_checkpoint_written(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None):
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)
        for listener in list(self.listeners):
            listener.on_checkpoint_removed(Path(path))

    def teardown(self) -> None:
        self.inner.teardown()


class CheckpointPruning(pl.Callback):
    """Edits a copy of each written checkpoint with :attr:`requests` (set by the subclass).

    Args:
        layers: module-name patterns (globs or ``re:<regex>``) of the linear layers to edit.
        when: ``fit_end`` (one ``fit-end.ckpt`` at the end of fit, after every callback before this one — e.g. a
            ``KFACFactors`` — has run its own ``on_fit_end``) or ``checkpoint`` (after every checkpoint the Trainer
            writes).
        evaluate: score the original and the edited weights (:class:`~memcurve.editing.Scorer`: the module's
            ``evaluation_metrics``, else its own validation loop on a copy).
        output_dir: folder of the report (default ``<log_dir>/pruning``).
        save_pruned: write the edited checkpoints (False: report only).
        budget: the held-out protocol's budget of ``auto`` strengths (e.g. ``Budget(max_accuracy_drop=0.01)``):
            the validation set is split into selection and test (``held_out``), each ``auto`` strength is the
            strongest within the budget on the selection split, and every score is reported on the test split.
        held_out: how the validation set is split (default when a budget is given: half selection, half test,
            seeded by the run's ``seed_everything``); given without a budget, fixed strengths are reported on both.
    """

    requests: list[EditRequest | AutoRequest]

    def __init__(
        self,
        layers: list[str],
        when: str = "fit_end",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
        budget: Budget | None = None,
        held_out: HeldOutSettings | None = None,
    ) -> None:
        self.layers = list(layer_patterns(layers))
        check_choice("when", when, WHEN)
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"budget must be a memcurve.editing.auto.Budget, not {type(budget).__name__}")
        if held_out is not None and not isinstance(held_out, HeldOutSettings):
            raise TypeError(f"held_out must be a memcurve.data.held_out.HeldOutSettings, not {type(held_out).__name__}")
        if (budget is not None or held_out is not None) and not evaluate:
            raise ValueError("budget / held_out score the edits on held-out splits: they need evaluate=True")
        self.budget = budget
        self.held_out = held_out if held_out is not None or budget is None else HeldOutSettings()
        self.when = when
        self.evaluate = evaluate
        self.output_dir = output_dir
        self.save_pruned = save_pruned
        self.rows: list[EditRow] = []
        self.layer_names: list[str] = []
        self.guard = OutputGuard(follow_sources=True)
        self._trainer: pl.Trainer | None = None
        self._unsharded: pl.LightningModule | None = None  # rank zero's copy from setup under a sharding strategy
        self._armed = when == "checkpoint"
        self._resolved: dict[str, Path] = {}

    @property
    def method(self) -> str:
        return self.requests[0].method

    # -- what a subclass may refine ----------------------------------------------------------------------
    def factors_for(self, checkpoint: dict[str, Any]) -> FactorSource:
        """The factors the requests need for this checkpoint (None: the method uses none)."""
        return None

    def bsn_settings(self) -> BalancedSubnetSettings | None:
        return None

    def unlearning_settings(self) -> UnlearningSettings | None:
        """The unlearning baselines' settings (:class:`~memcurve.callbacks.UnlearningPruning`); None: the method
        trains nothing."""
        return None

    def trains(self) -> bool:
        """Whether the method trains on the module (BalancedSubnet's mask, the unlearning baselines)."""
        return self.bsn_settings() is not None or self.unlearning_settings() is not None

    def check_factors(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Setup-time checks of what the method reads (K-FAC: the factor file or the KFACFactors callback)."""

    # -- where files go --------------------------------------------------------------------------------
    # ``trainer.log_dir`` is a collective under DDP: every rank resolves these in ``setup``, rank zero reuses them.
    def report_folder(self, trainer: pl.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return self._resolved.get("report") or Path(trainer.log_dir or trainer.default_root_dir) / "pruning"

    def fit_end_folder(self, trainer: pl.Trainer) -> Path:
        return self._resolved.get("fit_end") or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def edited_folders(self, trainer: pl.Trainer) -> list[Path]:
        """The folders edited copies will go to, as far as known before the run."""
        sources = [self.fit_end_folder(trainer)]
        if self.when == "checkpoint":
            sources += [Path(c.dirpath) for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath]
        return list(dict.fromkeys(folder / EDITED_FOLDER for folder in sources))

    def fit_end_path(self, trainer: pl.Trainer) -> Path:
        """``fit-end.ckpt`` in the checkpoint folder, or ``fit-end-v1.ckpt``, … if taken (decided on rank zero)."""
        return Path(trainer.strategy.broadcast(str(_free_name(self.fit_end_folder(trainer)))))

    def check_outputs(self, trainer: pl.Trainer) -> None:
        """The report folder (and an existing report in it), the edited copies' folders and, at fit end, the edited
        copies' paths: refused now rather than after training (checked on global rank zero, raised on every rank)."""
        self._resolved = {}  # on every rank (log_dir broadcasts), kept for the hooks that run on rank zero only
        report, fit_end_folder = self.report_folder(trainer), self.fit_end_folder(trainer)
        self._resolved = {"report": report, "fit_end": fit_end_folder}
        edited = self.edited_folders(trainer)

        def check() -> None:
            check_output_folder("output_dir", report)
            try:  # an existing report is extended: it must be one
                read_report(report, REPORT_NAME)
            except (ValueError, TypeError) as error:
                raise ValueError(
                    f"output_dir={str(report)!r} holds {REPORT_NAME}.json that is not a pruning report ({error}); "
                    "choose another output_dir"
                ) from None
            if not self.save_pruned:
                return
            for folder in edited:
                check_output_folder("save_pruned (the edited copies' folder)", folder)
            if self.when == "fit_end":
                source = _free_name(fit_end_folder)
                for request in self.requests:
                    if not isinstance(request, EditRequest):
                        continue  # an auto strength's name is known once chosen
                    path = edited_checkpoint_path(source, request)
                    self.guard.check(path, "save_pruned (an edited copy)", source=source)

        _on_rank_zero(trainer, check)

    # -- hooks -----------------------------------------------------------------------------------------
    def check_auto(self) -> None:
        """An ``auto`` strength needs a budget (called by the subclasses once their requests are set)."""
        autos = [r.tag for r in self.requests if isinstance(r, AutoRequest)]
        if autos and self.budget is None:
            raise ValueError(
                f"{type(self).__name__}: {autos} choose their strength under a budget; pass budget="
                "Budget(max_accuracy_drop=0.01) (YAML: budget: {max_accuracy_drop: 0.01}) or give strengths"
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_checkpoint_strategy(trainer.strategy)
        self.layer_names = select_linear_layers(pl_module, self.layers)
        if self.evaluate:
            check_scorable(pl_module, trainer=trainer, datamodule=trainer.datamodule)
        self.check_factors(trainer, pl_module)
        self.check_outputs(trainer)
        self._trainer = trainer
        self._unsharded = self.unsharded_copy(trainer, pl_module)
        checkpoint_io = trainer.strategy.checkpoint_io
        if not isinstance(checkpoint_io, _NotifyingCheckpointIO):
            checkpoint_io = _NotifyingCheckpointIO(checkpoint_io)
            trainer.strategy.checkpoint_io = checkpoint_io
        if self not in checkpoint_io.listeners:
            checkpoint_io.listeners.append(self)
        if stage == "fit":
            checkpoint_io.fit_end_saved, checkpoint_io.fit_end = False, None

    def unsharded_copy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> pl.LightningModule | None:
        """Under a strategy that shards parameters (FSDP, FSDP2 through ``ModelParallelStrategy``), global rank
        zero keeps a copy of the module made now, before the strategy shards it: scoring and the trained methods
        (BSN's mask, the unlearning baselines) run on rank zero alone, so they need whole parameters (each edit
        loads the checkpoint's weights into it). Host memory for one more copy of the model on rank zero; none
        without ``evaluate`` or a trained method."""
        if not shards_parameters(trainer.strategy) or not (self.evaluate or self.trains()):
            return None
        if parameters_sharded(pl_module):
            raise ValueError(
                f"{type(self).__name__} under {type(trainer.strategy).__name__}: the module's parameters are already "
                "sharded at setup, so there is no whole copy to score or train on rank zero; shard in configure_model "
                "(Lightning calls it after the callbacks' setup)"
                + ("" if self.trains() else ", or pass evaluate=False")
            )
        return single_process_copy(pl_module) if trainer.is_global_zero else None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "fit_end":
            return
        checkpoint_io = trainer.strategy.checkpoint_io
        shared = isinstance(checkpoint_io, _NotifyingCheckpointIO)
        if shared and checkpoint_io.fit_end_saved:  # an earlier pruning callback wrote this fit's fit-end checkpoint
            if checkpoint_io.fit_end is not None:
                self.prune(*checkpoint_io.fit_end)
            return
        self._armed = True
        try:
            trainer.save_checkpoint(self.fit_end_path(trainer))
        finally:
            self._armed = False
        if shared:
            checkpoint_io.fit_end_saved = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        checkpoint_io = trainer.strategy.checkpoint_io
        if isinstance(checkpoint_io, _NotifyingCheckpointIO):
            checkpoint_io.fit_end = None  # the dict holds the weights: let it go
            if self in checkpoint_io.listeners:
                checkpoint_io.listeners.remove(self)
        self._unsharded = None

    # -- the work (global rank zero, after a checkpoint file was written or removed) --------------------------
    def on_checkpoint_written(self, checkpoint: dict[str, Any], path: Path) -> None:
        if not self._armed or checkpoint.get(EDIT_KEY) is not None:
            return
        if self.when == "fit_end":
            checkpoint_io = self._trainer.strategy.checkpoint_io if self._trainer is not None else None
            if isinstance(checkpoint_io, _NotifyingCheckpointIO):
                checkpoint_io.fit_end = (checkpoint, path)
        self.prune(checkpoint, path)

    def on_checkpoint_removed(self, path: Path) -> None:
        """Lightning removed ``path`` (e.g. ``ModelCheckpoint`` rotation): its edited copies go with it."""
        if self.save_pruned:
            chosen = [r for r in self.requests if isinstance(r, EditRequest)]
            chosen += [
                EditRequest(row.method, tuple(row.layers), **{row.kind: row.strength}) for row in self.rows if row.auto
            ]
            for removed in remove_edited_copies(path, chosen):
                self.guard.created.discard(removed.resolve())
                rank_zero_info(f"memcurve: removed {removed} with its source {path}")

    def prune(self, checkpoint: dict[str, Any], path: Path) -> list[EditRow]:
        trainer = self._trainer
        module = self._unsharded if self._unsharded is not None else trainer.lightning_module
        protocol = self.protocol(trainer, module) if self.held_out is not None else None
        rows = edit_checkpoint(
            checkpoint,
            path,
            self.requests,
            module=module,
            datamodule=trainer.datamodule,
            factors=self.factors_for(checkpoint),
            bsn=self.bsn_settings(),
            unlearning=self.unlearning_settings(),
            scorer=Scorer(module, trainer.datamodule, trainer) if self.evaluate and protocol is None else None,
            protocol=protocol,
            save=self.save_pruned,
            guard=self.guard,
            log=rank_zero_info,
        )
        self.rows.extend(rows)
        folder = self.report_folder(trainer)
        write_report(folder, rows, REPORT_NAME)
        skills = plot_skills(self.rows, memorized_min_level(module)) if self.evaluate else None
        if skills is not None:  # a model trained with the perturbation suite: retention per skill category
            atomic_write(folder / f"{REPORT_NAME}_skills.png", lambda tmp: skills.savefig(tmp, format="png", dpi=120))
        if isinstance(trainer.logger, TensorBoardLogger):
            log_rows(trainer.logger.experiment, rows)
            if skills is not None:
                trainer.logger.experiment.add_figure("prune/skills", skills, trainer.global_step)
        return rows

    def protocol(self, trainer: pl.Trainer, module: pl.LightningModule) -> Protocol:
        """The held-out protocol of this run: its validation set split by ``held_out`` (seeded by ``held_out.seed``
        or the run's ``seed_everything``), saved as ``held_out_splits-<sha256[:8]>.json`` in the report folder (a
        name per split: an earlier run's split in the same folder is never replaced)."""
        datamodule = trainer.datamodule
        size = len(single_validation_loader(module, datamodule, trainer).dataset)
        splits = split_held_out(size, self.held_out, seed=global_seed())
        path = self.report_folder(trainer) / f"held_out_splits-{splits.sha256[:8]}.json"
        splits.save(path)
        rank_zero_info(f"memcurve: {type(self).__name__}: {splits.name} -> {path}")
        return Protocol(module, datamodule, splits, self.budget, trainer=trainer)

    # -- state (survives ckpt_path= resume) ----------------------------------------------------------------
    @property
    def state_key(self) -> str:
        # Several pruning callbacks (methods, layer sets) may share a Trainer: each keeps its own state. The key
        # depends on the requests only, so the same callback in a resumed run finds its state.
        return self._generate_state_key(requests=[request.tag for request in self.requests])

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(row) for row in self.rows], "written": sorted(str(p) for p in self.guard.created)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [EditRow(**row) for row in state_dict.get("rows", [])]
        for path in state_dict.get("written", []):
            self.guard.record(path)
