"""Apply K-FAC (or SVD) weight edits to a Hugging Face causal LM or a Lightning checkpoint, layer by layer.

For billion-parameter models: the model (or checkpoint) is loaded ONCE and each selected layer's weight is
replaced in place, one layer at a time — the only extra memory is one layer's float64 working copy and its
factors (read lazily from a sharded index). The original is never written: the output folder or file must
differ from the source, and files are written through temporary names.

* :func:`edit_hf_model`: ``AutoModelForCausalLM.from_pretrained`` (a local folder or a hub id), edit, then
  ``save_pretrained(output_dir)`` (safetensors), the tokenizer when the source has one, and
  ``memcurve_edit.json`` (source, factors, method, energy or keep fraction, per-layer kept pairs).
* :func:`edit_lightning_checkpoint`: ``checkpoint["state_dict"]`` of a Lightning checkpoint (memory-mapped),
  edited layer by layer into a new checkpoint (``memcurve_edit`` records what was done, as the pruning
  callbacks do); optionally also written as a HF model folder (built from the checkpoint's
  ``hyper_parameters["model"]``: a config dict with ``model_type``, a local folder or a hub id).

Names. Factor files written by ``KFACFactors`` name layers relative to the LightningModule: for
``CausalLMModule`` the HF model is its attribute ``model``, so HF's ``model.layers.23.mlp.up_proj`` is
``model.model.layers.23.mlp.up_proj`` in the factors. ``prefix`` maps between the two (``factor name = prefix +
HF name``); ``"auto"`` tries ``"model."`` and ``""`` and takes the one under which every layer of the factor
file is a linear layer of the model. Layer patterns (globs or ``re:<regex>``) may be written either way: a layer
is selected when a pattern matches its HF name or its factor name.

Command line: ``memcurve edit`` (see :mod:`memcurve.cli`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from memcurve.curvature.edit import LayerEdit, edit_layer
from memcurve.curvature.layers import is_linear, weight_layout
from memcurve.curvature.storage import StoredFactors, load_factors
from memcurve.curvature.tracker import compile_layer_patterns
from memcurve.editing.outputs import EDIT_KEY
from memcurve.editing.pipeline import check_factors_match_state_dict
from memcurve.editing.request import CURVATURE_METHODS, EditRequest
from memcurve.utils.files import atomic_write

__all__ = ["DTYPES", "EDIT_RECORD", "PREFIXES", "edit_hf_model", "edit_lightning_checkpoint", "resolve_prefix"]

PREFIXES = ("model.", "")  # tried in this order by prefix="auto"
EDIT_RECORD = "memcurve_edit.json"
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- names ---------------------------------------------------------------------------------------------------------
def resolve_prefix(factor_layers: Sequence[str], linear_names: Sequence[str], prefix: str = "auto") -> str:
    """The prefix with ``factor name = prefix + HF name`` for every layer of the factor file.

    ``prefix="auto"`` tries :data:`PREFIXES`; a given prefix is checked the same way.
    """
    linear = set(linear_names)
    candidates = PREFIXES if prefix == "auto" else (prefix,)
    for candidate in candidates:
        if factor_layers and all(n.startswith(candidate) and n[len(candidate) :] in linear for n in factor_layers):
            return candidate
    shown = sorted(factor_layers)[:5]
    raise ValueError(
        f"prefix={prefix!r}: the factor layers {shown}{' …' if len(factor_layers) > 5 else ''} are not linear layers "
        f"of the model under {'any of ' + repr(candidates) if prefix == 'auto' else 'that prefix'} (factor name = "
        f"prefix + model name; the model's linear layers include {sorted(linear)[:5]}); pass prefix= explicitly"
    )


def _select(patterns: Sequence[str], names: Sequence[str], prefix: str) -> list[str]:
    """Model names selected by ``patterns`` (matched against the model name and against prefix + name)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    selected: list[str] = []
    for pattern, matches in zip(patterns, compile_layer_patterns(patterns)):
        hits = [n for n in names if matches(n) or matches(prefix + n)]
        if not hits:
            raise ValueError(
                f"layer pattern {pattern!r} matches no linear layer of the model (names like {sorted(names)[:3]}, "
                f"or with the factor prefix {prefix!r})"
            )
        selected.extend(n for n in hits if n not in selected)
    order = {n: i for i, n in enumerate(names)}
    return sorted(selected, key=order.__getitem__)


