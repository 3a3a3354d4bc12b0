"""Shared machinery of the checkpoint-time pruning callbacks (KFACPruning, SVDPruning, BalancedSubnetPruning)
and their CLI.

A pruning callback never touches the live model or the original checkpoint file. When a checkpoint has been
written (every save with ``when="checkpoint"``; one ``fit-end.ckpt`` with ``when="fit_end"``), it rewrites a
copy of ``checkpoint["state_dict"]`` — the selected layers edited, everything else shared — and writes it
atomically as a separate checkpoint beside the original, ``<name>-<tag>.ckpt`` (e.g. ``last-kfac-e0.60.ckpt``).
With ``evaluate`` it scores the original and the pruned weights on the same data (for the noisy-label ViT:
``val/acc``, ``mem/noised_acc``, ``mem/gt_recovery``, ``mem/clean_train_acc``; any LightningModule with an
``evaluation_metrics(datamodule)`` method works), logs them to TensorBoard under ``prune/<method>/<metric>``
with the energy in percent as the step, and appends rows to ``pruning_report.json`` / ``.csv``.

The hook point is the strategy's ``CheckpointIO``: the callback wraps it so it learns the path of every file the
Trainer writes, on global rank zero, right after the write. Evaluation then runs on rank zero over the whole
(unsharded) data, so a DDP run reports the same figures as one process.

Standalone on a finished checkpoint, and energy / layer sweeps::

    python -m memcurve.callbacks.checkpoint_pruning --config configs/vit_digits_noisy.yaml \\
        --ckpt runs/.../checkpoints/last.ckpt --factors runs/.../kfac/kfac-final.safetensors \\
        --methods kfac-kronecker kfac-separable svd --energies 0.6 0.75 0.9 --keep-fractions 0.002 0.01 \\
        --layer-groups 'model.blocks.[0-5].mlp.fc?' 'model.blocks.[3-5].mlp.fc?' --output-dir runs/sweep
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from memcurve.curvature import LayerEdit, compile_layer_patterns
from memcurve.utils.files import atomic_write

__all__ = [
    "CheckpointPruning",
    "PruningRow",
    "PruningSpec",
    "markdown_table",
    "read_report",
    "report_columns",
    "write_report",
]

METHODS = ("kfac-kronecker", "kfac-separable", "svd", "balanced_subnet")
# Default columns (metric key, short header) of the tables; a LightningModule overrides them with a
# ``report_metrics`` attribute (the causal LM reports recall, perplexity and nDCG instead).
REPORT_METRICS = (
    ("val/acc", "val/acc"),
    ("mem/noised_acc", "mem"),
    ("mem/gt_recovery", "GT"),
    ("mem/clean_train_acc", "clean"),
)
REPORT_NAME = "pruning_report"


@dataclass(frozen=True)
class PruningSpec:
    """One edit: a method and exactly one of an energy fraction or a keep fraction."""

    method: str  # "kfac-kronecker", "kfac-separable", "svd" or "balanced_subnet" (keep_fraction = 1 − ratio)
    energy: float | None = None
    keep_fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.energy is None) == (self.keep_fraction is None):
            raise ValueError(
                f"give exactly one of energy or keep_fraction; got energy={self.energy!r}, "
                f"keep_fraction={self.keep_fraction!r}"
            )
        for name in ("energy", "keep_fraction"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(f"{name}={value!r} must be in (0, 1]")

    @property
    def tag(self) -> str:
        """File-name tag: ``kfac-e0.60``, ``kfac-sep-k0.010``, ``svd-e0.90``, ``bsn-r0.0015`` (the pruned ratio)."""
        if self.method == "balanced_subnet" and self.keep_fraction is not None:
            return f"bsn-r{1.0 - self.keep_fraction:.4g}"
        base = {"kfac-kronecker": "kfac", "kfac-separable": "kfac-sep", "svd": "svd"}[self.method]
        return f"{base}-e{self.energy:.2f}" if self.energy is not None else f"{base}-k{self.keep_fraction:.3f}"

    @property
    def step(self) -> int:
        """TensorBoard step: the energy (or keep fraction) in percent, so curves read against it."""
        value = self.energy if self.energy is not None else self.keep_fraction
        return round(100 * value)


@dataclass
class PruningRow:
    """One line of the report: what was edited, how much, and the metrics before and after."""

    method: str
    energy: float | None
    keep_fraction: float | None
    layers: list[str]
    kept_pairs: int
    total_pairs: int
    kept_pair_fraction: float
    relative_change: float
    source_checkpoint: str
    pruned_checkpoint: str | None
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        row = {key: value for key, value in asdict(self).items() if key not in ("before", "after", "layers")}
        row["layers"] = " ".join(self.layers)
        for key in sorted(set(self.before) | set(self.after)):
            row[f"before {key}"] = self.before.get(key, math.nan)
            row[f"after {key}"] = self.after.get(key, math.nan)
        return row


def read_report(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / f"{REPORT_NAME}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def write_report(folder: str | Path, rows: Sequence[PruningRow], append: bool = True) -> Path:
    """Write (or extend) ``pruning_report.json`` and ``pruning_report.csv`` atomically; returns the JSON path."""
    folder = Path(folder)
    records = (read_report(folder) if append else []) + [asdict(row) for row in rows]
    atomic_write(folder / f"{REPORT_NAME}.json", lambda tmp: tmp.write_text(json.dumps(records, indent=1)))
    flat = [PruningRow(**record).flat() for record in records]
    columns = list(dict.fromkeys(key for row in flat for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    atomic_write(folder / f"{REPORT_NAME}.csv", lambda tmp: tmp.write_text(buffer.getvalue()))
    return folder / f"{REPORT_NAME}.json"


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
    """Base of the pruning callbacks: subclasses implement :meth:`edit_state_dict`.

    Args:
        method: the edit, ``kfac-kronecker``, ``kfac-separable`` or ``svd`` (set by the subclass).
        layers: module-name patterns (globs or ``re:<regex>``) of the ``nn.Linear`` layers to edit.
        energy: fraction(s) of the spectrum energy to keep, each in (0, 1]; one pruned checkpoint per value.
        keep_fraction: fraction(s) of directions to keep by count (alternative to ``energy``).
        when: ``checkpoint`` (after every checkpoint the Trainer writes) or ``fit_end`` (one ``fit-end.ckpt``).
        evaluate: score the original and the pruned weights with the module's ``evaluation_metrics``.
        output_dir: folder of the report (default ``<log_dir>/pruning``); pruned checkpoints go beside their
            originals.
        save_pruned: write the pruned checkpoints (False: report only).
    """

    def __init__(
        self,
        method: str,
        layers: list[str],
        energy: float | list[float] | None = None,
        keep_fraction: float | list[float] | None = None,
        when: str = "checkpoint",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
    ) -> None:
        compile_layer_patterns(layers)
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not supported; choose one of {METHODS}")
        if when not in ("checkpoint", "fit_end"):
            raise ValueError(f"when={when!r} is not supported; choose one of ('checkpoint', 'fit_end')")
        energies = [energy] if isinstance(energy, (int, float)) else list(energy or [])
        fractions = [keep_fraction] if isinstance(keep_fraction, (int, float)) else list(keep_fraction or [])
        if not energies and not fractions:
            raise ValueError("give energy=... (fraction of the spectrum energy to keep) or keep_fraction=...")
        self.specs = [PruningSpec(method, energy=value) for value in energies]
        self.specs += [PruningSpec(method, keep_fraction=value) for value in fractions]
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.method = method
        self.when = when
        self.evaluate = evaluate
        self.output_dir = output_dir
        self.save_pruned = save_pruned
        self.rows: list[PruningRow] = []
        self._trainer: pl.Trainer | None = None
        self._armed = when == "checkpoint"

    # -- subclass API ----------------------------------------------------------------------------------
    def edit_state_dict(
        self, state_dict: dict[str, torch.Tensor], spec: PruningSpec, checkpoint: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, LayerEdit]]:
        """Return an edited copy of ``state_dict`` and the per-layer :class:`LayerEdit` results."""
        raise NotImplementedError

    # -- hooks -----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from memcurve.curvature import select_linear_layers

        self.layer_names = select_linear_layers(pl_module, self.layers)
        if self.evaluate and not callable(getattr(pl_module, "evaluation_metrics", None)):
            raise TypeError(
                f"evaluate=True needs {type(pl_module).__name__}.evaluation_metrics(datamodule); "
                "pass evaluate=False to only write pruned checkpoints"
            )
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
        if not self._armed or checkpoint.get("memcurve_pruning") is not None:
            return
        trainer = self._trainer
        rows = self.prune_checkpoint(checkpoint, path, trainer.lightning_module, trainer.datamodule)
        folder = Path(self.output_dir) if self.output_dir else Path(trainer.log_dir or ".") / "pruning"
        write_report(folder, rows)
        self.log_rows(trainer, rows)

    def prune_checkpoint(
        self,
        checkpoint: dict[str, Any],
        path: Path,
        module: pl.LightningModule | None,
        datamodule: Any,
        before: dict[str, float] | None = None,
    ) -> list[PruningRow]:
        """Edit, write and (optionally) evaluate every spec for one checkpoint; returns the report rows.

        ``before``: the metrics of the unedited checkpoint when already known (several methods compared on one
        checkpoint score it once); otherwise they are computed here when ``evaluate``.
        """
        original = checkpoint["state_dict"]
        scorer = None
        if self.evaluate:
            scorer = copy.deepcopy(module)  # the live model is never modified
            before = dict(before) if before is not None else self._score(scorer, original, datamodule, original)
        before = before if before is not None else {}
        rows = []
        for spec in self.specs:
            edited, results = self.edit_state_dict(original, spec, checkpoint)
            pruned_path = None
            if self.save_pruned:
                pruned_path = path.with_name(f"{path.stem}-{spec.tag}{path.suffix}")
                pruned = dict(checkpoint)
                pruned["state_dict"] = edited
                pruned["memcurve_pruning"] = {"source": str(path), **asdict(spec), "layers": sorted(results)}
                atomic_write(pruned_path, lambda tmp, payload=pruned: torch.save(payload, tmp))
            after = self._score(scorer, edited, datamodule, original) if scorer is not None else {}
            kept = sum(result.kept_pairs for result in results.values())
            total = sum(result.total_pairs for result in results.values())
            change = math.sqrt(sum(result.change_norm**2 for result in results.values()))
            norm = math.sqrt(sum(result.weight_norm**2 for result in results.values()))
            rows.append(
                PruningRow(
                    method=spec.method,
                    energy=spec.energy,
                    keep_fraction=spec.keep_fraction,
                    layers=sorted(results),
                    kept_pairs=kept,
                    total_pairs=total,
                    kept_pair_fraction=kept / total if total else math.nan,
                    relative_change=change / norm if norm else math.nan,
                    source_checkpoint=str(path),
                    pruned_checkpoint=str(pruned_path) if pruned_path else None,
                    before=before,
                    after=after,
                )
            )
            rank_zero_info(
                f"memcurve: {spec.tag} on {len(results)} layers: kept {kept}/{total} directions"
                + (f"; {_summary(before, after, report_columns([], module))}" if after else "")
                + (f" -> {pruned_path}" if pruned_path else "")
            )
        self.rows.extend(rows)
        return rows

    @staticmethod
    def _score(
        scorer: pl.LightningModule,
        state_dict: dict[str, torch.Tensor],
        datamodule: Any,
        reference: dict[str, torch.Tensor],
    ) -> dict[str, float]:
        scorer.load_state_dict(state_dict)
        if "reference_state_dict" in inspect.signature(scorer.evaluation_metrics).parameters:
            # Metrics relative to the unedited model (the LM's nDCG) always get the ORIGINAL weights as reference.
            return scorer.evaluation_metrics(datamodule, shard=False, reference_state_dict=reference)
        return scorer.evaluation_metrics(datamodule, shard=False)

    def log_rows(self, trainer: pl.Trainer, rows: Sequence[PruningRow]) -> None:
        if not isinstance(trainer.logger, TensorBoardLogger):
            return
        experiment = trainer.logger.experiment
        for row in rows:
            spec = PruningSpec(row.method, row.energy, row.keep_fraction)
            for key, value in row.after.items():
                experiment.add_scalar(f"prune/{row.method}/{key}", value, spec.step)
            for key, value in row.before.items():
                experiment.add_scalar(f"prune/{row.method}/{key}", value, 100)  # 100%: nothing removed
            experiment.add_scalar(f"prune/{row.method}/kept_pair_fraction", row.kept_pair_fraction, spec.step)
        experiment.flush()

    @property
    def state_key(self) -> str:
        # Several pruning callbacks (methods, layer groups) may share a Trainer: each keeps its own state.
        return self._generate_state_key(method=self.method, layers=self.layers, specs=[s.tag for s in self.specs])

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [PruningRow(**row) for row in state_dict.get("rows", [])]


def _summary(before: dict[str, float], after: dict[str, float], columns: Sequence[tuple[str, str]]) -> str:
    return ", ".join(
        f"{name} {before.get(key, math.nan):.3f}->{after[key]:.3f}" for key, name in columns if key in after
    )


def report_columns(rows: Sequence[PruningRow], module: Any = None) -> list[tuple[str, str]]:
    """``(metric key, header)`` of the table columns: the module's ``report_metrics`` (default: the noisy-label
    classifier's), keeping those the rows carry; rows with none of them show every metric they have."""
    columns = list(getattr(module, "report_metrics", None) or REPORT_METRICS)
    present = {key for row in rows for key in (*row.before, *row.after)}
    if not rows:
        return columns
    kept = [(key, name) for key, name in columns if key in present]
    return kept or [(key, key) for key in sorted(present)]


