"""The edit methods behind one function: :func:`apply_edit` turns a request and a state dict into edited weights.

``kfac`` / ``kfac-separable`` / ``svd`` are closed-form edits (:func:`memcurve.curvature.edit_state_dict`);
``bsn`` trains a BalancedSubnet mask on a copy of the module loaded with the state dict, on the forget / retain data
the module provides (see :class:`BalancedSubnetSettings`); the gradient unlearning methods (``ga``, ``graddiff``,
``npo``, ``simnpo``, ``rmu``; :mod:`memcurve.editing.unlearning`) fine-tune the layers' weights of such a copy on the
same data for the request's ``steps``. Inputs are never modified: the result is a shallow copy of the state dict with
only the edited layers' tensors replaced.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memcurve.curvature.balanced_subnet import SCORE_INITS, apply_masks, mask_edits, train_balanced_subnet
from memcurve.curvature.edit import LayerEdit, edit_state_dict
from memcurve.curvature.storage import StoredFactors
from memcurve.editing.request import CURVATURE_METHODS, EditRequest
from memcurve.editing.unlearning import UNLEARNING_METHODS, UnlearningSettings, unlearn
from memcurve.utils.arguments import check_choice, check_positive_int

__all__ = [
    "BSN_MODULE_METHODS",
    "UNLEARNING_MODULE_METHODS",
    "BalancedSubnetSettings",
    "EditResult",
    "apply_edit",
    "check_bsn_module",
    "check_unlearning_module",
]

# What a LightningModule provides for BalancedSubnet: which examples are memorized, and the loss of a batch.
BSN_MODULE_METHODS = ("balanced_subnet_data", "balanced_subnet_loss")
# What it provides for the gradient unlearning methods: the same forget / retain data (batches are read through the
# module's FisherAdapter, so no loss method is needed).
UNLEARNING_MODULE_METHODS = ("balanced_subnet_data",)


def _check_range(name: str, value: Any, low: float, high: float = math.inf, open_low: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{name}={value!r} must be a number in {'(' if open_low else '['}{low}, {high}]")
    return float(value)


@dataclass(frozen=True)
class BalancedSubnetSettings:
    """How a BalancedSubnet mask is trained (Sakarvadia et al., 2025; defaults: the paper's best run)."""

    retain_weight: float = 0.7
    """``w`` of ``−(1 − w)·L_forget + w·L_retain``, in [0, 1]."""
    epochs: int = 5
    """Mask-training epochs (one epoch = one pass over the longer of the forget and retain loaders)."""
    lr: float = 0.3
    """SGD learning rate of the scores."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    batch_size: int = 64
    """Batch size of the forget and of the retain loader."""
    max_forget: int | None = None
    """Train on a random subset of at most this many forget examples."""
    max_retain: int | None = None
    """Train on a random subset of at most this many retain examples."""
    score_init: str = "kaiming"
    """``kaiming`` (the original code: random scores) or ``magnitude`` (scores = |W|)."""
    seed: int = 0
    """Seeds the score initialisation, the subsets and the shuffling."""

    def __post_init__(self) -> None:
        _check_range("retain_weight", self.retain_weight, 0.0, 1.0)
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("max_forget", self.max_forget, allow_none=True)
        check_positive_int("max_retain", self.max_retain, allow_none=True)
        _check_range("lr", self.lr, 0.0, open_low=True)
        _check_range("momentum", self.momentum, 0.0)
        _check_range("weight_decay", self.weight_decay, 0.0)
        check_choice("score_init", self.score_init, SCORE_INITS)


@dataclass
class EditResult:
    """The edited state dict (a shallow copy), each edited layer's :class:`LayerEdit`, and the training history of
    BSN (per epoch) or of an unlearning method (per step: ``forget_loss``, ``retain_loss``, ``loss``)."""

    state_dict: dict[str, Any]
    layers: dict[str, LayerEdit]
    history: list[dict[str, float]] = field(default_factory=list)


def check_bsn_module(module: Any) -> None:
    """``TypeError`` unless ``module`` provides what BalancedSubnet needs (:data:`BSN_MODULE_METHODS`)."""
    missing = [name for name in BSN_MODULE_METHODS if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(
            f"method 'bsn' needs {type(module).__name__}.{' and .'.join(missing)}: the module must say which examples "
            "are memorized (balanced_subnet_data) and how to score a batch (balanced_subnet_loss)"
        )


def check_unlearning_module(module: Any, method: str) -> None:
    """``TypeError`` unless ``module`` provides what the unlearning methods need (:data:`UNLEARNING_MODULE_METHODS`)."""
    missing = [name for name in UNLEARNING_MODULE_METHODS if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(
            f"method {method!r} needs {type(module).__name__}.{' and .'.join(missing)}: the module must give the "
            "forget set (the memorized examples) and retain data"
        )


def apply_edit(
    request: EditRequest,
    state_dict: Mapping[str, Any],
    layer_names: Sequence[str],
    *,
    factors: StoredFactors | None = None,
    module: nn.Module | None = None,
    datamodule: Any = None,
    bsn: BalancedSubnetSettings | None = None,
    unlearning: UnlearningSettings | None = None,
) -> EditResult:
    """Edit ``layer_names`` of ``state_dict`` as ``request`` says.

    ``factors`` (kind ``eigen``): required for the K-FAC methods; ``module`` and ``datamodule``: required for ``bsn``
    and the unlearning methods (the mask / weights are trained on a deep copy of ``module`` loaded with
    ``state_dict``; the module itself is untouched). ``unlearning``: the unlearning methods' settings, whose
    ``method`` and ``steps`` the request replaces.
    """
    if request.method in ("kfac", "kfac-separable"):
        if factors is None:
            raise ValueError(f"method={request.method!r} needs K-FAC factors (a KFACFactors file or index)")
        if factors.kind != "eigen":
            raise ValueError(
                f"{factors.path}: holds kind {factors.kind!r}; editing needs kind 'eigen' (KFACFactors store='eigen')"
            )
    if request.method in UNLEARNING_METHODS:
        return _unlearning(request, state_dict, layer_names, module, datamodule, unlearning or UnlearningSettings())
    if request.method != "bsn":
        kind, value = request.strength
        edited, layers = edit_state_dict(
            state_dict,
            factors if request.method != "svd" else None,
            list(layer_names),
            method=CURVATURE_METHODS[request.method],
            **{kind: value},
        )
        return EditResult(edited, layers)
    return _balanced_subnet(request, state_dict, layer_names, module, datamodule, bsn or BalancedSubnetSettings())


def _balanced_subnet(
    request: EditRequest,
    state_dict: Mapping[str, Any],
    layer_names: Sequence[str],
    module: nn.Module | None,
    datamodule: Any,
    settings: BalancedSubnetSettings,
) -> EditResult:
    check_bsn_module(module)
    if datamodule is None:
        raise ValueError("method 'bsn' needs the datamodule: it trains the mask on its forget/retain data")
    with _trainee(module, state_dict, datamodule, settings) as (trainee, forget, retain):
        result = train_balanced_subnet(
            trainee,
            list(layer_names),
            forget,
            retain,
            _module_loss,
            ratio=request.ratio,
            retain_weight=settings.retain_weight,
            epochs=settings.epochs,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            score_init=settings.score_init,
            seed=settings.seed,
        )
        del trainee  # the copy's memory goes before the edited state dict is built
    edited = apply_masks(state_dict, result.masks)
    return EditResult(edited, mask_edits(state_dict, edited, result.masks, scores=result.scores), result.history)


@contextlib.contextmanager
def _trainee(
    module: nn.Module, state_dict: Mapping[str, Any], datamodule: Any, settings: Any
) -> Iterator[tuple[nn.Module, Any, Any]]:
    """A private copy of ``module`` holding ``state_dict`` (the live model is never modified) and its forget/retain
    loaders (``settings``: batch size, subset sizes, seed), with autograd on: a checkpoint written from a validation
    hook arrives under inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        trainee = copy.deepcopy(module)
        trainee.load_state_dict(state_dict)
        forget, retain = trainee.balanced_subnet_data(
            datamodule, settings.batch_size, max_forget=settings.max_forget, max_retain=settings.max_retain,
            seed=settings.seed,
        )  # fmt: skip
        yield trainee, forget, retain


def _module_loss(module: Any, batch: Any) -> torch.Tensor:
    return module.balanced_subnet_loss(batch)


def _unlearning(
    request: EditRequest,
    state_dict: Mapping[str, Any],
    layer_names: Sequence[str],
    module: nn.Module | None,
    datamodule: Any,
    settings: UnlearningSettings,
) -> EditResult:
    check_unlearning_module(module, request.method)
    if datamodule is None:
        raise ValueError(f"method {request.method!r} needs the datamodule: it trains on its forget/retain data")
    settings = dataclasses.replace(settings, method=request.method, steps=request.steps)
    with _trainee(module, state_dict, datamodule, settings) as (trainee, forget, retain):
        result = unlearn(trainee, forget, retain, list(layer_names), settings, state_dict=state_dict, inplace=True)
        del trainee
    layers = {}
    for key in result.parameters:
        layers[key.removesuffix(".weight")] = _weight_edit(request.method, state_dict[key], result.state_dict[key])
    return EditResult(result.state_dict, layers, result.history)


def _weight_edit(method: str, weight: torch.Tensor, edited: torch.Tensor) -> LayerEdit:
    """A fine-tuned weight as a :class:`LayerEdit`: every weight kept (``kept_pairs = total_pairs =`` its entries),
    ``energy_kept = ‖W'‖² / ‖W‖²``, no threshold."""
    before, after = weight.detach().double(), edited.detach().double()
    norm = float(before.norm())
    return LayerEdit(
        method=method,
        weight=edited,
        bias=None,
        homogeneous=False,
        kept_pairs=weight.numel(),
        total_pairs=weight.numel(),
        threshold=math.nan,
        energy_kept=float(after.norm()) ** 2 / norm**2 if norm > 0 else math.nan,
        change_norm=float((after - before).norm()),
        weight_norm=norm,
    )