def _request(
    method: str, layers: Sequence[str], energy: float | None, keep_fraction: float | None
) -> tuple[EditRequest, str, dict[str, float]]:
    """The validated request, the method of the edit maths and ``{energy | keep_fraction: value}``."""
    if method == "bsn":
        raise ValueError("method='bsn' trains a mask on the module's data: use memcurve compare/prune, not edit")
    request = EditRequest(method, tuple([layers] if isinstance(layers, str) else layers), energy, keep_fraction)
    kind, value = request.strength
    return request, CURVATURE_METHODS[request.method], {kind: value}


def _load_stored(factors: str | os.PathLike | StoredFactors | None, method: str) -> StoredFactors | None:
    if method == "svd":
        if factors is not None:
            raise ValueError("method='svd' uses no curvature factors: pass factors=None")
        return None
    if factors is None:
        raise ValueError(f"method={method!r} needs factors (a KFACFactors file or index)")
    stored = factors if isinstance(factors, StoredFactors) else load_factors(factors)
    if stored.kind != "eigen":
        raise ValueError(
            f"{stored.path}: holds kind {stored.kind!r}; editing needs kind 'eigen' (KFACFactors store='eigen')"
        )
    return stored


def _factor_names(selected: Sequence[str], prefix: str, stored: StoredFactors | None) -> dict[str, str]:
    """``{model name: factor name}``; every selected layer must have factors (checked before any edit)."""
    names = {n: prefix + n for n in selected}
    if stored is not None:
        missing = [f for f in names.values() if f not in stored.layers]
        if missing:
            raise ValueError(
                f"layers {missing} have no factors in {stored.path}; layers with factors: {sorted(stored.layers)[:20]}"
            )
    return names


def _edit_one(
    name: str,
    weight: Tensor,
    bias: Tensor | None,
    stored: StoredFactors | None,
    method: str,
    criterion: dict,
    layout: str | None = None,
) -> LayerEdit:
    """Edit one layer; ``layout`` is the weight's storage layout (default: what the factor file records)."""
    eigen = stored.layers[name] if stored is not None else None
    recorded = stored.layer_info.get(name, {}).get("weight_layout", "out_in") if stored is not None else None
    if layout is not None and recorded is not None and layout != recorded:
        raise ValueError(
            f"layer {name!r}: the model stores its weight as {layout!r}, {stored.path} records {recorded!r}"
        )
    layout = layout or recorded or "out_in"
    result = edit_layer(weight, eigen, bias=bias, method=method, name=name, weight_layout=layout, **criterion)
    evict = getattr(stored.layers, "evict", None) if stored is not None else None
    if callable(evict):  # sharded factors: read lazily, forgotten once used
        evict(name)
    return result


def _record(source: str, stored: StoredFactors | None, request: EditRequest, prefix: str, edits: dict) -> dict:
    return {
        "source": source,
        "factors": str(stored.path) if stored is not None else None,
        "method": request.method,
        "energy": request.energy,
        "keep_fraction": request.keep_fraction,
        "prefix": prefix,
        "kept_pairs": sum(e.kept_pairs for e in edits.values()),
        "total_pairs": sum(e.total_pairs for e in edits.values()),
        "layers": {name: edit.summary() for name, edit in edits.items()},
    }