# -- standalone pruning and sweeps ----------------------------------------------------------------------------
def _build_callback(
    method: str,
    layers: list[str],
    specs: list[PruningSpec],
    factors: str | None,
    save: bool,
    evaluate: bool = True,
    **options: Any,
):
    """The pruning callback of ``method`` for ``specs``; ``options``: BalancedSubnetPruning's arguments (its
    ``ratio`` list, or else ``1 − keep_fraction`` of the specs)."""
    from memcurve.callbacks.kfac_pruning import KFACPruning
    from memcurve.callbacks.svd_pruning import SVDPruning

    energies = [spec.energy for spec in specs if spec.energy is not None]
    fractions = [spec.keep_fraction for spec in specs if spec.keep_fraction is not None]
    if method == "balanced_subnet":
        from memcurve.callbacks.balanced_subnet_pruning import BalancedSubnetPruning

        if energies:
            raise ValueError(
                f"balanced_subnet prunes a ratio of each layer's weights (keep_fraction = 1 − ratio), not an energy; "
                f"got energies {energies}"
            )
        if fractions and "ratio" in options:
            raise ValueError("give balanced_subnet either ratio=... or keep-fraction specs, not both")
        options.setdefault("ratio", [1.0 - fraction for fraction in fractions])
        return BalancedSubnetPruning(layers, save_pruned=save, evaluate=evaluate, **options)
    if options:
        raise ValueError(f"{method} takes no options {sorted(options)}")
    if method == "svd":
        return SVDPruning(layers, energy=energies, keep_fraction=fractions, save_pruned=save, evaluate=evaluate)
    return KFACPruning(
        layers,
        factors=factors or "latest",
        energy=energies,
        keep_fraction=fractions,
        mode=method.removeprefix("kfac-"),
        save_pruned=save,
        evaluate=evaluate,
    )


