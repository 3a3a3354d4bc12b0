"""The one edit pipeline: requests → edited state dicts → named, safely written checkpoints → scores → report rows.

Every way memcurve edits a checkpoint goes through :func:`edit_checkpoint`: the pruning callbacks (at checkpoint
time or at the end of fit), ``memcurve prune`` (sweeps of strengths and layer sets) and ``memcurve compare``
(methods side by side) — the closed-form edits (K-FAC, SVD) and the trained ones (BalancedSubnet's mask, the gradient
unlearning baselines) alike. The original checkpoint dict, its tensors and the live model are never modified; the
unedited model is scored once per call.

Factor files are checked against the checkpoint being edited, with or without a module
(:func:`check_factors_match_state_dict`): every layer of the file must be a weight of the checkpoint's state dict
with the file's shape, layout and bias, and, given the module, the parameter fingerprint of the checkpoint must be
the file's — so factors of another model are refused before any work, whichever path the edit takes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from memcurve.curvature.layers import clean_module_name
from memcurve.curvature.storage import FactorFileError, StoredFactors, load_factors, model_fingerprint
from memcurve.curvature.tracker import select_linear_layers
from memcurve.editing.methods import BalancedSubnetSettings, apply_edit, check_bsn_module, check_unlearning_module
from memcurve.editing.outputs import OutputGuard, edited_checkpoint_path, write_edited_checkpoint
from memcurve.editing.protocol import AutoRequest, Protocol
from memcurve.editing.report import EditRow
from memcurve.editing.request import EditRequest
from memcurve.editing.scoring import Scorer
from memcurve.editing.unlearning import UNLEARNING_METHODS, UnlearningSettings, default_rmu_layer

__all__ = ["check_factors_match_state_dict", "check_requests", "edit_checkpoint", "summary_line"]

FactorSource = str | os.PathLike | StoredFactors | None


def check_factors_match_state_dict(
    stored: StoredFactors, state_dict: Mapping[str, Any], module: nn.Module | None = None
) -> None:
    """``FactorFileError`` (naming the file, the layer, both values) unless ``stored`` was made for the model whose
    ``state_dict`` this is: each layer of the file is ``<layer>.weight`` of the state dict with the file's shape
    (in its weight layout) and a ``<layer>.bias`` exactly when the file has a bias coordinate; given ``module``,
    the fingerprint of the state dict's entries for the module's parameters (names without FSDP wrapper segments)
    is the file's (``model_fingerprint``). Needs no module, so a bare checkpoint is checked the same way."""
    source = stored.path
    for name, info in stored.layer_info.items():
        key = f"{name}.weight"
        weight = state_dict.get(key)
        if weight is None:
            raise FactorFileError(
                f"{source}: layer {name!r} has factors but the checkpoint has no {key!r}: the factors belong to "
                "another model"
            )
        d_in, d_out, layout = info["in_features"], info["out_features"], info.get("weight_layout", "out_in")
        expected = (d_out, d_in) if layout == "out_in" else (d_in, d_out)
        if tuple(weight.shape) != expected:
            raise FactorFileError(
                f"{source}: layer {name!r} weight has shape {tuple(weight.shape)} in the checkpoint, {expected} in "
                f"the factor file (in_features {d_in}, out_features {d_out}, layout {layout!r}): the factors belong "
                "to another model"
            )
        has_bias = f"{name}.bias" in state_dict
        homogeneous = stored.settings.get("bias") == "homogeneous" and has_bias
        if bool(info["homogeneous"]) != homogeneous:
            raise FactorFileError(
                f"{source}: layer {name!r} has {'a' if has_bias else 'no'} bias in the checkpoint, the factor file "
                f"{'has' if info['homogeneous'] else 'has no'} bias coordinate (bias={stored.settings.get('bias')!r}): "
                "the factors belong to another model"
            )
    if module is None:
        return
    names = [clean_module_name(name) for name, _ in module.named_parameters()]
    if not names or any(name not in state_dict for name in names):  # flattened (FSDP) parameters: names and shapes
        return
    actual = model_fingerprint({name: state_dict[name] for name in names})
    if actual != stored.model_fingerprint:
        raise FactorFileError(
            f"{source}: model fingerprint {actual[:16]}… of the checkpoint does not match the factor file's "
            f"{stored.model_fingerprint[:16]}…: the factors were computed on a model with other parameter names or "
            "shapes"
        )


