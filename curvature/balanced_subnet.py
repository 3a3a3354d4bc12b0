"""BalancedSubnet (Sakarvadia et al., 2025, "Mitigating memorization in language models") as pure torch maths.

The supervised baseline the paper compares K-FAC editing with: learn a binary mask over the individual weights of
chosen ``nn.Linear`` layers that *raises* the loss on a set of memorized examples (the forget set) while keeping
the loss on other data (the retain set) low. Unlike K-FAC editing it must be told which examples are memorized.

Mask. Every selected weight ``W`` (``out x in``) gets a trainable score tensor ``S`` of the same shape; the forward
pass uses ``W ⊙ M`` with the hard mask ``M = topk_keep_mask(S, ratio)``: exactly ``round(ratio · W.numel())`` (half
up) entries of ``M`` are 0 — those with the smallest ``|S|``, ties broken by flat index (the lower index is pruned
first) — the rest are 1. The ratio is **per layer** (as in the original code): every layer loses the same fraction
of its weights, so no layer can be emptied by a global threshold. A ratio that prunes no weight of some layer
(``ratio · numel < 0.5``) is an error rather than a silent no-op.

Straight-through estimator. ``mask_ste(S, ratio)`` is ``M`` in the forward pass; in the backward pass the
gradient reaches ``|S|`` as if ``M = |S|`` (identity), hence ``∂L/∂S = ∂L/∂M · sign(S)`` (the original applies
the same identity to ``|S|``).

Scores. ``score_init="kaiming"`` (default, the original repository: ``kaiming_uniform_(S, a=√5)``, i.e.
``U(-1/√in, 1/√in)``, drawn from a generator seeded with ``seed``) starts from a random mask; ``"magnitude"``
(``S = |W|``) starts from magnitude pruning. The model's weights are never modified: all its parameters are frozen
while the scores train, and the masked weights are substituted with :func:`torch.func.functional_call`, so modules
are never replaced and state-dict keys never change.

Objective (the original ``do_random_greedy`` with ``loss_weighting = w``)::

    loss = −(1 − w) · L_forget + w · L_retain

with ``L_forget`` / ``L_retain`` the caller's ``loss_fn(model, batch)`` on one forget and one retain batch per step,
minimised over the scores by SGD (momentum, weight decay on the scores). One epoch is one pass over the longer of
the two loaders, cycling the shorter (re-iterating it, so a shuffling DataLoader reshuffles). Defaults are the
paper's best setting: ``w = 0.7``, 5 epochs, ``ratio = 0.0015``, ``lr = 0.3``, SGD momentum 0.9, weight decay
5e-4. The model runs in eval mode during mask training (dropout off, normalisation statistics neither used from
the batch nor updated), so buffers stay untouched too; its mode is restored afterwards.

Export. :func:`apply_masks` zeroes the pruned weights in a copy of a state dict (biases are kept), and
:func:`mask_edits` describes the result per layer as :class:`~memcurve.curvature.edit.LayerEdit` (kept / total =
unmasked / all weights) so it reports like the K-FAC and SVD edits.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from typing_extensions import Self

from memcurve.curvature.edit import LayerEdit
from memcurve.curvature.layers import is_linear, linear_shape

__all__ = [
    "BSN_METHOD",
    "SCORE_INITS",
    "BalancedSubnetResult",
    "FunctionCaller",
    "MaskedWeights",
    "apply_masks",
    "check_ratio",
    "cycle_batches",
    "mask_edits",
    "mask_ste",
    "num_pruned",
    "topk_keep_mask",
    "train_balanced_subnet",
]

BSN_METHOD = "balanced_subnet"
SCORE_INITS = ("kaiming", "magnitude")


# -- the mask ---------------------------------------------------------------------------------------------------
def check_ratio(ratio: Any) -> float:
    """``ratio`` as a float, or ``ValueError`` unless it is a number in the open interval (0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"ratio={ratio!r} must be a number in (0, 1): the fraction of each layer's weights to prune")
    return float(ratio)


def num_pruned(numel: int, ratio: float) -> int:
    """Weights a layer of ``numel`` weights loses: ``round(ratio · numel)``, halves rounded up."""
    return math.floor(check_ratio(ratio) * numel + 0.5)


