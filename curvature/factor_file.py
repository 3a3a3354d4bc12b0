"""The single-file format of K-FAC factors (or their eigendecompositions): safetensors with validated metadata.

File layout: one safetensors file. Tensors are named ``"<layer>/A"`` and ``"<layer>/G"`` (kind
``"factors"``) or ``"<layer>/eigvals_A"``, ``"<layer>/eigvecs_A"``, ``"<layer>/eigvals_G"``,
``"<layer>/eigvecs_G"`` (kind ``"eigen"``). The safetensors metadata holds one JSON document under the key
``"memcurve"`` with: ``format``, ``version``, ``kind``, ``model_fingerprint``, ``settings`` (``mode``,
``position``, ``bias``, ``dtype``, ``drop_last_position``, ``fisher``, ``mc_samples`` — what
``FactorSettings.file_settings()`` gives — and anything else passed; files written before the rename say
``fisher_type`` for ``fisher``, which the readers map with :func:`canonical_settings`), ``layers`` (per layer
``in_features``, ``out_features``, ``homogeneous``, ``count_A``, ``count_G`` and ``weight_layout``: ``"out_in"``
for ``nn.Linear``, ``"in_out"`` for a transformers ``Conv1D`` whose weight is stored transposed; files written
before this key existed mean ``"out_in"``) and ``tensors`` (per tensor ``shape``, ``dtype``, ``sha256`` of its
bytes).

Model fingerprint: sha256 over the sorted ``(parameter name, shape)`` pairs of the module passed (its
``named_parameters()``; tied parameters once). Pass the same module on save and on load (e.g. the
LightningModule both times, or the inner network both times), since prefixes are part of the names.

Loading checks all of it — readable file (truncation is caught by safetensors, flipped data bytes by the
per-tensor sha256), format and version, the tensor set, shapes and dtypes, the required settings and any
``expect``-ed values, and, given a model, its fingerprint and every layer's shape — and raises
``FactorFileError`` naming the file, the layer or key, the expected and the found value.

Writes are atomic: the file is written to a temporary file in the target directory, fsynced, then moved
into place with ``os.replace``; a failed write leaves any previous file untouched and no temporary behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from memcurve.curvature.eigen import LayerEigen
from memcurve.curvature.fisher import FISHER_TYPES
from memcurve.curvature.layers import WEIGHT_LAYOUTS, clean_module_name, is_linear, linear_shape, weight_layout
from memcurve.curvature.settings import FILE_SETTINGS
from memcurve.curvature.sums import LayerFactors
from memcurve.curvature.tracker import BIAS_MODES, DTYPES, MODES, POSITIONS
from memcurve.utils.files import atomic_write

FORMAT = "memcurve.kfac"
FORMAT_VERSION = 1
METADATA_KEY = "memcurve"
REQUIRED_SETTINGS = FILE_SETTINGS
# Settings renamed since files were first written: old name -> today's. Readers map them (canonical_settings).
RENAMED_SETTINGS = {"fisher_type": "fisher"}
KINDS = {"factors": ("A", "G"), "eigen": ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G")}


class FactorFileError(ValueError):
    """A factor file is unreadable, corrupted, or does not match the model or the expected settings."""


@dataclass
class StoredFactors:
    """Content of a factor file: ``layers`` maps names to ``LayerFactors`` or ``LayerEigen``."""

    path: Path
    kind: str
    layers: dict[str, LayerFactors | LayerEigen]
    settings: dict[str, Any]
    model_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # the per-layer metadata of the file

    def weight_layouts(self) -> dict[str, str]:
        """``{layer: "out_in" | "in_out"}``: how each layer's weight is stored (old files: ``"out_in"``)."""
        return {name: self.layer_info.get(name, {}).get("weight_layout", "out_in") for name in self.layers}