def check_requests(
    requests: Sequence[EditRequest | AutoRequest],
    module: nn.Module,
    factors: FactorSource = None,
    datamodule: Any = None,
    unlearning: UnlearningSettings | None = None,
) -> None:
    """Cheap checks before any work: every request's layers exist in ``module``, K-FAC requests have factors (and,
    when loaded factors are given, they are eigendecompositions holding every selected layer), ``bsn`` and the
    unlearning methods have a module that provides their data and a datamodule, and RMU's steered module exists."""
    for request in requests:
        names = select_linear_layers(module, list(request.layers))
        if request.method in ("kfac", "kfac-separable"):
            if factors is None:
                raise ValueError(f"method={request.method!r} needs factors=<KFACFactors file or index>")
            stored = factors if isinstance(factors, StoredFactors) else None
            if stored is not None and stored.kind != "eigen":
                raise ValueError(
                    f"factors={str(stored.path)!r} holds kind {stored.kind!r}; editing needs kind 'eigen' "
                    "(KFACFactors settings.store='eigen')"
                )
            if stored is not None:
                missing = [n for n in names if n not in stored.layers]
                if missing:
                    raise ValueError(
                        f"layers={list(request.layers)!r}: {missing} have no factors in {stored.path}; layers with "
                        f"factors: {sorted(stored.layers)[:20]}"
                    )
        if request.method == "bsn":
            check_bsn_module(module)
            if datamodule is None:
                raise ValueError("method 'bsn' needs the datamodule: it trains the mask on its forget/retain data")
        if request.method in UNLEARNING_METHODS:
            check_unlearning_module(module, request.method)
            if datamodule is None:
                raise ValueError(f"method {request.method!r} needs the datamodule: it trains on its forget/retain data")
            rmu_layer = unlearning.rmu_layer if unlearning is not None else None
            if request.method == "rmu" and rmu_layer is None:
                default_rmu_layer(module, names)  # refuses layers that sit in no block
            elif request.method == "rmu" and rmu_layer not in dict(module.named_modules()):
                raise ValueError(f"rmu_layer={rmu_layer!r} is not a module of {type(module).__name__}")