def topk_keep_mask(scores: Tensor, ratio: float) -> Tensor:
    """Boolean keep mask shaped like ``scores``: ``False`` at exactly ``num_pruned(scores.numel(), ratio)`` entries,
    those of smallest ``|score|`` (ties: lower flat index first); no gradient."""
    pruned = num_pruned(scores.numel(), ratio)
    magnitude = scores.detach().abs().flatten()
    order = torch.sort(magnitude, stable=True).indices
    keep = torch.ones(magnitude.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:pruned]] = False
    return keep.view(scores.shape)


class _StraightThroughMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, magnitude: Tensor, ratio: float) -> Tensor:
        return topk_keep_mask(magnitude, ratio).to(magnitude.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None  # straight through: d mask / d|scores| taken as the identity


def mask_ste(scores: Tensor, ratio: float) -> Tensor:
    """The hard mask of ``scores`` (0./1., ``scores.dtype``) with a straight-through gradient to ``scores``."""
    return _StraightThroughMask.apply(scores.abs(), ratio)


# -- masked forward ---------------------------------------------------------------------------------------------
class FunctionCaller(nn.Module):
    """Lets ``functional_call`` run an arbitrary ``fn(model, *args)`` with substituted parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def _linear_layers(model: nn.Module, layer_names: Sequence[str]) -> dict[str, nn.Module]:
    """The named linear layers (``nn.Linear`` or transformers ``Conv1D``: the mask is elementwise, so the weight's
    storage layout does not matter)."""
    if isinstance(layer_names, str) or not isinstance(layer_names, Sequence):
        raise TypeError(f"layer_names must be a sequence of module names, got {layer_names!r}")
    names = list(layer_names)
    if not names:
        raise ValueError("layer_names is empty: name at least one nn.Linear layer to mask")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"layer_names lists {duplicates} more than once")
    modules = dict(model.named_modules())
    layers = {}
    for name in names:
        module = modules.get(name)
        if module is None:
            linear = [n for n, m in modules.items() if is_linear(m)]
            raise ValueError(f"layer {name!r} is not a module of the model; its nn.Linear layers are {linear[:20]}")
        if not is_linear(module):
            raise TypeError(
                f"layer {name!r} is a {type(module).__name__}; BalancedSubnet masks nn.Linear weights only (and "
                "transformers Conv1D)"
            )
        layers[name] = module
    return layers


class MaskedWeights:
    """Trainable scores for the weights of ``layer_names`` and a straight-through masked forward of ``model``.

    As a context manager it freezes every parameter of ``model`` (``requires_grad=False``) and restores the flags on
    exit, also after an exception. ``call(fn, *args)`` runs ``fn(model, *args)`` with each selected weight replaced
    by ``W ⊙ mask_ste(S)`` through :func:`torch.func.functional_call`: the model and its state-dict keys are never
    changed, and gradients flow to the scores only.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_names: Sequence[str],
        ratio: float = 0.0015,
        score_init: str = "kaiming",
        seed: int = 0,
    ) -> None:
        self.ratio = check_ratio(ratio)
        if score_init not in SCORE_INITS:
            raise ValueError(f"score_init={score_init!r} is not supported; choose one of {SCORE_INITS}")
        self.model = model
        self.layers = _linear_layers(model, layer_names)
        for name, layer in self.layers.items():
            if num_pruned(layer.weight.numel(), self.ratio) == 0:
                raise ValueError(
                    f"ratio={ratio!r} prunes no weight of layer {name!r} ({layer.weight.numel()} weights): "
                    f"ratio · numel must be at least 0.5"
                )
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.scores: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            weight = layer.weight.detach()
            if score_init == "magnitude":
                scores = weight.abs().float().clone()
            else:  # kaiming_uniform_(a=√5): U(-1/√fan_in, 1/√fan_in), fan_in = in_features
                bound = 1.0 / math.sqrt(linear_shape(layer)[0])
                scores = (torch.rand(weight.shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
            self.scores[name] = scores.to(weight.device).requires_grad_(True)
        self._caller = FunctionCaller(model)
        self._saved_flags: dict[str, bool] | None = None

    def __enter__(self) -> Self:
        self._saved_flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        return self

    def __exit__(self, *exc: object) -> None:
        flags, self._saved_flags = self._saved_flags or {}, None
        for name, parameter in self.model.named_parameters():
            if name in flags:
                parameter.requires_grad_(flags[name])

    def masked_weights(self) -> dict[str, Tensor]:
        """``{"<layer>.weight": W ⊙ mask_ste(S)}``: differentiable in the scores, not in ``W``."""
        return {
            f"{name}.weight": layer.weight.detach() * mask_ste(self.scores[name], self.ratio).to(layer.weight.dtype)
            for name, layer in self.layers.items()
        }

    def call(self, fn: Callable[..., Any], *args: Any, weights: Mapping[str, Tensor] | None = None) -> Any:
        """``fn(model, *args)`` with the masked weights (``weights``: reuse one ``masked_weights()`` for several
        calls of a step)."""
        weights = self.masked_weights() if weights is None else weights
        return functional_call(self._caller, {f"model.{key}": value for key, value in weights.items()}, (fn, *args))

    def keep_masks(self) -> dict[str, Tensor]:
        """The current hard masks (bool, ``True`` = keep), detached."""
        return {name: topk_keep_mask(scores, self.ratio) for name, scores in self.scores.items()}


# -- training ---------------------------------------------------------------------------------------------------
@dataclass
class BalancedSubnetResult:
    """Final keep masks (bool, per layer), final scores, and one history entry per epoch: the mean ``forget_loss``,
    ``retain_loss`` and objective ``loss`` over the epoch's steps (each with the mask of its step)."""

    masks: dict[str, Tensor]
    scores: dict[str, Tensor]
    history: list[dict[str, float]] = field(default_factory=list)


def _check_batches(name: str, batches: Any) -> int:
    if iter(batches) is batches:
        raise TypeError(f"{name} must be re-iterable (a DataLoader or a list of batches), not a one-shot iterator")
    try:
        count = len(batches)
    except TypeError as error:
        raise TypeError(f"{name} must have a length (a DataLoader or a list of batches)") from error
    if count == 0:
        raise ValueError(
            f"{name} is empty: BalancedSubnet needs examples to "
            + ("forget (the memorized set)" if name == "forget_batches" else "retain (non-memorized data)")
        )
    return count


def cycle_batches(batches: Iterable[Any]) -> Iterator[Any]:
    """The batches of a loader over and over (a new pass, and a new shuffle, each time round)."""
    while True:
        yield from batches


def _check_number(name: str, value: Any, low: float, high: float = math.inf, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a number")
    value = float(value)
    if not (value > low if open_low else value >= low) or value > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name}={value!r} must be in {bracket}{low}, {high}]")
    return value


def train_balanced_subnet(
    model: nn.Module,
    layer_names: Sequence[str],
    forget_batches: Iterable[Any],
    retain_batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    ratio: float = 0.0015,
    retain_weight: float = 0.7,
    epochs: int = 5,
    lr: float = 0.3,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    score_init: str = "kaiming",
    seed: int = 0,
) -> BalancedSubnetResult:
    """Learn per-layer keep masks for ``layer_names`` (``nn.Linear`` modules of ``model``); ``model`` is unchanged.

    ``forget_batches`` / ``retain_batches`` are sized re-iterables of batches (DataLoaders or lists); ``loss_fn(
    model, batch)`` returns the mean loss of a batch (it moves the batch to the model's device itself). See the
    module docstring for the objective, the epoch and the defaults.
    """
    ratio = check_ratio(ratio)
    retain_weight = _check_number("retain_weight", retain_weight, 0.0, 1.0)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be a positive integer")
    lr = _check_number("lr", lr, 0.0, open_low=True)
    momentum = _check_number("momentum", momentum, 0.0)
    weight_decay = _check_number("weight_decay", weight_decay, 0.0)
    num_forget = _check_batches("forget_batches", forget_batches)
    num_retain = _check_batches("retain_batches", retain_batches)
    # Autograd on even when called from a no_grad / inference_mode context (e.g. a validation hook).
    with torch.inference_mode(False), torch.enable_grad():
        masked = MaskedWeights(model, layer_names, ratio, score_init=score_init, seed=seed)
        optimizer = torch.optim.SGD(list(masked.scores.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
        steps = max(num_forget, num_retain)
        history = []
        was_training = model.training
        model.eval()
        try:
            with masked:
                for epoch in range(epochs):
                    forget, retain = cycle_batches(forget_batches), cycle_batches(retain_batches)
                    sums = {"forget_loss": 0.0, "retain_loss": 0.0, "loss": 0.0}
                    for _ in range(steps):
                        optimizer.zero_grad(set_to_none=True)
                        weights = masked.masked_weights()
                        forget_loss = masked.call(loss_fn, next(forget), weights=weights)
                        retain_loss = masked.call(loss_fn, next(retain), weights=weights)
                        loss = -(1.0 - retain_weight) * forget_loss + retain_weight * retain_loss
                        loss.backward()
                        optimizer.step()
                        for key, value in (("forget_loss", forget_loss), ("retain_loss", retain_loss), ("loss", loss)):
                            sums[key] += float(value.detach())
                    means = {key: value / steps for key, value in sums.items()}
                    history.append({"epoch": epoch, "steps": steps, **means})
        finally:
            model.train(was_training)
    scores = {name: value.detach().clone() for name, value in masked.scores.items()}
    return BalancedSubnetResult(masks=masked.keep_masks(), scores=scores, history=history)


# -- export -----------------------------------------------------------------------------------------------------
def _weight_key(state_dict: Mapping[str, Any], prefix: str, name: str, mask: Tensor) -> str:
    key = f"{prefix}{name}.weight"
    weight = state_dict.get(key)
    if weight is None:
        raise ValueError(f"mask of layer {name!r}: the state dict has no {key!r}")
    if mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(
            f"mask of layer {name!r} must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return key


def apply_masks(state_dict: Mapping[str, Any], masks: Mapping[str, Tensor], prefix: str = "") -> dict[str, Any]:
    """A shallow copy of ``state_dict`` in which ``f"{prefix}{layer}.weight"`` is zeroed where ``masks[layer]`` is
    ``False`` (a new tensor; the input mapping and its tensors are left bit-identical; biases are kept)."""
    new_state_dict = copy.copy(state_dict) if isinstance(state_dict, dict) else dict(state_dict)
    for name, mask in masks.items():
        key = _weight_key(state_dict, prefix, name, mask)
        weight = state_dict[key]
        new_state_dict[key] = weight.masked_fill(~mask.to(weight.device), 0)
    return new_state_dict


def mask_edits(
    state_dict: Mapping[str, Any],
    edited_state_dict: Mapping[str, Any],
    masks: Mapping[str, Tensor],
    prefix: str = "",
    scores: Mapping[str, Tensor] | None = None,
) -> dict[str, LayerEdit]:
    """Per-layer :class:`LayerEdit` of a masking (``apply_masks(state_dict, masks, prefix)``): ``kept_pairs`` /
    ``total_pairs`` are unmasked / all weights, ``energy_kept`` is ``‖W'‖²_F / ‖W‖²_F``, ``threshold`` the smallest
    kept ``|score|`` (``nan`` without ``scores``)."""
    edits = {}
    for name, mask in masks.items():
        key = _weight_key(state_dict, prefix, name, mask)
        weight, edited = state_dict[key].double(), edited_state_dict[key].double()
        norm, kept_norm = float(weight.norm()), float(edited.norm())
        threshold = math.nan
        if scores is not None and bool(mask.any()):
            threshold = float(scores[name].detach().abs()[mask.to(scores[name].device)].min())
        edits[name] = LayerEdit(
            method=BSN_METHOD,
            weight=edited_state_dict[key],
            bias=None,
            homogeneous=False,
            kept_pairs=int(mask.sum()),
            total_pairs=mask.numel(),
            threshold=threshold,
            energy_kept=kept_norm**2 / norm**2 if norm > 0 else math.nan,
            change_norm=float((weight - edited).norm()),
            weight_norm=norm,
        )
    return edits