def load_for_pruning(
    config: str, ckpt: str | None, output_dir: str | None
) -> tuple[pl.LightningModule, Any, dict[str, Any], Path]:
    """``(module, datamodule, checkpoint, ckpt_path)`` of a run, as the pruning CLIs need them.

    The config builds the module and the datamodule (``train.py``'s CLI, nothing is run); ``ckpt`` is loaded into
    the module, or without it the weights the config builds are used (e.g. a pretrained hub model) and the pruned
    files would go to ``<output_dir>/checkpoints/model-<tag>.ckpt``. The datamodule is set up and checked against
    the label noise the checkpoint recorded.
    """
    if ckpt is None and output_dir is None:
        raise ValueError("without --ckpt (pruning the config's model as built) give --output-dir")
    ckpt_path = Path(ckpt) if ckpt is not None else Path(output_dir) / "checkpoints" / "model.ckpt"
    if ckpt is not None and not ckpt_path.is_file():
        raise FileNotFoundError(f"--ckpt '{ckpt_path}' does not exist")
    from memcurve.train import instantiate  # deferred: the CLI module imports every component

    cli = instantiate(config)
    module, datamodule = cli.model, cli.datamodule
    if ckpt is not None:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        module.load_state_dict(checkpoint["state_dict"])
    else:  # the weights the config builds (a pretrained hub model); pruned files go under output_dir
        checkpoint = {"state_dict": module.state_dict()}
    datamodule.setup("fit")
    saved_noise = checkpoint.get(type(datamodule).__qualname__)
    if saved_noise:
        datamodule.load_state_dict(saved_noise)  # the noise of the run must match (clear error otherwise)
    return module, datamodule, checkpoint, ckpt_path