def edit_checkpoint(
    checkpoint: dict[str, Any],
    source: str | os.PathLike,
    requests: Sequence[EditRequest | AutoRequest],
    *,
    module: nn.Module,
    datamodule: Any = None,
    factors: FactorSource = None,
    bsn: BalancedSubnetSettings | None = None,
    unlearning: UnlearningSettings | None = None,
    scorer: Scorer | None = None,
    protocol: Protocol | None = None,
    save: bool = True,
    output_folder: str | os.PathLike | None = None,
    guard: OutputGuard | None = None,
    log: Callable[[str], None] = print,
) -> list[EditRow]:
    """Apply every request to ``checkpoint["state_dict"]``; returns one report row per request.

    ``module``: the LightningModule the checkpoint belongs to (layer patterns are resolved against it, ``bsn`` and the
    unlearning methods train on a copy of it); ``factors``: a path or loaded factors (K-FAC requests), checked against
    the checkpoint and the module (:func:`check_factors_match_state_dict`); ``bsn`` / ``unlearning``: the settings of
    the trained methods (an unlearning request's method and steps replace those of ``unlearning``; default
    :class:`~memcurve.editing.unlearning.UnlearningSettings`); ``scorer``: scores the unedited and each edited state
    dict (None: no metrics); ``save``: write each edited copy (:func:`~memcurve.editing.outputs.edited_checkpoint_path`,
    under ``output_folder`` if given; ``guard`` says what may be replaced).

    ``protocol`` (:class:`~memcurve.editing.protocol.Protocol`): the held-out protocol. Every row is then also scored
    on the selection split (``row.selection``), ``scorer`` defaults to the protocol's test scorer, and each
    :class:`~memcurve.editing.protocol.AutoRequest` becomes the strongest edit within the budget on the selection
    split (``row.auto``). Fixed strengths are processed first, so their selection scores join the monotonicity
    check of the auto searches.
    """
    source = Path(source)
    original = checkpoint["state_dict"]
    guard = guard or OutputGuard()
    if unlearning is not None and not isinstance(unlearning, UnlearningSettings):
        raise TypeError(f"unlearning must be an UnlearningSettings, not {type(unlearning).__name__}")
    if any(isinstance(r, AutoRequest) for r in requests) and (protocol is None or protocol.budget is None):
        raise ValueError(
            "an auto strength needs the held-out protocol with a budget (e.g. budget: {max_accuracy_drop: 0.01})"
        )
    if protocol is not None and scorer is None:
        scorer = protocol.test
    requests = sorted(requests, key=lambda r: isinstance(r, AutoRequest))  # stable: fixed strengths first
    stored = None
    if any(r.method in ("kfac", "kfac-separable") for r in requests):
        if factors is None:
            raise ValueError("the K-FAC methods need factors=<KFACFactors file or index>")
        stored = factors if isinstance(factors, StoredFactors) else load_factors(factors)
        check_factors_match_state_dict(stored, original, module)
    check_requests(requests, module, stored, datamodule, unlearning)
    if save:  # every output path before any work: a refused path must not leave earlier copies behind
        for request in requests:
            if isinstance(request, EditRequest):  # an auto strength's path is known once chosen
                guard.check(edited_checkpoint_path(source, request, output_folder), source=source)
    before = scorer.before(original) if scorer is not None else {}
    edit_inputs = {"factors": stored, "module": module, "datamodule": datamodule, "bsn": bsn, "unlearning": unlearning}
    rows = []
    for request in requests:
        started = time.perf_counter()
        layer_names = select_linear_layers(module, list(request.layers))
        auto: dict[str, Any] = {}
        if isinstance(request, AutoRequest):
            request, auto = protocol.choose(request, original, layer_names, log=log, **edit_inputs)
        result = apply_edit(request, original, layer_names, **edit_inputs)
        seconds = time.perf_counter() - started
        selection: dict[str, Any] = {}
        if protocol is not None:
            kind, value = request.strength
            remembered = protocol.measured.get((request.method, request.layers, kind), {}).get(value)
            scores = remembered or protocol.score_selection(request, result.state_dict, original)
            selection = protocol.selection_record(scores, original)
        path = None
        if save:
            path = edited_checkpoint_path(source, request, output_folder)
            write_edited_checkpoint(path, checkpoint, result.state_dict, request, source, layer_names, guard)
        after = scorer(result.state_dict, original) if scorer is not None else {}
        if protocol is not None and protocol.budget is not None and scorer is protocol.test:
            metric = protocol.budget.metric
            selection["test_cost"] = protocol.budget.cost(before.get(metric, math.nan), after.get(metric, math.nan))
        edits = result.layers.values()
        kept, total = sum(e.kept_pairs for e in edits), sum(e.total_pairs for e in edits)
        change = math.sqrt(sum(e.change_norm**2 for e in edits))
        norm = math.sqrt(sum(e.weight_norm**2 for e in edits))
        row = EditRow(
            method=request.method,
            layers=list(request.layers),
            energy=request.energy,
            keep_fraction=request.keep_fraction,
            ratio=request.ratio,
            steps=request.steps,
            tag=request.tag,
            layer_names=list(layer_names),
            kept_pairs=kept,
            total_pairs=total,
            kept_fraction=kept / total if total else math.nan,
            relative_change=change / norm if norm else math.nan,
            source_checkpoint=str(source),
            edited_checkpoint=str(path) if path is not None else None,
            seconds=seconds,
            before=dict(before),
            after=after,
            selection=selection,
            auto=auto,
        )
        rows.append(row)
        if result.history:  # a trained edit: BalancedSubnet's mask (per epoch) or an unlearning run (per step)
            first, last = result.history[0], result.history[-1]
            what = "mask training" if request.method == "bsn" else f"unlearning ({len(result.history)} steps)"
            log(
                f"memcurve: {request.tag}: {what} loss forget {first['forget_loss']:.3f}->"
                f"{last['forget_loss']:.3f}, retain {first['retain_loss']:.3f}->{last['retain_loss']:.3f}"
            )
        log(summary_line(row, module))
    return rows


def summary_line(row: EditRow, module: Any = None) -> str:
    """``memcurve: kfac energy 0.6 on 4 layers: kept 12/345 directions; val/acc 0.900->0.910 … -> path``."""
    from_report = getattr(module, "report_metrics", None)
    keys = [key for key, _ in from_report] if from_report else list(row.after)
    metrics = ", ".join(
        f"{key} {row.before.get(key, math.nan):.3f}->{row.after[key]:.3f}" for key in keys if key in row.after
    )
    where = f" -> {row.edited_checkpoint}" if row.edited_checkpoint else ""
    if row.steps is not None:  # an unlearning run changes every weight of its layers, removes none
        kept = f"relative weight change {row.relative_change:.3f}"
    else:
        kept = f"kept {row.kept_pairs}/{row.total_pairs} directions"
    return (
        f"memcurve: {row.method} {row.setting} on {len(row.layer_names)} layers: {kept}"
        + (f"; {metrics}" if metrics else "")
        + where
    )
