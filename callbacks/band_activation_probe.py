"""BandActivationProbe: do memorized and clean examples activate different curvature bands of a layer?

The paper's Section 3.1 / Figure 2, for any run and any ``nn.Linear`` layer with K-FAC factors. For each
chosen layer the ``m·n`` eigenpairs of its Fisher block are ranked by ``κ = μ_i λ_j`` and split into bands
(top 10%, 10–25%, 25–50%, bottom 50% by default); the probe feeds every example of each group through the
model in eval mode, reads the layer inputs ``x`` with forward pre-hooks and reports the mean activation
``||u_i v_jᵀ x|| = |v_jᵀ x|`` over the pairs of each band — computed exactly from ``z = V_Aᵀ x`` and the pair
counts per eigenvector (:mod:`memcurve.curvature.bands`), not by sampling pairs. Per example the band means
of the selected positions (``cls``: position 0; ``all``: every valid position) are averaged, then mean,
std (ddof 1) and count are taken over the examples of each group. A baseline does the same in the SVD basis
of the current weight (bands over singular values), to see whether curvature separates the groups better
than the plain weight spectrum.

Groups (classification, :class:`ClassificationProbeAdapter`): ``noised`` (training examples with a
corrupted label — the memorized ones), ``clean`` (the other training examples), both from the unaugmented
``memorization_dataloader()``, and ``val`` (``val_dataloader()``). Any other LightningModule gets
:class:`~memcurve.adapters.AutoProbeAdapter`: ``train`` (the run's training examples, in order) and ``val``,
from the run's own loaders (a DataModule, loaders passed to ``fit`` / ``validate``, or the module's hooks), with
the batch layout inferred. Other groupings plug in a :class:`ProbeAdapter` — passed as ``adapter=`` or returned
by the LightningModule's ``probe_adapter()`` — that names the passes, runs the model on a batch and sorts its
examples into groups (the canary LM's gives ``memorized``/``control``/``val`` and a padding mask).

Outputs (global rank zero writes, default folder ``<log_dir>/probe/``):

* a tidy CSV ``<stem>.csv`` with columns ``layer, band, group, basis, statistic, mean, std, n`` for both
  bases (``kfac``, ``svd``) and both statistics (``norm``: mean ``|v_jᵀ x|``, the paper's ``||Zx||₂``;
  ``energy``: mean ``(v_jᵀ x)²``);
* TensorBoard/logger scalars ``probe/<layer>/<band>/<group>`` (K-FAC) and ``probe_svd/<layer>/<band>/<group>``
  for the ``statistic`` chosen (default ``norm``);
* a figure ``<stem>.png`` (also the TensorBoard image ``probe/figure`` with a TensorBoardLogger): one row
  of panels per layer, K-FAC and SVD side by side, bars band x group with standard-error whiskers on a log
  axis (band means span orders of magnitude), and over each band the relative difference of the memorized
  group against the reference group (``(noised − clean) / clean``), for the chosen ``statistic`` — by default
  ``norm``, the quantity of the paper's Figure 2.

Stems: ``bands-final`` (``when="fit_end"``), ``bands-epoch{epoch:03d}`` (``every_n_epochs``),
``bands-epoch{epoch:03d}-step{step}`` (``checkpoint``; the paths are also stored in the checkpoint) and
``bands`` (``validate``: ``trainer.validate(model, datamodule, ckpt_path=...)`` probes a finished checkpoint).
Factors collected with ``bias="homogeneous"`` are probed on ``[x, 1]``; the SVD baseline always sees ``x``.

Factors: a factor file (validated against the model with ``load_factors``: factors of another model are
refused), or ``"latest"``: the last file written by the :class:`~memcurve.callbacks.KFACFactors` callback
that comes BEFORE this probe in the trainer's callback list (callbacks run in list order, so at ``fit_end``
the factors are written first and then probed). Under DDP each rank reads a disjoint unpadded shard and the
per-group sums, sums of squares and counts are all-reduced (any backend), so the results equal a
single process up to summation order.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from memcurve.adapters import (
    AutoProbeAdapter,
    ClassificationProbeAdapter,
    ProbeAdapter,
    dataloader_origin,
    default_probe_adapter,
    find_dataloader,
    sample_batch,
)
from memcurve.callbacks.kfac_factors import KFACFactors
from memcurve.callbacks.scheduled_analysis import WHEN, ScheduledAnalysis, check_name_template
from memcurve.curvature import (
    POSITIONS,
    LayerEigen,
    compile_layer_patterns,
    eigendecompose_layer,
    load_factors,
    select_linear_layers,
)
from memcurve.curvature.bands import DEFAULT_BAND_EDGES, STATISTICS, BandBasis, band_labels, check_band_edges
from memcurve.curvature.layers import as_out_in, linear_shape, named_linear_modules, weight_layout
from memcurve.utils.arguments import check_choice, check_positive_int
from memcurve.utils.distributed import all_reduce_tensors
from memcurve.utils.files import atomic_write
from memcurve.utils.sampling import unpadded_shard_sampler
from memcurve.utils.sharding import whole, whole_parameters

__all__ = ["BandActivationProbe", "ClassificationProbeAdapter", "ProbeAdapter", "plot_band_activations"]

BASES = ("kfac", "svd")
BASIS_TITLES = {"kfac": "K-FAC eigenbasis (bands of κ = μλ)", "svd": "SVD of W (bands of singular values)"}
AXIS_LABELS = {
    "kfac": "pairs ranked by κ, percentile band (0% = highest curvature)",
    "svd": "singular directions ranked by s, percentile band",
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_STEMS = {
    "fit_end": "bands-final",
    "every_n_epochs": "bands-epoch{epoch:03d}",
    "checkpoint": "bands-epoch{epoch:03d}-step{step}",
    "validate": "bands",
}
CSV_FIELDS = ("layer", "band", "group", "basis", "statistic", "mean", "std", "n")
_CHUNK_ELEMENTS = 1 << 24  # bounds the [rows, directions] projection temporaries


# -- adapters: how a model is fed and its examples grouped ----------------------------------------------


# -- the figure -----------------------------------------------------------------------------------------
def _float(value: Any) -> float:
    return float(value) if value not in ("", None) else math.nan


def plot_band_activations(
    rows: Sequence[Mapping[str, Any]],
    statistic: str = "norm",
    contrast: tuple[str, str] | None = ("noised", "clean"),
    title: str | None = None,
):
    """A matplotlib ``Figure`` (Agg, no pyplot) of probe rows (as written to the CSV, strings or numbers).

    One row of panels per layer, one column per basis; bars band x group with standard-error whiskers on a
    log axis (linear if a mean is not positive); over each band ``(contrast[0] − contrast[1]) /
    contrast[1]`` when both groups are present.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["statistic"] == statistic]
    if not rows:
        raise ValueError(f"no rows with statistic={statistic!r} to plot")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    bases = [b for b in BASES if any(r["basis"] == b for r in rows)]
    bands = list(dict.fromkeys(r["band"] for r in rows))
    groups = list(dict.fromkeys(r["group"] for r in rows))
    table = {(r["layer"], r["basis"], r["band"], r["group"]): r for r in rows}
    fig = Figure(figsize=(5.2 * len(bases), 2.9 * len(layers) + 0.7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(layers), len(bases), squeeze=False)
    width = 0.8 / len(groups)
    x = np.arange(len(bands))
    ylabel = "mean |vᵀx| per pair" if statistic == "norm" else "mean (vᵀx)² per pair"
    for li, layer in enumerate(layers):
        for bi, basis in enumerate(bases):
            ax = axes[li][bi]
            tops = np.zeros(len(bands))
            means_seen: list[float] = []
            for gi, group in enumerate(groups):
                cells = [table.get((layer, basis, band, group)) for band in bands]
                means = np.array([_float(c["mean"]) if c else math.nan for c in cells])
                sems = np.array(
                    [_float(c["std"]) / math.sqrt(max(1.0, _float(c["n"]))) if c else math.nan for c in cells]
                )
                sems = np.nan_to_num(sems)
                means_seen.extend(means.tolist())
                ax.bar(x + (gi - (len(groups) - 1) / 2) * width, means, width, yerr=sems, capsize=2, label=group)
                tops = np.fmax(tops, np.nan_to_num(means + sems))
            if contrast is not None and all(g in groups for g in contrast):
                for k, band in enumerate(bands):
                    mem, ref = (table.get((layer, basis, band, g)) for g in contrast)
                    if mem and ref and _float(ref["mean"]) > 0 and math.isfinite(_float(mem["mean"])):
                        change = (_float(mem["mean"]) - _float(ref["mean"])) / _float(ref["mean"])
                        ax.annotate(f"{change:+.0%}", (x[k], tops[k]), ha="center", va="bottom", fontsize=8)
            positive = [v for v in means_seen if math.isfinite(v)]
            if positive and min(positive) > 0:  # bands differ by orders of magnitude: compare groups on a log axis
                ax.set_yscale("log")
            ax.set_xticks(x, bands)
            ax.set_xlabel(AXIS_LABELS.get(basis, "band"), fontsize=8)
            ax.set_title(f"{layer}\n{BASIS_TITLES.get(basis, basis)}", fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.margins(y=0.18)
            ax.tick_params(labelsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(groups), fontsize=8, title="group")
    note = f"; labels: ({contrast[0]} − {contrast[1]}) / {contrast[1]}" if contrast else ""
    fig.suptitle(title or f"Band activations ({statistic}){note}", fontsize=10)
    return fig


# -- the callback ---------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """What the hooks of one probed layer need."""

    name: str
    bases: list[BandBasis]  # kfac (, svd)
    homogeneous: bool


class BandActivationProbe(ScheduledAnalysis):
    """Mean activation of K-FAC curvature bands (and SVD bands) per layer and example group.

    Args:
        factors: a factor file (``.safetensors`` from :class:`~memcurve.callbacks.KFACFactors`; raw factors
            are eigendecomposed on the fly), or ``"latest"``: the last file of the ``KFACFactors`` callback
            placed before this probe in the trainer's callbacks.
        layers: module-name globs or ``re:<regex>`` of ``nn.Linear`` layers to probe (each must have factors
            in the file); None probes every layer of the file.
        bands: rank fractions splitting the pairs sorted by ``κ`` descending, strictly increasing in (0, 1):
            ``[0.1, 0.25, 0.5]`` gives the bands top 10%, 10–25%, 25–50%, bottom 50% (see
            :mod:`memcurve.curvature.bands` for rounding and ties).
        groups: example groups to report (default: all of the adapter's; classification: ``noised``,
            ``clean``, ``val``).
        when: ``fit_end``, ``every_n_epochs``, ``checkpoint`` (each checkpoint save; the outputs are recorded
            in the checkpoint under ``"band_activation_probe"``) or ``validate`` (end of ``trainer.validate``).
        every_n_epochs: period for ``when="every_n_epochs"``.
        max_samples: probe at most the first N examples of each data pass (training set, validation set).
        position: ``cls`` (position 0), ``all`` (mean over the valid positions), or None: the position
            selection the factors were collected with.
        statistic: what the scalars and the figure show: ``norm`` (mean ``|vᵀx|``, the paper's) or ``energy``
            (mean ``(vᵀx)²``); the CSV always holds both.
        svd_baseline: also report bands in the SVD basis of the layer's current weight.
        dtype: precision of the projections (``float32``; ``float64`` for exactness on small models).
        output_dir: folder of the CSV and PNG (default ``<log_dir>/probe``); checked in ``setup``.
        filename: file stem, may use ``{epoch}`` and ``{step}`` (defaults per ``when``).
        adapter: a :class:`ProbeAdapter` (default: the LightningModule's ``probe_adapter()`` if it has one,
            :class:`ClassificationProbeAdapter` for memcurve's noisy-label data, else
            :class:`~memcurve.adapters.AutoProbeAdapter`: groups ``train`` / ``val``).
        overwrite: replace an existing CSV/PNG this callback did not write (another run's); by default refused
            in ``setup`` (a resumed run may rewrite the files of the run it resumes).
    """

    def __init__(
        self,
        factors: str = "latest",
        layers: list[str] | None = None,
        bands: Sequence[float] = DEFAULT_BAND_EDGES,
        groups: list[str] | None = None,
        when: str = "fit_end",
        every_n_epochs: int = 1,
        max_samples: int | None = None,
        position: str | None = None,
        statistic: str = "norm",
        svd_baseline: bool = True,
        dtype: str = "float32",
        output_dir: str | None = None,
        filename: str | None = None,
        adapter: ProbeAdapter | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(factors, (str, Path)) or not str(factors):
            raise ValueError(f"factors={factors!r} must be a factor file path or 'latest'")
        if layers is not None:
            compile_layer_patterns(layers)
        self.edges = check_band_edges(bands)
        if groups is not None:
            if isinstance(groups, str) or not groups or len(set(groups)) != len(groups):
                raise ValueError(f"groups={groups!r} must be a non-empty list of distinct group names")
        check_choice("when", when, WHEN)
        check_positive_int("every_n_epochs", every_n_epochs, allow_none=False)
        check_positive_int("max_samples", max_samples, allow_none=True)
        check_choice("position", position, (None, *POSITIONS))
        check_choice("statistic", statistic, STATISTICS)
        check_choice("dtype", dtype, tuple(DTYPES))
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite={overwrite!r} must be True or False")
        if filename is not None:
            check_name_template("filename", filename)
        if adapter is not None:
            if not isinstance(adapter, ProbeAdapter):
                raise TypeError(f"adapter must be a memcurve ProbeAdapter, not {type(adapter).__name__}")
            self._check_groups(groups, adapter)
        self.factors = str(factors)
        self.layers = [layers] if isinstance(layers, str) else (list(layers) if layers is not None else None)
        self.band_names = band_labels(self.edges)
        self.groups = list(groups) if groups is not None else None
        self.when = when
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.position = position
        self.statistic = statistic
        self.svd_baseline = svd_baseline
        self.dtype = dtype
        self.output_dir = output_dir
        self.filename = filename or DEFAULT_STEMS[when]
        self.adapter = adapter
        self.overwrite = overwrite
        self.layer_names: list[str] = []
        self.saved_paths: list[str] = []
        self.last_results: list[dict[str, Any]] = []
        self._layers: dict[str, _Layer] = {}
        self._active_position = "cls"
        self._mask: Tensor | None = None
        self._batch: dict[str, tuple[Tensor, Tensor]] = {}

    @staticmethod
    def _check_groups(groups: Sequence[str] | None, adapter: ProbeAdapter) -> None:
        unknown = [g for g in groups or () if g not in adapter.groups]
        if unknown:
            raise ValueError(
                f"groups={list(groups)!r}: {unknown} are not groups of {type(adapter).__name__}; "
                f"choose from {adapter.groups}"
            )

    default_subdir = "probe"

    def output_names(self) -> list[str]:
        return [f"{self.filename}.csv", f"{self.filename}.png"]

    # -- eager checks against the model, the data, the other callbacks and the file system -------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.adapter is None:
            self.adapter = default_probe_adapter(pl_module, trainer)
        self._check_groups(self.groups, self.adapter)
        if self.groups is None:
            self.groups = list(self.adapter.groups)
        self.check_outputs_at_setup(trainer, stage)
        self.check_data(trainer)
        if self.layers is not None:
            self.layer_names = select_linear_layers(pl_module, self.layers, on_non_linear="skip")
        if self.factors == "latest":
            source = self.factor_callback(trainer)
            if self.layer_names and source.layer_names:
                self._check_layers_covered(source.layer_names, "the KFACFactors callback's layers")
        else:
            stored = load_factors(self.factors, pl_module)  # refuses factors of another model
            self._check_layers_covered(list(stored.layers), f"the factor file {self.factors}")
        rank_zero_info(f"memcurve: band probe ({self.when}) of {self.layer_names or 'every factor layer'}")

    def check_data(self, trainer: pl.Trainer) -> None:
        """For :class:`~memcurve.adapters.AutoProbeAdapter`: the run has the data of every group, and one example's
        layout is readable (a loader the module's own hook would build is checked on its first batch instead)."""
        if not isinstance(self.adapter, AutoProbeAdapter):
            return
        who = f"BandActivationProbe(groups={self.groups!r})"
        for split in (g for g in self.adapter.groups if g in self.groups):
            origin = dataloader_origin(trainer, split)
            if origin is None:
                find_dataloader(trainer, split, who)  # raises the one-line error naming the fixes
            elif origin != "module":
                batch = sample_batch(find_dataloader(trainer, split, who))
                if batch is not None:
                    self.adapter.check_batch(batch)

    def _check_layers_covered(self, available: Sequence[str], where: str) -> None:
        missing = [name for name in self.layer_names if name not in available]
        if missing:
            raise ValueError(
                f"layers={self.layers!r} selects {missing}, which have no K-FAC factors in {where}: {list(available)}"
            )

    def factor_callback(self, trainer: pl.Trainer) -> KFACFactors:
        """The ``KFACFactors`` callback whose latest file ``factors="latest"`` reads: the last one before this."""
        callbacks = list(trainer.callbacks)
        mine = next((i for i, cb in enumerate(callbacks) if cb is self), len(callbacks))
        before = [cb for cb in callbacks[:mine] if isinstance(cb, KFACFactors)]
        if before:
            return before[-1]
        if any(isinstance(cb, KFACFactors) for cb in callbacks[mine:]):
            raise ValueError(
                "factors='latest': the KFACFactors callback comes after BandActivationProbe in the trainer's "
                "callbacks; callbacks run in list order, so put KFACFactors first"
            )
        raise ValueError(
            "factors='latest' needs a memcurve.callbacks.KFACFactors callback before BandActivationProbe in the "
            "trainer's callbacks; add one or pass the path of a factor file"
        )

    # -- when it runs (hooks in ScheduledAnalysis) -----------------------------------------------------
    checkpoint_key = "band_activation_probe"

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Path, Path, str]:
        return self.probe(trainer, pl_module)

    def checkpoint_record(self, result: tuple[Path, Path, str]) -> dict[str, Any]:
        csv_path, png_path, factors = result
        return {"csv": str(csv_path), "png": str(png_path), "factors": factors}

    # -- the work -------------------------------------------------------------------------------------
    def factor_path(self, trainer: pl.Trainer) -> str:
        """The factor file to read now (the same on every rank)."""
        if self.factors != "latest":
            return self.factors
        source = self.factor_callback(trainer)
        path = source.saved_paths[-1] if source.saved_paths else None
        path = trainer.strategy.broadcast(path, src=0)  # only global rank zero records the paths it writes
        if path is None:
            raise RuntimeError(
                f"factors='latest': the KFACFactors callback (when={source.when!r}) has not written a factor file "
                f"yet when the probe runs (when={self.when!r}); let the factors be collected first"
            )
        return path

    def output_paths(self, trainer: pl.Trainer) -> tuple[Path, Path]:
        csv_path, png_path = self.output_files(trainer)
        return csv_path, png_path

    def limit(self, loader: DataLoader, trainer: pl.Trainer) -> DataLoader:
        """``loader`` cut to its first ``max_samples`` examples (re-sharded across ranks without padding)."""
        if self.max_samples is None or len(loader.dataset) <= self.max_samples:
            return loader
        dataset = Subset(loader.dataset, range(self.max_samples))
        return DataLoader(
            dataset,
            batch_size=loader.batch_size or 1,
            sampler=unpadded_shard_sampler(dataset, trainer),
            shuffle=False,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
        )

    def prepare_layers(self, pl_module: pl.LightningModule, path: str, root: nn.Module | None = None) -> str:
        """Load and check the factors, build each layer's bases; returns the position selection to use. ``root``: the
        strategy's model around ``pl_module`` (FSDP1's root wrapper)."""
        # Under FSDP1 the checks and the SVD baseline need whole parameters: the root wrapper (the strategy's model,
        # around ``pl_module``) gathers every unit; every rank probes, so all take part.
        with whole_parameters(root if root is not None else pl_module):
            return self._prepare_layers(pl_module, path)

    def _prepare_layers(self, pl_module: pl.LightningModule, path: str) -> str:
        stored = load_factors(path, pl_module)
        self._check_layers_covered(list(stored.layers), f"the factor file {path}")
        modules = named_linear_modules(pl_module)  # clean names: the factor file's, also under FSDP1 wrappers
        order = {name: i for i, name in enumerate(modules)}
        names = self.layer_names or sorted(stored.layers, key=lambda name: order.get(name, len(order)))
        dtype = DTYPES[self.dtype]
        self._layers = {}
        for name in names:
            module, layer = modules[name], stored.layers[name]
            eigen = layer if isinstance(layer, LayerEigen) else eigendecompose_layer(layer, name)
            device = module.weight.device
            bases = [BandBasis.from_kfac(eigen, self.edges).to(device, dtype)]
            if self.svd_baseline:
                # Conv1D stores Wᵀ; an FSDP2 parameter is gathered whole (every rank probes, so all take part)
                weight = as_out_in(whole(module.weight).detach(), weight_layout(module))
                bases.append(BandBasis.from_weight(weight, self.edges).to(device, dtype))
            homogeneous = eigen.eigvecs_A.shape[0] == linear_shape(module)[0] + 1
            self._layers[name] = _Layer(name, bases, homogeneous)
        return self.position or stored.settings["position"]

    def _pre_hook(self, name: str, module: nn.Module, args: tuple) -> None:
        self._batch[name] = self.layer_values(self._layers[name], args[0])

    def layer_values(self, layer: _Layer, x: Tensor) -> tuple[Tensor, Tensor]:
        """``([B, bases, statistics, bands] per-example band means, [B] has a selected position)``."""
        x = x.detach()
        if x.dim() < 2:
            raise ValueError(f"layer {layer.name!r}: input of shape {tuple(x.shape)} has no batch dimension")
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, D] is one position per example
        B, T = x3.shape[:2]
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if self._mask is not None and x.dim() >= 3:
            if self._mask.numel() != B * T:
                raise ValueError(
                    f"layer {layer.name!r}: position mask of shape {tuple(self._mask.shape)} does not match the "
                    f"layer input [batch, positions] = {(B, T)}"
                )
            valid = self._mask.to(device=x.device, dtype=torch.bool).reshape(B, T)
        if self._active_position == "cls":
            x3, valid = x3[:, :1], valid[:, :1]
            T = 1
        dtype = layer.bases[0].basis.dtype
        rows = x3.reshape(B * T, -1).to(dtype)
        out = torch.empty(B * T, len(layer.bases), len(STATISTICS), len(self.edges) + 1, dtype=dtype, device=x.device)
        step = max(1, _CHUNK_ELEMENTS // max(basis.basis.shape[0] for basis in layer.bases))
        for start in range(0, B * T, step):
            chunk = rows[start : start + step]
            for k, basis in enumerate(layer.bases):
                inputs = chunk
                if k == 0 and layer.homogeneous:  # K-FAC over [x, 1]; the SVD of W sees x only
                    inputs = torch.cat([chunk, chunk.new_ones(len(chunk), 1)], dim=1)
                out[start : start + step, k] = basis.means(inputs, STATISTICS)
        out = out.reshape(B, T, *out.shape[1:])
        out = torch.where(valid[:, :, None, None, None], out, out.new_zeros(()))  # padding may hold inf/nan
        count = valid.sum(dim=1)
        return out.sum(dim=1) / count.clamp_min(1).to(dtype)[:, None, None, None], count > 0

    @torch.no_grad()
    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Path, Path, str]:
        """Run the probe on every rank; global rank zero writes CSV, figure and scalars. Returns their paths."""
        if self.adapter is None or self.groups is None:
            self.setup(trainer, pl_module, "fit")
        self.claim_outputs(trainer)  # refuses another run's CSV/PNG before the work, not after
        path = self.factor_path(trainer)
        self._active_position = self.prepare_layers(pl_module, path, trainer.strategy.model)
        names = list(self._layers)
        shape = (len(names), len(self.groups), len(self._layers[names[0]].bases), len(STATISTICS), len(self.edges) + 1)
        device = pl_module.device
        sums = torch.zeros(shape, dtype=torch.float64, device=device)
        squares = torch.zeros(shape, dtype=torch.float64, device=device)
        counts = torch.zeros(shape[:2], dtype=torch.float64, device=device)
        modules = named_linear_modules(pl_module)
        handles = [modules[name].register_forward_pre_hook(functools.partial(self._pre_hook, name)) for name in names]
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        was_training = pl_module.training
        pl_module.eval()
        try:
            for pass_name, loader in self.adapter.passes(trainer, self.groups):
                loader = self.limit(loader, trainer)
                for batch in tqdm(loader, desc=f"Band probe ({pass_name})", disable=not show, leave=False):
                    batch = move_data_to_device(batch, device)
                    members = {g: m for g, m in self.adapter.batch_groups(pass_name, batch).items() if g in self.groups}
                    if not members:
                        continue
                    mask = self.adapter.position_mask(batch)
                    self._mask = None if mask is None else mask.to(device)
                    self._batch = {}
                    self.adapter.forward(pl_module, batch)
                    for li, name in enumerate(names):
                        if name not in self._batch:
                            raise RuntimeError(f"layer {name!r} was not called by the adapter's forward pass")
                        values, has = self._batch[name]
                        values = values.to(torch.float64)
                        for group, member in members.items():
                            gi = self.groups.index(group)
                            selected = member.to(device=device, dtype=torch.bool) & has
                            sums[li, gi] += values[selected].sum(dim=0)
                            squares[li, gi] += values[selected].square().sum(dim=0)
                            counts[li, gi] += selected.sum()
        finally:
            for handle in handles:
                handle.remove()
            self._batch, self._mask = {}, None
            pl_module.train(was_training)
        sums, squares, counts = all_reduce_tensors(sums, squares, counts)
        rows = self.results(names, sums.cpu(), squares.cpu(), counts.cpu())
        self.last_results = rows
        csv_path, png_path = self.output_paths(trainer)
        if trainer.is_global_zero:
            self.write(trainer, rows, csv_path, png_path, path)
            self.saved_paths.append(str(csv_path))
            self.record_written(csv_path, png_path)
        trainer.strategy.barrier("band_activation_probe")
        return csv_path, png_path, path

    def results(self, names: list[str], sums: Tensor, squares: Tensor, counts: Tensor) -> list[dict[str, Any]]:
        """Tidy rows ``{layer, band, group, basis, statistic, mean, std, n}`` (std with ddof 1; NaN if n < 2)."""
        rows = []
        bases = BASES[: sums.shape[2]]
        for li, layer in enumerate(names):
            for bi, band in enumerate(self.band_names):
                for gi, group in enumerate(self.groups):
                    n = int(counts[li, gi])
                    for k, basis in enumerate(bases):
                        for si, statistic in enumerate(STATISTICS):
                            s, ss = float(sums[li, gi, k, si, bi]), float(squares[li, gi, k, si, bi])
                            mean = s / n if n else math.nan
                            std = math.sqrt(max(0.0, (ss - s * mean) / (n - 1))) if n > 1 else math.nan
                            rows.append(
                                {
                                    "layer": layer,
                                    "band": band,
                                    "group": group,
                                    "basis": basis,
                                    "statistic": statistic,
                                    "mean": mean,
                                    "std": std,
                                    "n": n,
                                }
                            )
        return rows

    def write(
        self, trainer: pl.Trainer, rows: list[dict[str, Any]], csv_path: Path, png_path: Path, factors: str
    ) -> None:
        """CSV and PNG (atomically), logger scalars and the TensorBoard figure. Global rank zero only."""

        def write_csv(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(csv_path, write_csv)
        contrast = self.adapter.contrast if self.adapter is not None else None
        fig = plot_band_activations(
            rows,
            self.statistic,
            contrast,
            title=f"Band activations ({self.statistic}, position={self._active_position}) — {Path(factors).name}"
            + (f"; labels: ({contrast[0]} − {contrast[1]}) / {contrast[1]}" if contrast else ""),
        )
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png"))  # the figure carries its Agg canvas
        metrics = {
            f"{'probe' if r['basis'] == 'kfac' else 'probe_svd'}/{r['layer']}/{r['band']}/{r['group']}": r["mean"]
            for r in rows
            if r["statistic"] == self.statistic and math.isfinite(r["mean"])
        }
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(trainer.logger, TensorBoardLogger):
                trainer.logger.experiment.add_figure("probe/figure", fig, trainer.global_step, close=False)
        rank_zero_info(f"memcurve: band activations of {len(self._layers)} layers written to {csv_path} and {png_path}")
