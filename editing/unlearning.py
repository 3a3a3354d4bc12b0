"""Gradient unlearning baselines as pure edits of a checkpoint: GA, GradDiff, NPO, SimNPO and RMU.

What people reach for instead of a curvature edit (OpenUnlearning, locuslab/open-unlearning: its trainers and default
hyperparameters are followed here). Each method is told the forget set (like BalancedSubnet) and a retain set, and
fine-tunes the weights of chosen layers of a *copy* of the module for ``steps`` optimizer steps; :func:`unlearn`
returns a shallow copy of the state dict with only those weights replaced, and never modifies the module, its
weights or the given state dict.

Losses. ``NLL_f`` / ``NLL_r`` are the token-mean next-token losses of a forget / retain batch (padding excluded, as
the module's training loss); ``nll(x)`` an item's summed token loss, ``|x|`` its token count; ``ref`` the unedited
weights (the given state dict: the reference model of NPO and RMU, evaluated without gradients).

* ``ga`` (gradient ascent): ``−NLL_f``.
* ``graddiff`` (gradient difference): ``−γ·NLL_f + α·NLL_r`` (γ = α = 1).
* ``npo`` (Zhang et al., 2024): ``γ·(−2/β)·mean_x log σ(β·(nll(x) − nll_ref(x))) + α·NLL_r``, i.e. ``−(2/β)·log σ(−β·
  log(π/π_ref))`` (β = 0.1, γ = α = 1; OpenUnlearning's ``NPO`` with its NLL retain term).
* ``simnpo`` (Fan et al., 2024): ``γ·(−2/β)·mean_x log σ(β·(nll(x)/|x| − δ)) + α·NLL_r`` (β = 4.5, δ = 0,
  γ = 0.125, α = 1): NPO without the reference model, length-normalised, with a margin δ.
* ``rmu`` (Li et al., 2024, WMDP): at the output ``h`` of one block (``rmu_layer``) push the forget activations to a
  fixed random direction and keep the retain activations where the unedited model has them:
  ``γ·D(h_f, c) + α·D(h_r, h_ref,r)`` with ``c = steering_coeff · u/‖u‖``, ``u ~ U[0, 1)^d`` drawn once from
  ``seed``, and ``D`` the squared difference averaged over the hidden dimension and the real tokens of each item,
  then over items (steering 2, γ = α = 1: OpenUnlearning's defaults). Only the given layers train; OpenUnlearning
  now trains every parameter by default (``trainable_params_regex: .*``), the WMDP original only the ``mlp.down_proj``
  of the steered block and the two below it — give those layers to get the original. ``rmu_layer`` defaults to the
  decoder block (the outermost ``nn.ModuleList`` element) holding the deepest trained layer.

Optimisation (OpenUnlearning's fine-tuning defaults): AdamW, learning rate ``lr`` held constant, no weight decay,
gradients clipped to norm 1 (the Hugging Face Trainer's default). One step reads one forget and one retain batch,
cycling each loader (a shuffling DataLoader reshuffles). The copy runs in eval mode (no dropout), so the run is
deterministic for given loaders and the edit after ``n`` steps is the first ``n`` steps of any longer run: the step
count is a strength along one trajectory (:func:`unlearn` with ``steps=n`` equals the prefix of ``steps=m > n``).

Reading batches. Logits, next-token labels and masks come from the module's :class:`~memcurve.adapters.FisherAdapter`
(``fisher_adapter()``, or the inferred one), so any module the factor pass can read works: per-position logits
``[B, T, V]`` (labels ``-100`` where nothing is predicted) or one prediction per example ``[B, C]`` (one "token").
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.func import functional_call

from memcurve.adapters import FisherAdapter, default_fisher_adapter
from memcurve.curvature.balanced_subnet import FunctionCaller, cycle_batches
from memcurve.curvature.layers import is_linear
from memcurve.utils.arguments import check_choice, check_int, check_positive_int

__all__ = [
    "UNLEARNING_DEFAULTS",
    "UNLEARNING_METHODS",
    "UnlearningResult",
    "UnlearningSettings",
    "control_vector",
    "default_rmu_layer",
    "unlearn",
]

# Each method's hyperparameters and OpenUnlearning's defaults (configs/trainer/<Method>.yaml).
UNLEARNING_DEFAULTS: dict[str, dict[str, float]] = {
    "ga": {},
    "graddiff": {"gamma": 1.0, "alpha": 1.0},
    "npo": {"beta": 0.1, "gamma": 1.0, "alpha": 1.0},
    "simnpo": {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0},
    "rmu": {"steering_coeff": 2.0, "gamma": 1.0, "alpha": 1.0},
}
UNLEARNING_METHODS = tuple(UNLEARNING_DEFAULTS)
_HYPERPARAMETERS = ("alpha", "gamma", "beta", "delta", "steering_coeff")


def _check_real(name: str, value: Any, low: float = -math.inf, open_low: bool = False, allow_none: bool = False):
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok:
        ok = value > low if open_low else value >= low
    if not ok:
        bound = "" if low == -math.inf else f" {'>' if open_low else '>='} {low:g}"
        raise ValueError(f"{name}={value!r} must be a finite number{bound}{' or None' if allow_none else ''}")


@dataclass(frozen=True)
class UnlearningSettings:
    """One gradient-unlearning edit (see the module docstring). Hyperparameters left ``None`` take the method's
    OpenUnlearning default (:data:`UNLEARNING_DEFAULTS`); a method ignores those it does not use."""

    method: str = "ga"
    """``ga``, ``graddiff``, ``npo``, ``simnpo`` or ``rmu`` (in the edit pipeline each request gives its own)."""
    steps: int = 10
    """Optimizer steps (one forget and one retain batch each): the strength of the edit (in the edit pipeline each
    request gives its own)."""
    lr: float = 1e-5
    """Constant AdamW learning rate (OpenUnlearning's default for 1B-8B models; tiny models need far more)."""
    batch_size: int = 32
    """Batch size of the forget and of the retain loader (when the module builds them)."""
    max_forget: int | None = None
    """Use a random subset of at most this many forget examples (when the module builds the loaders)."""
    max_retain: int | None = None
    """Use a random subset of at most this many retain examples (when the module builds the loaders)."""
    alpha: float | None = None
    """Weight of the retain term (graddiff, npo, simnpo, rmu; default 1)."""
    gamma: float | None = None
    """Weight of the forget term (graddiff, npo, rmu: 1; simnpo: 0.125)."""
    beta: float | None = None
    """Inverse temperature (npo: 0.1; simnpo: 4.5)."""
    delta: float | None = None
    """SimNPO's margin on the length-normalised loss (default 0)."""
    steering_coeff: float | None = None
    """RMU: the norm of the random control vector (default 2)."""
    rmu_layer: str | None = None
    """RMU: the module whose output is steered (default: the block of the deepest trained layer)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient of the trained weights to this norm (None: no clipping)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seeds RMU's control vector and the subsets / shuffling of loaders the module builds."""

    def __post_init__(self) -> None:
        check_choice("method", self.method, UNLEARNING_METHODS)
        check_positive_int("steps", self.steps)
        _check_real("lr", self.lr, 0.0, open_low=True)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("max_forget", self.max_forget, allow_none=True)
        check_positive_int("max_retain", self.max_retain, allow_none=True)
        _check_real("alpha", self.alpha, 0.0, allow_none=True)
        _check_real("gamma", self.gamma, 0.0, allow_none=True)
        _check_real("beta", self.beta, 0.0, open_low=True, allow_none=True)
        _check_real("delta", self.delta, allow_none=True)
        _check_real("steering_coeff", self.steering_coeff, 0.0, open_low=True, allow_none=True)
        if self.rmu_layer is not None and (not isinstance(self.rmu_layer, str) or not self.rmu_layer):
            raise ValueError(
                f"rmu_layer={self.rmu_layer!r} must be a module name (e.g. 'model.model.layers.1') or None"
            )
        _check_real("max_grad_norm", self.max_grad_norm, 0.0, open_low=True, allow_none=True)
        _check_real("weight_decay", self.weight_decay, 0.0)
        check_int("seed", self.seed, 0)

    @property
    def hyperparameters(self) -> dict[str, float]:
        """The method's hyperparameters in effect: given values, else OpenUnlearning's defaults."""
        defaults = UNLEARNING_DEFAULTS[self.method]
        return {
            name: float(getattr(self, name) if getattr(self, name) is not None else defaults[name]) for name in defaults
        }


@dataclass
class UnlearningResult:
    """The edited state dict (a shallow copy: only ``parameters`` are new tensors), the keys trained, one history
    entry per step (``step``; ``forget_loss`` / ``retain_loss``: token-mean next-token losses of the step's batches
    before its update; ``loss``: the method's objective), the hyperparameters used and RMU's steered module."""

    state_dict: dict[str, Any]
    parameters: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    hyperparameters: dict[str, float] = field(default_factory=dict)
    rmu_layer: str | None = None


# -- helpers ----------------------------------------------------------------------------------------------------
def control_vector(dim: int, steering_coeff: float, seed: int) -> Tensor:
    """RMU's control vector ``steering_coeff · u/‖u‖`` with ``u ~ U[0, 1)^dim`` from a generator seeded with ``seed``
    (float32, CPU)."""
    check_positive_int("dim", dim)
    u = torch.rand(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return u / u.norm() * float(steering_coeff)


def default_rmu_layer(module: nn.Module, layer_names: Sequence[str]) -> str:
    """The block RMU steers by default: the outermost ``nn.ModuleList`` element (a decoder layer) that holds the
    deepest (last in module order) of ``layer_names``."""
    modules = dict(module.named_modules())
    order = {name: i for i, name in enumerate(modules)}
    deepest = max(layer_names, key=lambda name: order.get(name, -1))
    parts = deepest.split(".")
    for end in range(1, len(parts) + 1):
        if isinstance(modules.get(".".join(parts[: end - 1])), nn.ModuleList):
            return ".".join(parts[:end])
    raise ValueError(
        f"rmu_layer=None: no nn.ModuleList block holds layer {deepest!r}; name the module whose output RMU steers"
    )


def _check_layers(module: nn.Module, layer_names: Sequence[str]) -> list[str]:
    if isinstance(layer_names, str) or not isinstance(layer_names, Sequence) or not layer_names:
        raise ValueError(f"layer_names={layer_names!r} must be a non-empty list of module names of linear layers")
    names = list(layer_names)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"layer_names lists {repeated} more than once")
    modules = dict(module.named_modules())
    for name in names:
        layer = modules.get(name)
        if layer is None or not is_linear(layer):
            linear = [n for n, m in modules.items() if is_linear(m)]
            what = "not a module of the model" if layer is None else f"a {type(layer).__name__}, not a linear layer"
            raise ValueError(f"layer {name!r} is {what}; the model's linear layers are {linear[:20]}")
    return names


def _check_batches(name: str, batches: Any) -> None:
    if iter(batches) is batches:
        raise TypeError(f"{name} must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
    try:
        count = len(batches)
    except TypeError as error:
        raise TypeError(f"{name} must have a length (a DataLoader or a list of batches)") from error
    if count == 0:
        raise ValueError(f"{name} is empty: unlearning needs examples to {name.split('_')[0]}")


@contextmanager
def _captured(module: nn.Module | None) -> Iterator[list[Tensor]]:
    """The outputs of ``module`` (the first element of a tuple output) during the block, in call order."""
    outputs: list[Tensor] = []
    if module is None:
        yield outputs
        return

    def hook(_: nn.Module, __: Any, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    handle = module.register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def _sequence_nll(adapter: FisherAdapter, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """Per-item summed next-token loss ``[B]`` (float32 or wider) and token counts ``[B]``."""
    logits = adapter.logits(model, batch)
    labels = adapter.labels(batch).to(logits.device)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if logits.dim() == 2:  # one prediction per example
        nll = F.cross_entropy(logits.to(dtype), labels, reduction="none")
        return nll, torch.ones_like(nll)
    mask = labels != -100
    loss_mask = adapter.loss_mask(batch)
    if loss_mask is not None:
        mask &= loss_mask.to(mask.device).bool()
    nll = F.cross_entropy(
        logits.flatten(0, -2).to(dtype), labels.masked_fill(~mask, 0).flatten(), reduction="none"
    ).view(mask.shape)
    return (nll * mask).sum(dim=-1), mask.sum(dim=-1).to(dtype)


def _activation_distance(activations: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """OpenUnlearning's RMU distance: squared difference averaged over the hidden dimension, summed over the real
    tokens of each item and divided by their count, averaged over items."""
    squared = (activations.float() - target.float()).pow(2).mean(dim=-1)  # [B, T]
    mask = mask.to(squared.dtype)
    return ((squared * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)).mean()


def _token_mask(adapter: FisherAdapter, batch: Any, activations: Tensor) -> Tensor:
    mask = adapter.position_mask(batch)
    if mask is None:
        return torch.ones(activations.shape[:-1], dtype=torch.bool, device=activations.device)
    return mask.to(activations.device).bool()


# -- the edit ---------------------------------------------------------------------------------------------------
class _Objective:
    """One step's objective of ``settings.method`` on ``trainee`` (see the module docstring), with the unedited
    ``reference`` weights standing in for the trainee's where a method needs the reference model."""

    def __init__(
        self,
        trainee: nn.Module,
        reader: FisherAdapter,
        reference: Mapping[str, Tensor],
        settings: UnlearningSettings,
        rmu_layer: str | None,
    ) -> None:
        self.trainee, self.reader, self.settings = trainee, reader, settings
        self.method, self.hyper = settings.method, settings.hyperparameters
        self.caller = FunctionCaller(trainee)
        self.reference: dict[str, Tensor] = {}
        if self.method in ("npo", "rmu"):  # on the trainee's devices (a checkpoint may be on the CPU)
            own = trainee.state_dict()
            self.reference = {
                f"model.{key}": value.detach().to(own[key].device if key in own else value.device)
                for key, value in reference.items()
                if isinstance(value, Tensor)
            }
        self.steered = trainee.get_submodule(rmu_layer) if rmu_layer is not None else None
        self.control: Tensor | None = None

    def on_reference(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(trainee, *args)`` with the reference weights, without gradients."""
        with torch.no_grad():
            return functional_call(self.caller, self.reference, (fn, *args), strict=False, tie_weights=False)

    def __call__(self, forget: Any, retain: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(objective, forget NLL, retain NLL)`` of one forget and one retain batch."""
        method, hyper, reader = self.method, self.hyper, self.reader
        with _captured(self.steered) as forget_outputs:
            forget_nll, forget_tokens = _sequence_nll(reader, self.trainee, forget)
        with torch.set_grad_enabled(method != "ga"), _captured(self.steered) as retain_outputs:
            retain_nll, retain_tokens = _sequence_nll(reader, self.trainee, retain)
        forget_loss = forget_nll.sum() / forget_tokens.sum().clamp_min(1.0)
        retain_loss = retain_nll.sum() / retain_tokens.sum().clamp_min(1.0)
        if method == "ga":
            return -forget_loss, forget_loss, retain_loss
        if method == "graddiff":
            forget_term = -forget_loss
        elif method == "npo":  # −(2/β) log σ(−β log(π/π_ref)), log(π/π_ref) = nll_ref − nll
            reference_nll, _ = self.on_reference(lambda model, batch: _sequence_nll(reader, model, batch), forget)
            forget_term = -2.0 / hyper["beta"] * F.logsigmoid(hyper["beta"] * (forget_nll - reference_nll)).mean()
        elif method == "simnpo":
            normalized = forget_nll / forget_tokens.clamp_min(1.0) - hyper["delta"]
            forget_term = -2.0 / hyper["beta"] * F.logsigmoid(hyper["beta"] * normalized).mean()
        else:  # rmu: activation distances at the steered block instead of next-token losses
            forget_h, retain_h = forget_outputs[-1], retain_outputs[-1]
            if self.control is None:
                self.control = control_vector(forget_h.shape[-1], hyper["steering_coeff"], self.settings.seed)
            control = self.control.to(device=forget_h.device).expand_as(forget_h)
            with _captured(self.steered) as reference_outputs:
                self.on_reference(lambda model, batch: reader.logits(model, batch), retain)
            forget_term = _activation_distance(forget_h, control, _token_mask(reader, forget, forget_h))
            retain_term = _activation_distance(retain_h, reference_outputs[-1], _token_mask(reader, retain, retain_h))
            return hyper["gamma"] * forget_term + hyper["alpha"] * retain_term, forget_loss, retain_loss
        return hyper["gamma"] * forget_term + hyper["alpha"] * retain_loss, forget_loss, retain_loss


def unlearn(
    module: nn.Module,
    forget: Iterable[Any],
    retain: Iterable[Any],
    layer_names: Sequence[str],
    settings: UnlearningSettings,
    state_dict: Mapping[str, Any] | None = None,
    adapter: FisherAdapter | None = None,
    inplace: bool = False,
) -> UnlearningResult:
    """Unlearn ``forget`` from ``state_dict`` (default: the module's weights) by ``settings.method`` for
    ``settings.steps`` steps, training only the weights of ``layer_names`` (linear layers of ``module``, by module
    name); see the module docstring. ``forget`` / ``retain`` are sized re-iterables of batches (DataLoaders or
    lists) the ``adapter`` (default: the module's) reads. ``module`` and ``state_dict`` are left untouched: a deep
    copy trains — unless ``inplace``, for a caller that owns a throwaway copy: then ``module`` itself trains (its
    weights, ``requires_grad`` flags and mode change)."""
    if not isinstance(settings, UnlearningSettings):
        raise TypeError(f"settings must be an UnlearningSettings, not {type(settings).__name__}")
    names = _check_layers(module, layer_names)
    _check_batches("forget_batches", forget)
    _check_batches("retain_batches", retain)
    rmu_layer = None
    if settings.method == "rmu":
        rmu_layer = settings.rmu_layer if settings.rmu_layer is not None else default_rmu_layer(module, names)
        if rmu_layer not in dict(module.named_modules()):
            raise ValueError(f"rmu_layer={rmu_layer!r} is not a module of {type(module).__name__}")
    original = state_dict if state_dict is not None else module.state_dict()
    keys = [f"{name}.weight" for name in names]
    missing = [key for key in keys if key not in original]
    if missing:
        raise ValueError(f"the state dict has no {missing}: it is not a state dict of this module")
    # A checkpoint written from a validation hook arrives under inference mode: train with autograd on.
    with torch.inference_mode(False), torch.enable_grad():
        trainee = module if inplace else copy.deepcopy(module)  # the live model is never modified
        if state_dict is not None:
            trainee.load_state_dict(state_dict)
        trainee.eval()
        for parameter in trainee.parameters():
            parameter.requires_grad_(False)
        trained = [trainee.get_submodule(name).weight for name in names]
        for parameter in trained:
            parameter.requires_grad_(True)
        reader = adapter if adapter is not None else default_fisher_adapter(trainee)
        objective_of = _Objective(trainee, reader, original, settings, rmu_layer)
        optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=settings.weight_decay)
        forget_batches, retain_batches = cycle_batches(forget), cycle_batches(retain)
        device = trained[0].device
        history = []
        for step in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            objective, forget_loss, retain_loss = objective_of(
                move_data_to_device(next(forget_batches), device), move_data_to_device(next(retain_batches), device)
            )
            objective.backward()
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trained, settings.max_grad_norm)
            optimizer.step()
            values = {"forget_loss": forget_loss, "retain_loss": retain_loss, "loss": objective}
            history.append({"step": step, **{key: float(value.detach()) for key, value in values.items()}})
        edited = copy.copy(original) if isinstance(original, dict) else dict(original)
        for key, parameter in zip(keys, trained):
            edited[key] = parameter.detach().to(device=original[key].device, dtype=original[key].dtype).clone()
        del trainee, optimizer, objective_of
    return UnlearningResult(edited, keys, history, settings.hyperparameters, rmu_layer)