def model_fingerprint(model: nn.Module | Mapping[str, Any]) -> str:
    """sha256 hex of the sorted (parameter name, shape) pairs; a mapping is read as name → tensor or shape. Names
    are taken without wrapper segments (FSDP1, activation checkpointing, ``torch.compile``), so a wrapped module
    whose parameters are whole (FSDP2's DTensors; FSDP1 within ``summon_full_params``) has its unwrapped print."""
    if isinstance(model, nn.Module):
        items = [(clean_module_name(name), tuple(p.shape)) for name, p in model.named_parameters()]
    else:
        items = [(name, tuple(v.shape) if isinstance(v, Tensor) else tuple(v)) for name, v in model.items()]
    text = json.dumps(sorted([name, list(shape)] for name, shape in items), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(t: Tensor) -> str:
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


ALLOWED_SETTINGS = {
    "mode": MODES,
    "position": POSITIONS,
    "bias": BIAS_MODES,
    "dtype": tuple(DTYPES),
    "drop_last_position": (False, True),
    "fisher": FISHER_TYPES,
}


def canonical_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (of a file, an index or ``expect``) with old setting names mapped to today's
    (``RENAMED_SETTINGS``: ``fisher_type`` → ``fisher``), so files written before a rename still load. A mapping
    that holds both names is returned as it is (and refused by the checks)."""
    settings = dict(settings)
    for old, new in RENAMED_SETTINGS.items():
        if old in settings and new not in settings:
            settings[new] = settings.pop(old)
    return settings


def _settings_problem(settings: Mapping[str, Any]) -> str | None:
    """Why ``settings`` is not a valid set of accumulation settings, or None (old names: see canonical_settings)."""
    for old, new in RENAMED_SETTINGS.items():
        if old in settings:
            return f"setting {old!r} is the old name of {new!r}; pass {new}={settings[old]!r} instead"
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        return f"settings lack {missing}; required keys are {list(REQUIRED_SETTINGS)}"
    for key, allowed in ALLOWED_SETTINGS.items():
        if settings[key] not in allowed or isinstance(settings[key], bool) != (key == "drop_last_position"):
            return f"setting {key}={settings[key]!r} is not one of {allowed}"
    mc = settings["mc_samples"]
    if not isinstance(mc, int) or isinstance(mc, bool) or mc < 1:
        return f"setting mc_samples={mc!r} must be a positive integer"
    return None


def _kind_of(layers: Mapping[str, LayerFactors | LayerEigen]) -> str:
    kinds = {
        "factors" if isinstance(v, LayerFactors) else "eigen" if isinstance(v, LayerEigen) else None
        for v in layers.values()
    }
    if None in kinds or len(kinds) != 1:
        raise TypeError("layers must all be LayerFactors or all be LayerEigen")
    return kinds.pop()


def _linear(model: nn.Module, name: str, path: Path) -> nn.Module:
    module = dict(model.named_modules()).get(name)
    if module is None:
        raise FactorFileError(f"{path}: layer {name!r} is not a module of the model")
    if not is_linear(module):
        raise FactorFileError(
            f"{path}: layer {name!r} is a {type(module).__name__} in the model, not an nn.Linear (nor a Conv1D)"
        )
    return module


def check_layers_match_model(
    path: Path,
    source: str,
    layers: Mapping[str, Mapping[str, Any]],
    settings: Mapping[str, Any],
    fingerprint: str,
    model: nn.Module,
    modules: Mapping[str, nn.Module] | None = None,
) -> None:
    """Refuse factors (a file or a sharded index, named ``source`` in messages) made for another model: every
    layer must be a linear module of ``model`` with the recorded sizes, weight layout and bias coordinate, and
    the parameter fingerprint must match. ``modules``: name -> module lookup (default: ``model.named_modules()``)."""
    for name, info in layers.items():
        module = modules.get(name) if modules is not None else None
        if modules is None:
            module = _linear(model, name, path)
        elif module is None:
            raise FactorFileError(f"{path}: layer {name!r} is not an nn.Linear (nor a Conv1D) of the model")
        for attr, value in zip(("in_features", "out_features"), linear_shape(module)):
            if value != info[attr]:
                raise FactorFileError(
                    f"{path}: layer {name!r} {attr} is {value} in the model, {info[attr]} in the {source}"
                )
        layout = info.get("weight_layout", "out_in")
        if weight_layout(module) != layout:
            raise FactorFileError(
                f"{path}: layer {name!r} is a {type(module).__name__} with weight layout "
                f"{weight_layout(module)!r} in the model, {layout!r} in the {source}"
            )
        homogeneous = settings["bias"] == "homogeneous" and module.bias is not None
        if info["homogeneous"] != homogeneous:
            raise FactorFileError(
                f"{path}: layer {name!r} homogeneous bias coordinate is {info['homogeneous']} "
                f"in the {source}, expected {homogeneous} (bias={settings['bias']!r}, the model's "
                f"layer has {'a' if module.bias is not None else 'no'} bias)"
            )
    actual = model_fingerprint(model)
    if actual != fingerprint:
        raise FactorFileError(
            f"{path}: model fingerprint {actual[:16]}… does not match the {source}'s "
            f"{fingerprint[:16]}…: the model's parameter names or shapes differ "
            "from the model the factors were computed on"
        )


def _expected_shapes(kind: str, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    if kind == "factors":
        return {"A": (d_in, d_in), "G": (d_out, d_out)}
    return {"eigvals_A": (d_in,), "eigvecs_A": (d_in, d_in), "eigvals_G": (d_out,), "eigvecs_G": (d_out, d_out)}


def save_factors(
    path: str | os.PathLike,
    layers: Mapping[str, LayerFactors | LayerEigen],
    *,
    model: nn.Module,
    settings: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``layers`` with their metadata to ``path`` atomically; returns the path.

    ``settings`` must contain ``REQUIRED_SETTINGS`` (e.g. ``FactorSettings(...).resolve(adapter).file_settings()``
    or ``{**tracker.settings(), "fisher": ..., "mc_samples": ...}``); ``extra`` is any JSON-serialisable
    information to keep alongside.
    """
    path = Path(path)
    if not layers:
        raise ValueError("layers is empty: nothing to save")
    problem = _settings_problem(settings)
    if problem:
        raise ValueError(problem)
    kind = _kind_of(layers)
    modules = {name: _linear(model, name, path) for name in layers}
    write_factor_file(path, layers, modules, kind, settings, model_fingerprint(model), extra or {})
    return path


def layer_metadata(
    name: str,
    value: LayerFactors | LayerEigen,
    module: nn.Module,
    kind: str,
    bias: str,
    tensors: dict[str, Tensor],
) -> dict[str, Any]:
    """Check one layer against its module, add its tensors to ``tensors``; returns its metadata."""
    homogeneous = bias == "homogeneous" and module.bias is not None
    in_features, out_features = linear_shape(module)
    d_in = in_features + int(homogeneous)
    for key, shape in _expected_shapes(kind, d_in, out_features).items():
        t = getattr(value, key).detach().to("cpu").contiguous()
        if tuple(t.shape) != shape:
            raise ValueError(
                f"layer {name!r}: {key} has shape {tuple(t.shape)}, the model's layer (bias={bias!r}) needs {shape}"
            )
        tensors[f"{name}/{key}"] = t
    counts = int(value.count_A), int(value.count_G)
    if min(counts) < 1:
        raise ValueError(f"layer {name!r}: counts (count_A, count_G) = {counts} must be positive")
    return {
        "in_features": in_features,
        "out_features": out_features,
        "homogeneous": homogeneous,
        "count_A": counts[0],
        "count_G": counts[1],
        "weight_layout": weight_layout(module),
    }


def write_factor_file(
    path: Path,
    layers: Mapping[str, LayerFactors | LayerEigen],
    modules: Mapping[str, nn.Module],
    kind: str,
    settings: Mapping[str, Any],
    fingerprint: str,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The one writer of the file format (single files and the shards of a sharded run); returns the layer
    metadata. Every layer is checked against its module before anything is written."""
    tensors: dict[str, Tensor] = {}
    layer_meta = {
        name: layer_metadata(name, layers[name], modules[name], kind, settings["bias"], tensors) for name in layers
    }
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": kind,
        "model_fingerprint": fingerprint,
        "settings": dict(settings),
        "layers": layer_meta,
        "tensors": {
            k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sha256": _sha256(t)}
            for k, t in tensors.items()
        },
        "extra": dict(extra),
    }
    text = json.dumps(meta, sort_keys=True)  # fails here, before any file is touched, if not serialisable
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: text}))
    return layer_meta


def _read(path: Path, device: str | torch.device) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such factor file")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            raw = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # safe_open is not iterable
    except Exception as exc:  # safetensors raises its own error type for truncated/garbled files
        raise FactorFileError(
            f"{path}: not a readable safetensors file, it may be truncated or corrupted ({type(exc).__name__}: {exc})"
        ) from exc
    if METADATA_KEY not in raw:
        raise FactorFileError(f"{path}: no {METADATA_KEY!r} metadata; not a memcurve factor file")
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise FactorFileError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON ({exc})") from exc
    return meta, tensors


def load_factor_file(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    expect: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> StoredFactors:
    """Read and validate a factor file (see the module docstring).

    ``expect`` pins settings, e.g. ``{"mode": "expand"}``; ``model`` (optional) must match the file. Old setting
    names (``fisher_type``) are read as today's (``fisher``), in the file and in ``expect``.
    An index of sharded factors (``*.index.json``, :mod:`memcurve.curvature.sharded`) is read by
    ``load_sharded_factors``: the same checks, and ``layers`` is a lazy mapping (each layer read on first access).
    """
    path = Path(path)
    meta, tensors = _read(path, device)
    if meta.get("format") != FORMAT:
        raise FactorFileError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise FactorFileError(f"{path}: format version {meta.get('version')!r}, this memcurve reads {FORMAT_VERSION}")
    for key in ("kind", "model_fingerprint", "settings", "layers", "tensors"):
        if key not in meta:
            raise FactorFileError(f"{path}: metadata lacks {key!r}")
    kind, layer_meta, tensor_meta = meta["kind"], meta["layers"], meta["tensors"]
    if not isinstance(meta["settings"], dict):
        raise FactorFileError(f"{path}: settings is {meta['settings']!r}, expected a JSON object")
    settings = canonical_settings(meta["settings"])
    if kind not in KINDS:
        raise FactorFileError(f"{path}: kind {kind!r}, expected one of {tuple(KINDS)}")
    problem = _settings_problem(settings)
    if problem:
        raise FactorFileError(f"{path}: {problem}")
    for key, value in canonical_settings(expect or {}).items():
        if settings.get(key) != value:
            raise FactorFileError(f"{path}: setting {key!r} is {settings.get(key)!r}, expected {value!r}")

    expected_keys = {f"{name}/{k}" for name in layer_meta for k in KINDS[kind]}
    for found, what in ((set(tensors), "the file"), (set(tensor_meta), "the tensor metadata")):
        if found != expected_keys:
            raise FactorFileError(
                f"{path}: {what} lacks tensors {sorted(expected_keys - found)} and has unexpected "
                f"{sorted(found - expected_keys)} for the layers listed in the metadata"
            )
    for key, t in tensors.items():
        info = tensor_meta[key]
        found = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for field_name, value in found.items():
            if info.get(field_name) != value:
                raise FactorFileError(
                    f"{path}: tensor {key!r} has {field_name} {value}, metadata says {info.get(field_name)}"
                )
        digest = _sha256(t.to("cpu").contiguous())
        if digest != info.get("sha256"):
            raise FactorFileError(
                f"{path}: tensor {key!r} is corrupted: sha256 {digest}, expected {info.get('sha256')}"
            )

    for name, info in layer_meta.items():
        fields = ("in_features", "out_features", "homogeneous", "count_A", "count_G")
        if not isinstance(info, dict) or any(f not in info for f in fields):
            raise FactorFileError(f"{path}: layer {name!r} metadata lacks one of {fields}: {info!r}")
        counts = (info["count_A"], info["count_G"])
        if not all(isinstance(c, int) and c > 0 for c in counts):
            raise FactorFileError(
                f"{path}: layer {name!r} has counts (count_A, count_G) = {counts}, expected positive integers"
            )
        if info.get("weight_layout", "out_in") not in WEIGHT_LAYOUTS:
            raise FactorFileError(
                f"{path}: layer {name!r} has weight_layout {info['weight_layout']!r}, expected one of {WEIGHT_LAYOUTS}"
            )
        d_in = info["in_features"] + int(info["homogeneous"])
        for k, shape in _expected_shapes(kind, d_in, info["out_features"]).items():
            if tuple(tensors[f"{name}/{k}"].shape) != shape:
                raise FactorFileError(
                    f"{path}: layer {name!r} {k} has shape {tuple(tensors[f'{name}/{k}'].shape)}, "
                    f"its metadata implies {shape}"
                )

    if model is not None:
        check_layers_match_model(path, "file", layer_meta, settings, meta["model_fingerprint"], model)

    layers: dict[str, LayerFactors | LayerEigen] = {}
    for name, info in layer_meta.items():
        parts = [tensors[f"{name}/{k}"] for k in KINDS[kind]]
        counts = (int(info["count_A"]), int(info["count_G"]))
        layers[name] = LayerFactors(*parts, *counts) if kind == "factors" else LayerEigen(*parts, *counts)
    return StoredFactors(
        path,
        kind,
        layers,
        dict(settings),
        meta["model_fingerprint"],
        dict(meta.get("extra", {})),
        {name: dict(info) for name, info in layer_meta.items()},
    )