def plot_sweep(rows: Sequence[PruningRow], labels: Sequence[str], path: Path, module: Any = None) -> Any:
    """Metric vs kept fraction (energy or keep fraction, log axis) per method and layer group; saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = report_columns(rows, module)
    figure, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.6), squeeze=False)
    for axis, (metric, header) in zip(axes[0], columns):
        for criterion in ("energy", "keep_fraction"):
            for label in dict.fromkeys(labels):
                for method in METHODS:
                    points = sorted(
                        (getattr(row, criterion), row.after.get(metric, math.nan))
                        for row, row_label in zip(rows, labels)
                        if row.method == method and row_label == label and getattr(row, criterion) is not None
                    )
                    if points:
                        style = "-o" if criterion == "energy" else "--s"
                        axis.plot(*zip(*points), style, markersize=3, label=f"{method} {label} ({criterion})")
        before = next((row.before.get(metric) for row in rows if row.before), None)
        if before is not None:
            axis.axhline(before, color="grey", linestyle=":", label="unedited")
        axis.set_xscale("log")
        axis.set_title(f"{header} ({metric})" if header != metric else metric)
        axis.set_xlabel("kept fraction (energy or pairs)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="best")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    return figure


def markdown_table(rows: Sequence[PruningRow], labels: Sequence[str], module: Any = None) -> str:
    """Before/after table: one line for the unedited weights, one per edit; columns from :func:`report_columns`."""
    columns = report_columns(rows, module)
    header = " | ".join(name for _, name in columns)
    lines = [f"| layers | method | energy | keep | kept pairs | {header} |", "|---" * (5 + len(columns)) + "|"]
    if rows and rows[0].before:
        before = " | ".join(f"{rows[0].before.get(key, math.nan):.3f}" for key, _ in columns)
        lines.append(f"| – | unedited | – | – | – | {before} |")
    for row, label in zip(rows, labels):
        after = row.after
        energy = f"{row.energy:.3f}" if row.energy is not None else "–"
        keep = f"{row.keep_fraction:.4f}" if row.keep_fraction is not None else "–"
        metrics = " | ".join(f"{after.get(key, math.nan):.3f}" for key, _ in columns)
        lines.append(f"| {label} | {row.method} | {energy} | {keep} | {row.kept_pair_fraction:.4%} | {metrics} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[PruningRow]:
    """Prune a finished checkpoint with K-FAC and/or SVD edits, over energies and layer groups; report all."""
    parser = argparse.ArgumentParser(prog="python -m memcurve.callbacks.checkpoint_pruning", description=main.__doc__)
    parser.add_argument("--config", required=True, help="the run's config: builds the model and the data")
    parser.add_argument(
        "--ckpt",
        default=None,
        help="the checkpoint to prune (never modified); default: the config's model as built (e.g. pretrained "
        "weights of a hub model; then --factors and --output-dir are required)",
    )
    parser.add_argument("--factors", default=None, help="KFACFactors file (default: the one the checkpoint records)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["kfac-kronecker"],
        choices=[method for method in METHODS if method != "balanced_subnet"],
        help="balanced_subnet takes a ratio, not an energy: compare it with python -m memcurve.compare",
    )
    parser.add_argument("--energies", nargs="*", type=float, default=[])
    parser.add_argument("--keep-fractions", nargs="*", type=float, default=[])
    parser.add_argument(
        "--layer-groups",
        nargs="+",
        required=True,
        help="one group per argument; patterns inside a group separated by commas",
    )
    parser.add_argument("--output-dir", default=None, help="report folder (default: <ckpt folder>/../pruning)")
    parser.add_argument("--save", action="store_true", help="also write the pruned checkpoints")
    args = parser.parse_args(argv)
    if args.ckpt is None and (args.factors is None or args.output_dir is None):
        raise ValueError("without --ckpt (pruning the config's model as built) give --factors and --output-dir")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"--ckpt '{args.ckpt}' does not exist")
    if args.factors is not None and not Path(args.factors).is_file():
        raise FileNotFoundError(f"--factors '{args.factors}' does not exist")
    if not args.energies and not args.keep_fractions:
        raise ValueError("give --energies and/or --keep-fractions")
    module, datamodule, checkpoint, ckpt_path = load_for_pruning(args.config, args.ckpt, args.output_dir)
    from memcurve.curvature import select_linear_layers

    rows: list[PruningRow] = []
    labels: list[str] = []
    for group in args.layer_groups:
        patterns = [pattern.strip() for pattern in group.split(",") if pattern.strip()]
        for method in args.methods:
            specs = [PruningSpec(method, energy=value) for value in args.energies]
            specs += [PruningSpec(method, keep_fraction=value) for value in args.keep_fractions]
            callback = _build_callback(method, patterns, specs, args.factors, args.save)
            callback.layer_names = select_linear_layers(module, patterns)
            new_rows = callback.prune_checkpoint(checkpoint, ckpt_path, module, datamodule)
            rows += new_rows
            labels += [group] * len(new_rows)
    output_dir = Path(args.output_dir) if args.output_dir else ckpt_path.parent.parent / "pruning"
    write_report(output_dir, rows)
    figure = plot_sweep(rows, labels, output_dir / "pruning_sweep.png", module)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(output_dir / "tensorboard"))
    for row, label in zip(rows, labels):
        step = PruningSpec(row.method, row.energy, row.keep_fraction).step
        for key, value in row.after.items():
            writer.add_scalar(f"prune/{row.method}/{label}/{key}", value, step)
    writer.add_figure("prune/sweep", figure)
    writer.close()
    table = markdown_table(rows, labels, module)
    atomic_write(output_dir / "pruning_table.md", lambda tmp: tmp.write_text(table + "\n"))
    print(table)
    print(f"report: {output_dir / (REPORT_NAME + '.csv')}, figure: {output_dir / 'pruning_sweep.png'}")
    return rows


if __name__ == "__main__":
    main()
