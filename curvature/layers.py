"""The linear layers K-FAC models: ``torch.nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2).

Both compute ``y = x Wᵀ + b`` for an ``out x in`` matrix ``W``, but they store it differently: ``nn.Linear.weight``
is ``[out_features, in_features]`` (layout ``"out_in"``), ``transformers.pytorch_utils.Conv1D.weight`` is
``[in_features, out_features]`` (layout ``"in_out"``, ``y = x @ weight + bias``, ``nf`` = out features). The
curvature code works on the ``out x in`` matrix; :func:`as_out_in` / :func:`from_out_in` convert a stored weight
to it and back. ``Conv1D`` is recognised by its class name and its ``nf`` attribute, so transformers is never
imported here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

WEIGHT_LAYOUTS = ("out_in", "in_out")
LINEAR_KINDS = "nn.Linear or transformers Conv1D"


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (a linear layer with a transposed weight)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(module, nn.Module)


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer K-FAC supports (``nn.Linear`` or HF ``Conv1D``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.nf)
    raise TypeError(f"{type(module).__name__} is not a linear layer ({LINEAR_KINDS})")


def weight_layout(module: nn.Module) -> str:
    """How the layer stores its weight: ``"out_in"`` (``nn.Linear``) or ``"in_out"`` (``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return "out_in"
    if is_conv1d(module):
        return "in_out"
    raise TypeError(f"{type(module).__name__} is not a linear layer ({LINEAR_KINDS})")


def check_layout(layout: str) -> str:
    if layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight layout {layout!r} is not one of {WEIGHT_LAYOUTS}")
    return layout


def as_out_in(weight: Tensor, layout: str) -> Tensor:
    """The ``out x in`` matrix of a weight stored in ``layout`` (a view, no copy)."""
    return weight if check_layout(layout) == "out_in" else weight.T


def from_out_in(weight_out_in: Tensor, layout: str) -> Tensor:
    """An ``out x in`` matrix in the storage ``layout`` (contiguous)."""
    return (weight_out_in if check_layout(layout) == "out_in" else weight_out_in.T).contiguous()


WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_module_name(name: str) -> str:
    """``name`` without wrapper segments: ``model.layers.0._fsdp_wrapped_module.mlp.up`` → ``model.layers.0.mlp.up``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def named_linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The linear modules (``nn.Linear``, HF ``Conv1D``) of ``model`` by their clean names (before any wrapping)."""
    return {clean_module_name(name): m for name, m in model.named_modules() if is_linear(m)}


class _CleanNames:
    """A view of ``model`` whose ``named_modules()`` has clean names (all :class:`KFACTracker` reads of a model)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        for name, module in self.model.named_modules():
            yield clean_module_name(name), module


def layer_dims(model: nn.Module, layer_names: Sequence[str], bias: str = "exclude") -> dict[str, tuple[int, int]]:
    """``{name: (d_A, d_G)}``: the side of A (``in_features``, +1 with ``bias="homogeneous"`` and a bias) and of G."""
    modules = named_linear_modules(model)
    dims = {}
    for name in layer_names:
        if name not in modules:
            raise ValueError(f"layer {name!r} is not an nn.Linear of the model; linear layers: {sorted(modules)[:20]}")
        m = modules[name]
        in_features, out_features = linear_shape(m)
        dims[name] = (in_features + int(bias == "homogeneous" and m.bias is not None), out_features)
    return dims
