"""KFACFactors: collect K-FAC curvature factors of chosen ``nn.Linear`` layers from inside any Lightning run.

At the chosen moment (end of fit, every N epochs, every checkpoint save, or the end of ``trainer.validate``
for a finished checkpoint) the callback runs a factor pass over a dataloader in eval mode — forward, Fisher
targets sampled from the model (or the data labels), backward down to the layer outputs only — and writes the
eigendecomposed factors as a validated safetensors file. It never updates a parameter and restores train mode
and ``requires_grad`` afterwards. Under DDP each rank reads a disjoint, unpadded shard, sums and counts are
reduced (any backend, gloo included) and only global rank zero decomposes and writes.

At scale (``settings.sharded``; OLMo-2 1B/7B under ``strategy="ddp"`` or ``"fsdp"``): each layer's sums are reduced
to one owning rank (largest layers first, to the least-loaded rank), the owner eigendecomposes them and writes
its own shard, and rank zero writes ``<stem>.index.json`` (see :mod:`memcurve.curvature.sharded_storage`); the pruning
and probe callbacks read the index like a single file, loading layers on first access. Before the pass a memory
plan (per layer: A and G sums, results; per rank: collect / owner / host memory) is printed and checked against
``memory_budget_gb``; ``separate_passes`` and ``offload_to_cpu`` lower the device peak. After it, tokens/s and
peak memory are printed and logged (``kfac/tokens_per_s``, ``kfac/peak_memory_gb``, ...).

Every option of the pass lives in one :class:`~memcurve.curvature.FactorSettings` (``settings``, declared and
validated once, shared with ``collect_factors`` and the command line); the callback's own arguments say only
which layers, from which loader, when, and where the file goes. On a checkpoint from any earlier run, drive it
with ``trainer.validate(model, datamodule=..., ckpt_path=...)`` and ``when="validate"`` (``memcurve factors``
does that from a config).

Any LightningModule works with the defaults: the data are the run's own loaders, taken from the trainer (a
DataModule, loaders passed to ``trainer.fit(model, train, val)`` / ``trainer.validate(model, loaders)``, or the
module's hooks), and batches and outputs are read by :class:`~memcurve.adapters.AutoFisherAdapter` (tuples, lists,
dicts with ``image``/``pixel_values``/``input_ids``/... keys; tensors or ``ModelOutput.logits``); ``setup`` checks
one example's layout, the output folder and that no file of another run would be overwritten (``overwrite``).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

try:  # POSIX only; elsewhere the peak memory of a CPU pass is reported as unavailable
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

from memcurve.adapters import (
    AutoFisherAdapter,
    FisherAdapter,
    dataloader_origin,
    default_fisher_adapter,
    find_dataloader,
    sample_batch,
    sequential_loader,
)
from memcurve.callbacks.scheduled_analysis import WHEN, ScheduledAnalysis, check_name_template
from memcurve.curvature import (
    LayerEigen,
    LayerFactors,
    LayerSums,
    compile_layer_patterns,
    eigendecompose_layer,
    model_fingerprint,
    save_factors,
    select_linear_layers,
    threshold_for_energy,
)
from memcurve.curvature.collect import collect_sums, merge_passes
from memcurve.curvature.layers import layer_dims
from memcurve.curvature.memory_plan import MemoryPlan, format_bytes, plan_memory
from memcurve.curvature.owners import assign_owners, reduce_to_owners
from memcurve.curvature.settings import DEFAULT_SETTINGS, FactorSettings
from memcurve.curvature.sharded_storage import INDEX_SUFFIX, save_sharded_factors, shard_name
from memcurve.data.held_out import HeldOutSettings, global_seed, split_held_out, subset_loader
from memcurve.utils.arguments import check_choice, check_positive_int
from memcurve.utils.distributed import comm_device, is_distributed

__all__ = ["KFACFactors", "effective_rank"]

DATALOADERS = ("train", "val")
DEFAULT_FILENAMES = {
    "fit_end": "kfac-final.safetensors",
    "every_n_epochs": "kfac-epoch{epoch:03d}.safetensors",
    "checkpoint": "kfac-epoch{epoch:03d}-step{step}.safetensors",
    "validate": "kfac.safetensors",
}


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """``exp`` of the entropy of the normalised spectrum (Roy & Vetterli 2007): 1 for rank one, n for flat."""
    values = eigenvalues.double().clamp_min(0)
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


class KFACFactors(ScheduledAnalysis):
    """Collect and store K-FAC factors (A = E[a aᵀ], G = E[g gᵀ]) of the layers matching ``layers``.

    Args:
        layers: module-name patterns relative to the LightningModule: globs (``model.blocks.*.mlp.fc?``) or
            ``re:<regex>``.
        settings: everything about the pass — mode, Fisher type and draws, positions, bias, dtype, seed, how
            much data, storage and memory options — as one :class:`~memcurve.curvature.FactorSettings` (default:
            its defaults). In a config: ``settings: {position: cls, fisher: sampled, mc_samples: 4}``.
        dataloader: ``train`` (the run's training data: a datamodule's unaugmented ``memorization_dataloader`` when
            it has one, else the training loader of the run, see :func:`~memcurve.adapters.find_dataloader`),
            ``val`` (its validation loader), or a callable ``trainer -> DataLoader``. Read in order, as unpadded
            shards under DDP.
        when: ``fit_end``, ``every_n_epochs``, ``checkpoint`` (each checkpoint save; the file is recorded in
            the checkpoint under ``"kfac_factors"``) or ``validate`` (end of ``trainer.validate``).
        every_n_epochs: period for ``when="every_n_epochs"``.
        output_dir: folder of the factor files (default: ``<log_dir>/kfac``); checked in ``setup``.
        filename: file name, may use ``{epoch}`` and ``{step}`` (defaults per ``when``); with
            ``settings.sharded`` the index is ``<filename stem>.index.json`` (recorded in ``saved_paths``).
        adapter: how logits/labels/indices/masks come out of a batch (default: the LightningModule's
            ``fisher_adapter()`` if it has one, else :class:`~memcurve.adapters.AutoFisherAdapter`, which infers
            them); it also decides ``settings.drop_last_position=None``.
        log_spectra: log eigenvalue histograms, effective ranks and energy concentration to TensorBoard.
        overwrite: replace existing files this callback did not write (another run's); by default they are
            refused in ``setup`` (a resumed run may rewrite the files of the run it resumes).
        held_out: with ``dataloader="val"``, read only the ``factors`` role of the held-out protocol's split of the
            validation set (:class:`~memcurve.data.held_out.HeldOutSettings` with ``factor_fraction > 0``; seeded by
            ``held_out.seed`` or the run's ``seed_everything``), so that the pruning callbacks' selection and test
            splits (the same settings) never overlap the factor data; they check that the settings agree.
    """

    def __init__(
        self,
        layers: list[str],
        settings: FactorSettings = DEFAULT_SETTINGS,
        dataloader: str | Callable[[pl.Trainer], DataLoader] = "train",
        when: str = "fit_end",
        every_n_epochs: int = 1,
        output_dir: str | None = None,
        filename: str | None = None,
        adapter: FisherAdapter | None = None,
        log_spectra: bool = True,
        overwrite: bool = False,
        held_out: HeldOutSettings | None = None,
    ) -> None:
        compile_layer_patterns(layers)
        if held_out is not None:
            if not isinstance(held_out, HeldOutSettings):
                raise TypeError(
                    f"held_out must be a memcurve.data.held_out.HeldOutSettings, not {type(held_out).__name__}"
                )
            if dataloader != "val" or held_out.factor_fraction <= 0:
                raise ValueError(
                    f"held_out={held_out!r} reads the factor role of the validation set: it needs dataloader='val' "
                    f"(got {dataloader!r}) and held_out.factor_fraction > 0"
                )
        if not isinstance(settings, FactorSettings):
            raise TypeError(
                f"settings must be a memcurve.curvature.FactorSettings (e.g. FactorSettings(position='cls')) or "
                f"None, not {type(settings).__name__}"
            )
        if not callable(dataloader):
            check_choice("dataloader", dataloader, DATALOADERS)
        check_choice("when", when, WHEN)
        check_positive_int("every_n_epochs", every_n_epochs, allow_none=False)
        if adapter is not None and not isinstance(adapter, FisherAdapter):
            raise TypeError(f"adapter must be a memcurve.curvature.FisherAdapter, not {type(adapter).__name__}")
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite={overwrite!r} must be True or False")
        if filename is not None:
            check_name_template("filename", filename)
        if settings.sharded and not (filename or DEFAULT_FILENAMES[when]).endswith(".safetensors"):
            raise ValueError(
                f"filename={filename!r}: sharded=True needs a '<stem>.safetensors' name (the index is "
                "<stem>.index.json)"
            )
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.held_out = held_out
        self.settings = settings
        self.dataloader = dataloader
        self.when = when
        self.every_n_epochs = every_n_epochs
        self.output_dir = output_dir
        self.filename = filename or DEFAULT_FILENAMES[when]
        self.adapter = adapter
        self.log_spectra = log_spectra
        self.overwrite = overwrite
        self.layer_names: list[str] = []
        self.saved_paths: list[str] = []
        self.last_throughput: dict[str, float] = {}
        self.memory_plan: MemoryPlan | None = None
        self.pass_settings: FactorSettings | None = None  # ``settings`` with drop_last_position decided (by setup)
        self._fingerprint: str | None = None
        self._dims: dict[str, tuple[int, int]] = {}

    default_subdir = "kfac"

    # -- eager checks against the model, the data and the file system --------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        settings = self.settings
        self.layer_names = select_linear_layers(pl_module, self.layers, settings.on_non_linear)
        if self.adapter is None:
            self.adapter = default_fisher_adapter(pl_module)
        self.pass_settings = settings.resolve(self.adapter)
        self.check_outputs_at_setup(trainer, stage)
        if _is_fsdp(trainer) and not settings.sharded:
            raise ValueError(
                f"{type(trainer.strategy).__name__}: KFACFactors under FSDP needs settings.sharded=True (parameters "
                "are sharded views there; the sharded writer reads layer shapes from the modules and the fingerprint "
                "from setup)"
            )
        rank_zero_info(f"memcurve: K-FAC factors for {len(self.layer_names)} layers ({self.when}): {self.layer_names}")
        # Before the strategy wraps the model (FSDP shards parameters and renames modules): shapes and fingerprint.
        self._dims = layer_dims(pl_module, self.layer_names, settings.bias)
        self._fingerprint = model_fingerprint(pl_module)
        self.memory_plan = plan_memory(
            self._dims,
            self.owners(trainer.world_size),
            world_size=trainer.world_size,
            dtype=settings.dtype,
            store=settings.store,
            separate_passes=settings.separate_passes,
            offload_to_cpu=settings.offload_to_cpu,
        )
        rank_zero_info("memcurve: " + self.memory_plan.table())
        self.memory_plan.check(settings.memory_budget_gb)
        self.check_data(trainer)

    def check_data(self, trainer: pl.Trainer) -> None:
        """The run has the data the pass reads, and (for the inferred adapter) one example's layout is readable.

        A loader the module's own hook would build is not built here (the module is not set up yet): its layout
        is checked on the first batch of the pass."""
        if callable(self.dataloader):
            return
        who = f"KFACFactors(dataloader={self.dataloader!r})"
        origin = dataloader_origin(trainer, self.dataloader)
        if origin is None:
            find_dataloader(trainer, self.dataloader, who)  # raises the one-line error naming the fixes
        if origin == "module" or not isinstance(self.adapter, AutoFisherAdapter):
            return
        batch = sample_batch(find_dataloader(trainer, self.dataloader, who))
        if batch is not None:
            self.adapter.check_batch(batch, need_labels=self.settings.fisher == "empirical")

    def owners(self, world_size: int) -> dict[str, int]:
        """``{layer: rank}``: balanced owners when sharded (:func:`~memcurve.curvature.owners.assign_owners`),
        else global rank zero for every layer."""
        if not self.settings.sharded:
            return dict.fromkeys(self.layer_names, 0)
        return assign_owners({name: a * a + g * g for name, (a, g) in self._dims.items()}, world_size)

    # -- when it runs (hooks in ScheduledAnalysis) -----------------------------------------------------
    checkpoint_key = "kfac_factors"

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        return self.collect(trainer, pl_module)

    def checkpoint_record(self, result: Path) -> dict[str, Any]:
        return {"path": str(result), "layers": list(self.layer_names)}

    # -- the work --------------------------------------------------------------------------------------
    def factor_dataloader(self, trainer: pl.Trainer) -> DataLoader:
        """The loader of the factor pass: the run's own data (:func:`~memcurve.adapters.find_dataloader`), read
        sequentially, sharded across ranks without padding (a callable ``dataloader``'s loader is used as is)."""
        if callable(self.dataloader):
            return self.dataloader(trainer)
        loader = find_dataloader(trainer, self.dataloader, f"KFACFactors(dataloader={self.dataloader!r})")
        if self.held_out is not None:
            splits = split_held_out(len(loader.dataset), self.held_out, seed=global_seed())
            loader = subset_loader(loader, splits.indices("factors"))
            rank_zero_info(f"memcurve: KFACFactors reads the factor role of {splits.name}")
        return sequential_loader(loader, trainer, self.settings.batch_size, self.settings.max_samples)

    def output_names(self) -> list[str]:
        """The factor file, or with ``settings.sharded`` the index and every rank's shard."""
        if not self.settings.sharded:
            return [self.filename]
        stem = self.filename.removesuffix(".safetensors")
        return [stem + INDEX_SUFFIX, f"{stem}-rank{{rank}}-of-{{world_size}}.safetensors"]  # any shard of any run

    def output_files(self, trainer: pl.Trainer) -> list[Path]:
        if not self.settings.sharded:
            return super().output_files(trainer)
        path = self.output_path(trainer)
        stem = path.name.removesuffix(".safetensors")
        shards = [path.with_name(shard_name(stem, r, trainer.world_size)) for r in range(trainer.world_size)]
        return [self.index_path(trainer), *shards]

    def output_path(self, trainer: pl.Trainer) -> Path:
        return self.output_folder(trainer) / self.filename.format(epoch=trainer.current_epoch, step=trainer.global_step)

    def index_path(self, trainer: pl.Trainer) -> Path:
        """Where ``settings.sharded`` writes the index: ``output_path`` with ``.safetensors`` → ``.index.json``."""
        path = self.output_path(trainer)
        return path.with_name(path.name.removesuffix(".safetensors") + ".index.json")

    def collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        """Run the factor pass on every rank; owners decompose, the file or shards + index are written.

        Returns the factor file (or, with ``sharded``, the index) path, on every rank.
        """
        if not self.layer_names or self.pass_settings is None:
            self.setup(trainer, pl_module, "fit")
        settings = self.pass_settings
        written_files = self.claim_outputs(trainer)  # refuses another run's file before the pass, not after
        loader = self.factor_dataloader(trainer)
        owners = self.owners(trainer.world_size)
        passes = [("A",), ("G",)] if settings.separate_passes else [("A", "G")]
        n_batches = len(loader) if settings.max_batches is None else min(len(loader), settings.max_batches)
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        meter = Throughput(pl_module.device)
        with tqdm(desc="K-FAC factors", total=n_batches * len(passes), disable=not show, leave=False) as bar:
            owned: dict[str, LayerSums] = {}
            for factors in passes:
                local = collect_sums(
                    pl_module,
                    meter.count(itertools.islice(loader, n_batches), self.adapter, bar),
                    self.layer_names,
                    settings,
                    adapter=self.adapter,
                    to_device=lambda batch: move_data_to_device(batch, pl_module.device),
                    factors=factors,
                    forward_module=self.forward_module(trainer, pl_module),
                )
                reduced = reduce_to_owners(local, owners, factors=factors)
                del local  # non-owners keep nothing of these layers
                owned = merge_passes(owned, reduced) if owned else reduced
                if factors == ("A",):  # the reduced A sums wait in host memory during the G pass
                    owned = {n: LayerSums(s.A_sum.cpu(), s.G_sum, s.count_A, s.count_G) for n, s in owned.items()}
        meter.stop()  # the pass: forwards, backwards and reductions; then the owners decompose
        results = {}
        for name in sorted(owned):  # one layer at a time; each result moves to host memory
            factors_ = owned.pop(name).normalize(name)
            if settings.store == "eigen":
                eigen = eigendecompose_layer(factors_, name)
                results[name] = LayerEigen(*(t.cpu() for t in _eigen_tensors(eigen)), eigen.count_A, eigen.count_G)
            else:
                results[name] = LayerFactors(factors_.A.cpu(), factors_.G.cpu(), factors_.count_A, factors_.count_G)
            del factors_
        self.last_throughput = meter.finish()
        self.report_throughput(trainer)
        extra = {
            "seed": settings.seed,
            "dataloader": self.dataloader if isinstance(self.dataloader, str) else "callable",
            "max_batches": settings.max_batches,
            "max_samples": settings.max_samples,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "layer_patterns": self.layers,
        }
        if settings.sharded:
            path = self.output_path(trainer)
            path = save_sharded_factors(
                path.parent,
                results,
                model=pl_module,
                settings=settings.file_settings(),
                owners=owners,
                world_size=trainer.world_size,
                stem=path.name.removesuffix(".safetensors"),
                extra=extra,
                fingerprint=self._fingerprint,
            )
            written = f"{len(owners)} layers in {len(set(owners.values()))} shards + index"
        else:
            path = self.output_path(trainer)
            if trainer.is_global_zero:
                save_factors(path, results, model=pl_module, settings=settings.file_settings(), extra=extra)
            written = f"{len(owners)} layers"
        if trainer.is_global_zero:
            self.saved_paths.append(str(path))
            self.record_written(*(p for p in written_files if p.exists()))
            rank_zero_info(f"memcurve: K-FAC factors of {written} written to {path}")
        if self.log_spectra and settings.store == "eigen":
            spectra = _gather_spectra(results)
            if trainer.is_global_zero:
                self.log_spectrum(trainer, spectra)
        trainer.strategy.barrier("kfac_factors")
        return path

    def forward_module(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[..., Any]:
        """What the adapter calls for the logits: the LightningModule, inside the precision plugin's forward
        context (autocast for ``bf16-mixed``), routed through the FSDP root wrapper under FSDP (so its root
        parameters — embeddings, final norm, head — are gathered)."""
        wrapper = trainer.strategy.model if _is_fsdp(trainer) else None
        precision = getattr(trainer.strategy, "precision_plugin", None)
        return _Forward(pl_module, wrapper if wrapper is not pl_module else None, precision)

    def report_throughput(self, trainer: pl.Trainer) -> None:
        """Print tokens/s and peak memory; log them (``kfac/...``) to the Trainer's logger."""
        t = self.last_throughput
        unit = "tokens" if t.get("unit") == "tok" else "examples"
        rank_zero_info(
            f"memcurve: K-FAC pass: {t['count']:,.0f} {unit} in {t['seconds']:.1f} s over {t['world_size']:.0f} "
            f"rank(s): {t['per_second']:,.0f} {unit}/s; eigendecompositions {t['eigh_seconds']:.1f} s; peak memory "
            f"{_format_peak(t['peak_memory_bytes'])} ({t['peak_memory_kind']}, max over ranks)"
        )
        if trainer.logger is not None:
            key = "tokens" if unit == "tokens" else "examples"
            trainer.logger.log_metrics(
                {
                    f"kfac/{key}": t["count"],
                    f"kfac/{key}_per_s": t["per_second"],
                    "kfac/seconds": t["seconds"],
                    "kfac/eigh_seconds": t["eigh_seconds"],
                    "kfac/peak_memory_gb": t["peak_memory_bytes"] / 1e9,
                },
                step=trainer.global_step,
            )

    def log_spectrum(self, trainer: pl.Trainer, eigen: dict[str, LayerEigen]) -> None:
        """Eigenvalue histograms (log10), effective ranks and the share of pairs holding 90% of Σκ."""
        metrics: dict[str, float] = {}
        experiment = trainer.logger.experiment if isinstance(trainer.logger, TensorBoardLogger) else None
        for name, layer in eigen.items():
            for factor, values in (("A", layer.eigvals_A), ("G", layer.eigvals_G)):
                metrics[f"kfac/{name}/effective_rank_{factor}"] = effective_rank(values)
                if experiment is not None:
                    logs = torch.log10(values.double().clamp_min(1e-30))
                    experiment.add_histogram(f"kfac/{name}/log10_eigvals_{factor}", logs, trainer.global_step)
            _, kept = threshold_for_energy(layer.eigvals_G, layer.eigvals_A, 0.9)
            pairs = layer.eigvals_G.numel() * layer.eigvals_A.numel()
            metrics[f"kfac/{name}/pair_fraction_for_90pct_energy"] = kept / pairs
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)


def _format_peak(peak: float) -> str:
    return "unavailable" if peak != peak else format_bytes(peak)  # NaN: no way to measure it here


def _is_fsdp(trainer: pl.Trainer) -> bool:
    return "FSDP" in type(trainer.strategy).__name__


def _eigen_tensors(eigen: LayerEigen) -> tuple[torch.Tensor, ...]:
    return eigen.eigvals_A, eigen.eigvecs_A, eigen.eigvals_G, eigen.eigvecs_G


def _gather_spectra(results: Mapping[str, LayerEigen | LayerFactors]) -> dict[str, LayerEigen]:
    """Every layer's eigenvalues on every rank (small: ``d_A + d_G`` numbers per layer), eigenvectors left out."""
    empty = torch.empty(0, dtype=torch.float64)
    spectra = {
        n: (r.eigvals_A, r.eigvals_G, r.count_A, r.count_G) for n, r in results.items() if isinstance(r, LayerEigen)
    }
    if is_distributed():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, spectra)
        spectra = {n: v for part in gathered for n, v in part.items()}
    return {n: LayerEigen(a, empty, g, empty, ca, cg) for n, (a, g, ca, cg) in sorted(spectra.items())}


class _Forward:
    """Calls the LightningModule in the precision plugin's forward context, through a wrapper module if given.

    Through the wrapper: the LightningModule's ``forward`` is patched for one call so the wrapper's ``forward``
    (FSDP: gather the root parameters) runs and then hands the arguments on (Lightning's forward redirection).
    """

    def __init__(self, module: nn.Module, wrapper: nn.Module | None, precision: Any) -> None:
        self.module, self.wrapper, self.precision = module, wrapper, precision
        try:  # adapters that read the forward's parameters (AutoFisherAdapter) see the module's, not (*args, **kwargs)
            self.__signature__ = inspect.signature(module.forward)
        except (TypeError, ValueError):
            pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        context = self.precision.forward_context() if self.precision is not None else contextlib.nullcontext()
        with context:
            if self.wrapper is None:
                return self.module(*args, **kwargs)
            module = self.module
            had_attribute = "forward" in module.__dict__
            original = module.forward

            def forward_once(*a: Any, **k: Any) -> Any:
                _restore(module, original, had_attribute)
                return original(*a, **k)

            module.forward = forward_once
            try:
                return self.wrapper(*args, **kwargs)
            finally:
                _restore(module, original, had_attribute)


def _restore(module: nn.Module, original: Callable[..., Any], had_attribute: bool) -> None:
    if had_attribute:
        module.forward = original
    else:
        module.__dict__.pop("forward", None)


def batch_size_and_tokens(adapter: FisherAdapter, batch: Any) -> tuple[int, int | None]:
    """``(examples, tokens)`` of a batch: tokens are the positions of the adapter's position mask (e.g. the
    attention mask of an LM batch), else ``input_ids.numel()``, else None (no notion of tokens)."""
    mask = adapter.position_mask(batch)
    if isinstance(mask, torch.Tensor):
        return int(mask.shape[0]), int(mask.sum())
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return int(batch["input_ids"].shape[0]), int(batch["input_ids"].numel())
    first = (
        batch
        if isinstance(batch, torch.Tensor)
        else next(
            (v for v in (batch.values() if isinstance(batch, Mapping) else batch) if isinstance(v, torch.Tensor)), None
        )
    )
    return (int(first.shape[0]) if first is not None and first.dim() else 1), None


class Throughput:
    """Counts tokens (or examples) of the batches it lets through, times the pass and reads peak memory.

    Peak memory: ``torch.cuda.max_memory_allocated`` on a CUDA device (reset at the start), else the process's
    maximum resident set size (``getrusage``, over its whole life so far) where the ``resource`` module exists,
    else NaN (kind ``"unavailable"``, e.g. a CPU pass on Windows). ``stop`` ends the clock of the pass
    (``seconds``, what tokens/s divides by); ``finish`` — after the eigendecompositions, whose time it reports as
    ``eigh_seconds`` and whose memory counts in the peak — sums the counts and takes the maxima of times and
    memory over ranks (a collective when distributed).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.count_tokens = 0
        self.count_examples = 0
        self.has_tokens = True
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        self.stopped: float | None = None

    def stop(self) -> None:
        self.stopped = time.perf_counter()

    def count(self, batches: Iterable[Any], adapter: FisherAdapter, bar: tqdm) -> Iterator[Any]:
        """Yield ``batches`` unchanged, counting them and advancing ``bar``.

        When the first batch has tokens the bar counts tokens (unit ``tok``), its total estimated as the first
        batch's tokens times the batches expected; otherwise it counts batches.
        """
        for batch in batches:
            examples, tokens = batch_size_and_tokens(adapter, batch)
            self.count_examples += examples
            if tokens is None:
                self.has_tokens = False
            else:
                self.count_tokens += tokens
            if bar.disable:  # a disabled bar has no state
                pass
            elif tokens is not None and bar.unit != "tok" and bar.n == 0:  # the first batch: count tokens from now on
                bar.unit, bar.unit_scale = "tok", True
                bar.reset(total=tokens * (bar.total or 1))
                bar.update(tokens)
            else:
                bar.update(tokens if bar.unit == "tok" and tokens is not None else 1)
            yield batch

    def finish(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, kind = float(torch.cuda.max_memory_allocated(self.device)), "cuda max allocated"
        elif resource is not None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
            peak, kind = float(rss if sys.platform == "darwin" else rss * 1024), "max RSS"
        else:
            peak, kind = float("nan"), "unavailable"
        now = time.perf_counter()
        stopped = self.stopped if self.stopped is not None else now
        seconds, eigh_seconds = stopped - self.start, now - stopped
        count = float(self.count_tokens if self.has_tokens else self.count_examples)
        has_tokens = float(self.has_tokens)
        world_size = 1
        if is_distributed():
            world_size = dist.get_world_size()
            device = comm_device(torch.zeros(()), None)
            total = torch.tensor([count], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            maxima = torch.tensor([seconds, eigh_seconds, peak, -has_tokens], dtype=torch.float64, device=device)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            count = float(total[0])
            seconds, eigh_seconds, peak, has_tokens = (float(v) for v in maxima * torch.tensor([1, 1, 1, -1]))
        return {
            "unit": "tok" if has_tokens else "ex",
            "count": count,
            "seconds": seconds,
            "per_second": count / seconds if seconds > 0 else float("nan"),
            "eigh_seconds": eigh_seconds,
            "peak_memory_bytes": peak,
            "peak_memory_kind": kind,
            "world_size": world_size,
        }