def _refuse_same(source: Path, output: Path, what: str) -> None:
    if source.exists() and output.exists() and source.resolve() == output.resolve():
        raise ValueError(f"{what} {output} is the source itself; the original is never overwritten: choose another")


def _from_pretrained_kwargs(dtype: str, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    import transformers

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {tuple(DTYPES)}")
    major = int(transformers.__version__.split(".")[0])
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    kwargs["dtype"] = DTYPES[dtype]
    if major < 5:
        kwargs["low_cpu_mem_usage"] = True  # transformers 5 always loads without a second copy
    return kwargs


# -- HF models -----------------------------------------------------------------------------------------------------
def edit_hf_model(
    model: str | os.PathLike,
    factors: str | os.PathLike | StoredFactors | None,
    layers: Sequence[str],
    *,
    output_dir: str | os.PathLike,
    energy: float | None = None,
    keep_fraction: float | None = None,
    method: str = "kfac",
    dtype: str = "auto",
    prefix: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_shard_size: str | int = "5GB",
    save_tokenizer: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Edit the selected linear layers of a HF causal LM in place, one at a time, and save it to ``output_dir``.

    ``model``: a local folder or hub id; ``factors``: a ``KFACFactors`` file or ``*.index.json`` (None for
    ``method="svd"``); ``layers``: patterns (see the module docstring); exactly one of ``energy`` /
    ``keep_fraction``; ``dtype``: the dtype to load (``auto``: the checkpoint's). Every selected layer is checked
    to have factors before any is edited. An ``output_dir`` that already holds a model is refused unless
    ``overwrite`` (the source never is). Tied weights (e.g. an output head tied to the embeddings) are edited
    for both. Returns the record written to ``memcurve_edit.json``.
    """
    from transformers import AutoModelForCausalLM

    request, method, criterion = _request(method, layers, energy, keep_fraction)
    source = Path(model).expanduser()
    output = Path(output_dir).expanduser()
    _refuse_same(source, output, "output_dir")
    if (output / "config.json").exists() and not overwrite:
        raise FileExistsError(f"output_dir {output} already holds a model; choose a new folder or pass overwrite=True")
    load_kwargs = _from_pretrained_kwargs(dtype, revision, trust_remote_code)  # checks dtype before any loading
    stored = _load_stored(factors, method)
    hf = AutoModelForCausalLM.from_pretrained(str(source) if source.exists() else str(model), **load_kwargs)
    linear = {n: m for n, m in hf.named_modules() if is_linear(m)}
    if stored is not None:
        prefix = resolve_prefix(list(stored.layers), list(linear), prefix)
    elif prefix == "auto":
        prefix = "model."
    selected = _select(layers, list(linear), prefix)
    names = _factor_names(selected, prefix, stored)
    edits: dict[str, LayerEdit] = {}
    with torch.no_grad():
        for name in selected:
            module = linear[name]
            layout = weight_layout(module)
            result = _edit_one(names[name], module.weight, module.bias, stored, method, criterion, layout)
            module.weight.copy_(result.weight)
            if result.bias is not None:
                module.bias.copy_(result.bias)
            edits[name] = result
            del result
    output.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(output), max_shard_size=max_shard_size)
    tokenizer_saved = False
    if save_tokenizer:
        tokenizer_saved = _copy_tokenizer(str(source) if source.exists() else str(model), output, revision)
    record = _record(str(model), stored, request, prefix, edits)
    record["tokenizer"] = tokenizer_saved
    text = json.dumps(record, indent=1)
    atomic_write(output / EDIT_RECORD, lambda tmp: tmp.write_text(text))
    return record


def _copy_tokenizer(source: str, output: Path, revision: str | None) -> bool:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except Exception:  # no tokenizer in the source (e.g. a bare model folder): nothing to copy
        return False
    tokenizer.save_pretrained(str(output))
    return True


# -- Lightning checkpoints -----------------------------------------------------------------------------------------
def edit_lightning_checkpoint(
    ckpt: str | os.PathLike,
    factors: str | os.PathLike | StoredFactors | None,
    layers: Sequence[str],
    *,
    output: str | os.PathLike,
    energy: float | None = None,
    keep_fraction: float | None = None,
    method: str = "kfac",
    hf_output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Edit ``checkpoint["state_dict"]`` layer by layer into a new checkpoint ``output`` (the input is untouched).

    The checkpoint is memory-mapped; each edited weight replaces its entry (one new tensor per layer), all other
    tensors are written from the mapped file. Factor names are the state-dict names (no prefix); every layer of the
    factor file is checked against the checkpoint's state dict (names, shapes, bias) before any edit. With
    ``hf_output_dir`` the edited weights of a ``CausalLMModule`` (``model.*`` entries) are also saved as a HF
    model folder. Returns the record stored under ``checkpoint["memcurve_edit"]``.
    """
    request, method, criterion = _request(method, layers, energy, keep_fraction)
    source, target = Path(ckpt), Path(output)
    if not source.is_file():
        raise FileNotFoundError(f"ckpt={str(source)!r} does not exist")
    _refuse_same(source, target, "output")
    if target.exists() and not overwrite:
        raise FileExistsError(f"output={str(target)!r} already exists; choose a new file or pass overwrite=True")
    stored = _load_stored(factors, method)
    checkpoint = torch.load(source, map_location="cpu", weights_only=False, mmap=True)
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{source}: not a Lightning checkpoint (no 'state_dict' mapping)")
    if stored is not None:  # factors of another model are refused before any edit (no module needed)
        check_factors_match_state_dict(stored, state_dict)
    weights = [k.removesuffix(".weight") for k, v in state_dict.items() if k.endswith(".weight") and v.dim() == 2]
    selected = _select(layers, weights, "")
    names = _factor_names(selected, "", stored)
    edits: dict[str, LayerEdit] = {}
    for name in selected:
        bias = state_dict.get(f"{name}.bias")
        result = _edit_one(names[name], state_dict[f"{name}.weight"], bias, stored, method, criterion)
        state_dict[f"{name}.weight"] = result.weight
        if result.bias is not None:
            state_dict[f"{name}.bias"] = result.bias
        edits[name] = result
        del result
    record = _record(str(source), stored, request, "", edits)
    checkpoint[EDIT_KEY] = {"source": str(source), **asdict(request), "layer_names": sorted(edits)}
    atomic_write(target, lambda tmp: torch.save(checkpoint, tmp))
    if hf_output_dir is not None:
        _save_hf_from_state_dict(checkpoint, state_dict, Path(hf_output_dir))
        text = json.dumps(record, indent=1)
        atomic_write(Path(hf_output_dir) / EDIT_RECORD, lambda tmp: tmp.write_text(text))
    return record


def _save_hf_from_state_dict(checkpoint: Mapping[str, Any], state_dict: Mapping[str, Tensor], output: Path) -> None:
    """Save the ``model.*`` entries as a HF model, built on the meta device (no second copy of the weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = (checkpoint.get("hyper_parameters") or {}).get("model")
    weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    if spec is None or not weights:
        raise ValueError(
            "hf_output_dir needs a CausalLMModule checkpoint: hyper_parameters['model'] (config dict or model id) and "
            "'model.*' state-dict entries"
        )
    if isinstance(spec, Mapping):
        settings = dict(spec)
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    else:
        config = AutoConfig.from_pretrained(str(spec))
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    missing, unexpected = hf.load_state_dict(weights, strict=False, assign=True)
    persistent = {k for k in hf.state_dict()}
    missing = [k for k in missing if k in persistent and not _is_tied(hf, k)]
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint's model does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    hf.tie_weights()
    output.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(output))


def _is_tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(tied, Mapping):
        tied = list(tied)
    return key in tied and bool(getattr(model.config, "tie_word_embeddings", False))
