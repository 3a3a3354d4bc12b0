"""The factor pass: run a model over batches and accumulate K-FAC factors, without any training framework.

``collect_factors`` puts the model in eval mode (no dropout), runs each batch forward with the tracker's
hooks on, draws Fisher targets and backpropagates only down to the tracked layers' outputs
(``torch.autograd.grad``), so no parameter ``.grad`` is touched and no weight gradient is computed. Train
mode and every ``requires_grad`` flag are restored afterwards, also after an error. It works inside
``torch.inference_mode`` / ``no_grad`` contexts (e.g. a validation hook): gradients are re-enabled locally.

Every option of the pass comes in one :class:`~memcurve.curvature.settings.FactorSettings`; the tracker is built
from it in one place (``ScaleTracker.from_settings``).

How logits, labels, example indices and masks come out of a batch is the job of a :class:`FisherAdapter`;
The default (``adapter=None``) is the model's ``fisher_adapter()`` or else the inferred
:class:`~memcurve.adapters.AutoFisherAdapter` (tuples, dicts, HF outputs); a causal-LM adapter lives with the LM
module. Example indices seed the sampled Fisher (same draws for any batch size); a batch without indices
gets ``rank + world_size * k`` for its k-th example on this rank, which is the global index under a
sequential loader sharded round-robin without padding (``UnpaddedDistributedSampler``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from memcurve.adapters import FisherAdapter, default_fisher_adapter
from memcurve.curvature.fisher import fisher_backward
from memcurve.curvature.layers import _CleanNames, linear_shape, named_linear_modules
from memcurve.curvature.settings import DEFAULT_SETTINGS, FactorSettings
from memcurve.curvature.sums import FACTORS, LayerFactors, LayerSums, all_reduce_sums
from memcurve.curvature.tracker import KFACTracker
from memcurve.utils.distributed import rank_and_world

__all__ = ["ScaleTracker", "collect_factors", "collect_sums", "merge_passes"]


def _normal_tensors(batch: Any) -> Any:
    """Inference-mode tensors cannot enter an autograd graph: clone them into normal tensors."""
    if isinstance(batch, Tensor):
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: _normal_tensors(value) for key, value in batch.items()})
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_normal_tensors(value) for value in batch)
    return batch


class ScaleTracker(KFACTracker):
    """A :class:`KFACTracker` that can keep its sums on the CPU and track only ``A`` or only ``G``.

    ``offload_to_cpu``: sums (and counts) live in host memory; each batch's sample rows are copied to the CPU
    and the Gram products ``RᵀR`` run there (a CPU GEMM per layer and batch: slow next to a GPU for wide
    layers — it trades time for device memory). ``factors=("A",)`` or ``("G",)``: the other factor is not
    accumulated (a 0 x 0 placeholder; its count still is, so two passes can be checked against each other).
    Layer names may be clean names of a wrapped model (FSDP).
    """

    def __init__(
        self,
        model: nn.Module,
        layer_names: Sequence[str],
        *,
        factors: Sequence[str] = FACTORS,
        offload_to_cpu: bool = False,
        **kwargs: Any,
    ) -> None:
        factors = tuple(factors)
        if not factors or any(f not in FACTORS for f in factors):
            raise ValueError(f"factors={factors!r} must be a non-empty subset of {FACTORS}")
        self.tracked = factors
        self.offload_to_cpu = bool(offload_to_cpu)
        super().__init__(_CleanNames(model), layer_names, **kwargs)

    @classmethod
    def from_settings(
        cls,
        model: nn.Module,
        layer_names: Sequence[str],
        settings: FactorSettings,
        *,
        factors: Sequence[str] = FACTORS,
        record_outputs: bool = True,
    ) -> ScaleTracker:
        """The tracker of a pass with ``settings`` (``drop_last_position`` decided: ``FactorSettings.resolve``)."""
        if settings.drop_last_position is None:
            raise ValueError("drop_last_position=None: decide it first with FactorSettings.resolve(adapter)")
        return cls(
            model,
            layer_names,
            factors=factors,
            offload_to_cpu=settings.offload_to_cpu,
            mode=settings.mode,
            position=settings.position,
            bias=settings.bias,
            dtype=settings.dtype,
            drop_last_position=settings.drop_last_position,
            record_outputs=record_outputs,
        )

    def reset(self) -> None:
        for name, module in self.modules.items():
            dev = torch.device("cpu") if self.offload_to_cpu else module.weight.device
            in_features, out_features = linear_shape(module)
            d_in = in_features + int(self.homogeneous(name))
            d_a = d_in if "A" in self.tracked else 0
            d_g = out_features if "G" in self.tracked else 0
            zero = torch.zeros((), dtype=torch.int64, device=dev)
            self._sums[name] = LayerSums(
                torch.zeros(d_a, d_a, dtype=self.dtype, device=dev),
                torch.zeros(d_g, d_g, dtype=self.dtype, device=dev),
                zero.clone(),
                zero.clone(),
            )

    def _rows(
        self, x: Tensor, valid: Tensor, all_valid: bool, *, is_input: bool, homogeneous: bool
    ) -> tuple[Tensor, Tensor | int]:
        if ("A" if is_input else "G") not in self.tracked:  # count only (as the parent counts); a free 0 x 0 product
            if self.mode == "expand":
                count = x.shape[0] * x.shape[1] if all_valid else valid.sum()
            else:
                count = (valid.sum(dim=1) > 0).sum()
            rows = x.new_zeros((1, 0), dtype=self.dtype)
        else:
            rows, count = super()._rows(x, valid, all_valid, is_input=is_input, homogeneous=homogeneous)
        if self.offload_to_cpu:
            rows = rows.to("cpu")
            count = count.to("cpu") if isinstance(count, Tensor) else count
        return rows, count


def _check_settings(settings: Any) -> FactorSettings:
    if not isinstance(settings, FactorSettings):
        raise TypeError(
            f"settings must be a memcurve.curvature.FactorSettings (e.g. FactorSettings(fisher='empirical')), "
            f"not {type(settings).__name__}"
        )
    return settings


def collect_sums(
    model: nn.Module,
    batches: Iterable[Any],
    layer_names: Sequence[str],
    settings: FactorSettings = DEFAULT_SETTINGS,
    *,
    adapter: FisherAdapter | None = None,
    to_device: Callable[[Any], Any] | None = None,
    factors: Sequence[str] = FACTORS,
    forward_module: Callable[..., Any] | None = None,
) -> dict[str, LayerSums]:
    """This rank's UNREDUCED K-FAC sums ``{layer: LayerSums}`` (the pass of :func:`collect_factors`).

    Same pass as :func:`memcurve.curvature.collect_factors` — eval mode, Fisher targets seeded by example
    index, backward to the layer outputs only, train mode and ``requires_grad`` restored — but it returns the
    local sums for :func:`reduce_to_owners`, and: ``factors=("A",)`` runs forwards only (no Fisher targets, no
    backward), ``("G",)`` accumulates G only; ``settings.offload_to_cpu`` keeps the sums in host memory;
    ``forward_module`` is what the adapter calls for the logits (default ``model``; under FSDP the root
    wrapper, see ``KFACFactors``). Layer names are clean names (wrapper segments removed). At most
    ``settings.max_batches`` batches are read; ``drop_last_position=None`` means the adapter's default.
    """
    adapter = adapter or default_fisher_adapter(model)
    settings = _check_settings(settings).resolve(adapter)
    backward = "G" in tuple(factors)
    modules = named_linear_modules(model)
    weights = [modules[name].weight for name in layer_names if name in modules]
    requires_grad = [weight.requires_grad for weight in weights]
    was_training = model.training
    rank, world_size = rank_and_world()
    caller = forward_module if forward_module is not None else model
    model.eval()
    try:
        for weight in weights:
            weight.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            tracker = ScaleTracker.from_settings(model, layer_names, settings, factors=factors, record_outputs=backward)
            with tracker:
                seen = 0
                for step, batch in enumerate(batches):
                    if settings.max_batches is not None and step >= settings.max_batches:
                        break
                    batch = _normal_tensors(to_device(batch) if to_device is not None else batch)
                    tracker.set_mask(adapter.position_mask(batch))
                    logits = adapter.logits(caller, batch)
                    if not backward:
                        continue  # A only: the forward hooks did the work
                    index = adapter.example_index(batch)
                    if index is None:
                        index = rank + world_size * (seen + torch.arange(logits.shape[0]))
                    seen += logits.shape[0]
                    fisher_backward(
                        logits,
                        fisher=settings.fisher,
                        labels=adapter.labels(batch) if settings.fisher == "empirical" else None,
                        seed=settings.seed,
                        example_index=index,
                        mc_samples=settings.mc_samples,
                        mask=adapter.loss_mask(batch),
                        inputs=tracker.take_outputs(),
                    )
            return tracker.sums()
    finally:
        for weight, flag in zip(weights, requires_grad):
            weight.requires_grad_(flag)
        model.train(was_training)


def merge_passes(first: Mapping[str, LayerSums], second: Mapping[str, LayerSums]) -> dict[str, LayerSums]:
    """The A sums of the first pass with the G sums of the second; both passes must have seen the same data."""
    merged = {}
    for name, a_part in first.items():
        g_part = second[name]
        if int(a_part.count_A) != int(g_part.count_A):
            raise RuntimeError(
                f"separate_passes: layer {name!r} counted {int(a_part.count_A)} samples in the A pass and "
                f"{int(g_part.count_A)} in the G pass; both passes must see the same data (a sequential dataloader "
                "without random augmentation)"
            )
        device = g_part.G_sum.device
        merged[name] = LayerSums(a_part.A_sum.to(device), g_part.G_sum, a_part.count_A.to(device), g_part.count_G)
    return merged


def collect_factors(
    model: nn.Module,
    batches: Iterable[Any],
    layer_names: Sequence[str],
    settings: FactorSettings = DEFAULT_SETTINGS,
    *,
    adapter: FisherAdapter | None = None,
    to_device: Callable[[Any], Any] | None = None,
    reduce_across_ranks: bool = True,
) -> dict[str, LayerFactors]:
    """K-FAC factors ``{layer: LayerFactors(A, G, counts)}`` of ``layer_names`` over ``batches``.

    ``settings.max_batches`` counts batches of this process; with ``settings.separate_passes`` A and G come from
    two passes over ``batches`` (which must then be re-iterable: a list or a DataLoader, not an iterator). With
    ``reduce_across_ranks`` (and an initialised process group) sums and counts are all-reduced before
    normalising, so every rank returns the factors of all ranks' data; every rank must then call this function.
    """
    # One implementation of the pass: the local sums of collect_sums, then (optionally) all-reduced and normalised.
    settings = _check_settings(settings)
    options = {"adapter": adapter, "to_device": to_device}
    if settings.separate_passes:
        if iter(batches) is batches:
            raise ValueError(
                "separate_passes=True reads the batches twice (A pass, then G pass): pass a list or a DataLoader, "
                f"not a one-shot {type(batches).__name__}"
            )
        first = collect_sums(model, batches, layer_names, settings, factors=("A",), **options)
        sums = merge_passes(first, collect_sums(model, batches, layer_names, settings, factors=("G",), **options))
    else:
        sums = collect_sums(model, batches, layer_names, settings, **options)
    if reduce_across_ranks:
        sums = all_reduce_sums(sums)
    return {name: layer_sums.normalize(name) for name, layer_sums in sums.items()}
