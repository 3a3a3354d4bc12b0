"""memcurve.editing, the one edit pipeline: validated requests with lossless names, apply_edit against the pure edit
maths, edited copies outside Lightning's last-checkpoint lookup, edit_checkpoint end to end (K-FAC, SVD and
BalancedSubnet) on a tiny plain LightningModule, and the report writers. CPU, offline, tiny real models."""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from memcurve.adapters import ClassificationAdapter
from memcurve.curvature import (
    FactorFileError,
    collect_factors,
    edit_state_dict,
    eigendecompose,
    load_factors,
    save_factors,
)
from memcurve.editing import (
    EDIT_KEY,
    EDITED_FOLDER,
    BalancedSubnetSettings,
    EditRequest,
    EditRow,
    OutputGuard,
    Scorer,
    apply_edit,
    check_requests,
    edit_checkpoint,
    edited_checkpoint_path,
    log_rows,
    markdown_table,
    plot_rows,
    read_report,
    report_columns,
    report_markdown,
    requests_for,
    write_report,
)
from memcurve.editing.outputs import write_edited_checkpoint
from memcurve.editing.request import layers_id

D_IN, D_HID, D_OUT = 6, 10, 4
EDITED = ["fc1", "fc2"]  # the edited layers; "head" is never touched
CURVATURE_METHOD = {"kfac": "kronecker", "kfac-separable": "separable", "svd": "svd"}  # reference, written out


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# -- a tiny plain LightningModule and its data ----------------------------------------------------------------------
@dataclass
class TinyData:
    """What the module's evaluation and BalancedSubnet read; counts the evaluations (the Scorer deep-copies the
    module but not the datamodule, so the count lives here)."""

    x: torch.Tensor
    y: torch.Tensor
    forget: torch.Tensor  # indices of the "memorized" examples
    evaluations: int = 0
    bsn_calls: list[dict[str, Any]] = field(default_factory=list)


def tiny_data() -> TinyData:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(48, D_IN, generator=generator)
    y = torch.randint(0, D_OUT, (48,), generator=generator)
    return TinyData(x, y, forget=torch.arange(8))


def batches(data: TinyData, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    index = torch.arange(len(data.y))
    return [
        {"image": data.x[i : i + batch_size], "label": data.y[i : i + batch_size], "index": index[i : i + batch_size]}
        for i in range(0, len(data.y), batch_size)
    ]


class TinyMLP(pl.LightningModule):
    """A plain LightningModule: three linear layers and an ``evaluation_metrics`` of its own."""

    def __init__(self, hidden: int = D_HID) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    @torch.no_grad()
    def evaluation_metrics(self, datamodule: TinyData, shard: bool = False) -> dict[str, float]:
        datamodule.evaluations += 1
        logits = self(datamodule.x)
        return {
            "val/acc": float((logits.argmax(-1) == datamodule.y).float().mean()),
            "val/loss": float(F.cross_entropy(logits, datamodule.y)),
        }


class BsnMLP(TinyMLP):
    """TinyMLP plus the BalancedSubnet contract: which examples are memorized, and the loss of a batch."""

    def balanced_subnet_data(
        self,
        datamodule: TinyData,
        batch_size: int,
        max_forget: int | None = None,
        max_retain: int | None = None,
        seed: int = 0,
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
        datamodule.bsn_calls.append(
            {"batch_size": batch_size, "max_forget": max_forget, "max_retain": max_retain, "seed": seed}
        )
        keep = torch.ones(len(datamodule.y), dtype=torch.bool)
        keep[datamodule.forget] = False
        loaders = []
        for indices in (datamodule.forget, keep.nonzero().flatten()):
            x, y = datamodule.x[indices], datamodule.y[indices]
            loaders.append([(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)])
        return loaders[0], loaders[1]

    def balanced_subnet_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])


def tiny_module(cls: type[TinyMLP] = TinyMLP, hidden: int = D_HID) -> TinyMLP:
    torch.manual_seed(0)
    return cls(hidden)


def collect(module: nn.Module, layers: list[str], data: TinyData) -> dict:
    """K-FAC factors of ``layers``: the settings object when collect_factors takes one, else keyword options."""
    adapter = ClassificationAdapter()
    parameters = inspect.signature(collect_factors).parameters
    if "settings" in parameters:
        from memcurve.curvature.settings import FactorSettings

        settings = FactorSettings(fisher="empirical", dtype="float64")
        return collect_factors(module, batches(data), layers, settings, adapter=adapter, reduce_across_ranks=False)
    return collect_factors(  # pragma: no cover - the signature before FactorSettings
        module, batches(data), layers, fisher="empirical", dtype="float64", adapter=adapter, reduce_across_ranks=False
    )


FILE_SETTINGS = {
    "mode": "expand",
    "position": "all",
    "bias": "exclude",
    "dtype": "float64",
    "drop_last_position": False,
    "fisher": "empirical",
    "mc_samples": 1,
}


def factor_file(path: Path, module: nn.Module, layers: list[str], data: TinyData, store: str = "eigen") -> Path:
    factors = collect(module, layers, data)
    layers_out = eigendecompose(factors) if store == "eigen" else factors
    return save_factors(path, layers_out, model=module, settings=FILE_SETTINGS)


def snapshot(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in tensors.items() if isinstance(value, torch.Tensor)}


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_last(tmp_path: Path, module: nn.Module) -> Path:
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "epoch": 0}, last)
    return last


def found_last_checkpoints(folder: Path) -> set[str]:
    """What Lightning's ``ckpt_path="last"`` lookup finds in ``folder`` (a real ModelCheckpoint and Trainer)."""
    callback = ModelCheckpoint(dirpath=folder, save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return {os.path.normpath(str(path)) for path in callback._find_last_checkpoints(trainer)}


# -- EditRequest ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "prune", "layers": ["fc1"], "energy": 0.5}, ValueError, r"method='prune'.*kfac"),
        ({"method": "bsn", "layers": ["fc1"], "energy": 0.5}, ValueError, r"method='bsn' takes ratio.*energy=0\.5"),
        ({"method": "bsn", "layers": ["fc1"]}, ValueError, r"method='bsn' takes ratio.*ratio=None"),
        ({"method": "kfac", "layers": ["fc1"], "ratio": 0.1}, ValueError, r"ratio=0\.1 .*kfac takes energy"),
        ({"method": "svd", "layers": ["fc1"], "energy": 0.5, "keep_fraction": 0.5}, ValueError, r"exactly one"),
        ({"method": "svd", "layers": ["fc1"]}, ValueError, r"exactly one of energy or keep_fraction"),
        ({"method": "kfac", "layers": ["fc1"], "energy": math.nan}, ValueError, r"energy=nan"),
        ({"method": "kfac", "layers": ["fc1"], "energy": 0}, ValueError, r"energy=0 "),
        ({"method": "kfac", "layers": ["fc1"], "energy": 1.5}, ValueError, r"energy=1\.5"),
        ({"method": "svd", "layers": ["fc1"], "keep_fraction": 0.0}, ValueError, r"keep_fraction=0\.0"),
        ({"method": "svd", "layers": ["fc1"], "keep_fraction": -0.1}, ValueError, r"keep_fraction=-0\.1"),
        ({"method": "kfac", "layers": ["fc1"], "energy": True}, TypeError, r"energy=True"),
        ({"method": "svd", "layers": ["fc1"], "keep_fraction": "0.5"}, TypeError, r"keep_fraction='0\.5'"),
        ({"method": "bsn", "layers": ["fc1"], "ratio": True}, ValueError, r"ratio=True"),
        ({"method": "bsn", "layers": ["fc1"], "ratio": math.nan}, ValueError, r"ratio=nan"),
        ({"method": "bsn", "layers": ["fc1"], "ratio": 0}, ValueError, r"ratio=0 "),
        ({"method": "bsn", "layers": ["fc1"], "ratio": 1.0}, ValueError, r"ratio=1\.0"),
        ({"method": "bsn", "layers": ["fc1"], "ratio": 1.5}, ValueError, r"ratio=1\.5"),
        ({"method": "svd", "layers": [], "energy": 0.5}, ValueError, r"layers=\[\]"),
        ({"method": "svd", "energy": 0.5}, ValueError, r"layers=\[\]"),
        ({"method": "svd", "layers": ["fc1", " "], "energy": 0.5}, ValueError, r"layers=\['fc1', ' '\]"),
        ({"method": "svd", "layers": "re:(", "energy": 0.5}, ValueError, r"'re:\(' is not a valid regular"),
    ],
)
def test_edit_request_rejects_misconfiguration(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EditRequest(**kwargs)


def test_edit_request_normalises_layers_and_strength() -> None:
    request = EditRequest("svd", "fc1", energy=1)
    assert request.layers == ("fc1",) and request.energy == 1.0 and isinstance(request.energy, float)
    assert (
        request == EditRequest("svd", ["fc1"], energy=1.0)
        and request.tag == EditRequest("svd", ("fc1",), energy=1.0).tag
    )
    assert request.strength == ("energy", 1.0) and request.setting == "energy 1.0"
    bsn = EditRequest("bsn", ["fc1", "re:fc[0-9]"], ratio=0.0015)
    assert bsn.strength == ("ratio", 0.0015) and bsn.tag.startswith("bsn-r0.0015-L") and bsn.step == 1500
    assert hash(bsn) == hash(EditRequest("bsn", ("fc1", "re:fc[0-9]"), ratio=0.0015))


def test_tags_are_lossless_and_unique() -> None:
    close = [EditRequest("kfac", EDITED, keep_fraction=k) for k in (0.0015, 0.002, 0.00150000001)]
    assert [r.tag.split("-L")[0] for r in close] == ["kfac-k0.0015", "kfac-k0.002", "kfac-k0.00150000001"]
    assert len({r.tag for r in close}) == 3
    # step: parts per million, exact up to six decimals (0.00150000001 shares 0.0015's step; its row has the value)
    assert [r.step for r in close] == [1500, 2000, 1500]
    energies = [EditRequest("kfac", EDITED, energy=e) for e in (0.003, 0.004, 0.005)]
    assert len({r.tag for r in energies}) == 3 and [r.step for r in energies] == [3000, 4000, 5000]
    # the strength kind and the method are part of the tag
    kinds = {EditRequest("kfac", EDITED, **{k: 0.5}).tag for k in ("energy", "keep_fraction")}
    assert len(kinds | {EditRequest("kfac-separable", EDITED, energy=0.5).tag}) == 3
    # the same strength on two layer sets
    one, two = EditRequest("svd", ["fc1"], energy=0.5), EditRequest("svd", ["fc1", "fc2"], energy=0.5)
    assert one.tag != two.tag and one.layers_id != two.layers_id and one.step == two.step
    assert all(re.fullmatch(r"[a-z-]+-[ekr][0-9.e-]+-L[0-9a-f]{8}", r.tag) for r in [*close, *energies, one, two])


def test_requests_for() -> None:
    requests = requests_for("kfac", EDITED, energy=[0.5, 0.9], keep_fraction=0.1)
    assert [r.strength for r in requests] == [("energy", 0.5), ("energy", 0.9), ("keep_fraction", 0.1)]
    assert all(r.method == "kfac" and r.layers == tuple(EDITED) for r in requests)
    assert [r.ratio for r in requests_for("bsn", "fc1", ratio=(0.01, 0.02))] == [0.01, 0.02]
    assert [r.keep_fraction for r in requests_for("svd", "fc1", keep_fraction=np.float32(0.5))] == [0.5]  # a scalar
    assert [r.energy for r in requests_for("svd", "fc1", energy=np.array([0.25, 0.5]))] == [0.25, 0.5]
    with pytest.raises(ValueError, match=r"requested twice: \['kfac-e0\.5-L"):
        requests_for("kfac", EDITED, energy=[0.5, 0.9, 0.5])
    with pytest.raises(ValueError, match=r"requested twice"):
        requests_for("svd", EDITED, energy=[1, 1.0])
    with pytest.raises(ValueError, match=r"method='kfac' needs at least one energy or keep_fraction value"):
        requests_for("kfac", EDITED, energy=[])
    with pytest.raises(ValueError, match=r"method='bsn' needs at least one ratio value"):
        requests_for("bsn", EDITED)
    with pytest.raises(ValueError, match=r"layers=\[\]"):
        requests_for("svd", [], energy=0.5)


# -- apply_edit -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [{"energy": 0.8}, {"keep_fraction": 0.2}])
@pytest.mark.parametrize("method", ["kfac", "kfac-separable", "svd"])
def test_apply_edit_is_edit_state_dict(tmp_path: Path, method: str, strength: dict) -> None:
    module, data = tiny_module(), tiny_data()
    stored = load_factors(factor_file(tmp_path / "f.safetensors", module, EDITED, data), module)
    state_dict = module.state_dict()
    before = snapshot(state_dict)
    factors_before = {name: snapshot(vars(eigen)) for name, eigen in stored.layers.items()}

    result = apply_edit(EditRequest(method, EDITED, **strength), state_dict, EDITED, factors=stored)
    expected, layers = edit_state_dict(
        state_dict, stored if method != "svd" else None, EDITED, method=CURVATURE_METHOD[method], **strength
    )
    assert_bit_identical(result.state_dict, expected)
    assert result.layers.keys() == layers.keys() == set(EDITED) and result.history == []
    for name in EDITED:
        assert result.layers[name].method == CURVATURE_METHOD[method]
        assert result.layers[name].summary() == layers[name].summary()
        assert not torch.equal(result.state_dict[f"{name}.weight"], before[f"{name}.weight"])  # a real edit
    assert result.state_dict is not state_dict and result.state_dict["head.weight"] is state_dict["head.weight"]
    assert_bit_identical(state_dict, before)  # inputs untouched
    assert_bit_identical(module.state_dict(), before)
    for name, eigen in stored.layers.items():
        assert_bit_identical(snapshot(vars(eigen)), factors_before[name])


def test_apply_edit_misconfiguration(tmp_path: Path) -> None:
    module, data = tiny_module(), tiny_data()
    state_dict = module.state_dict()
    for method in ("kfac", "kfac-separable"):
        with pytest.raises(ValueError, match=rf"method='{method}' needs K-FAC factors"):
            apply_edit(EditRequest(method, EDITED, energy=0.5), state_dict, EDITED)
    raw = load_factors(factor_file(tmp_path / "raw.safetensors", module, EDITED, data, store="factors"), module)
    with pytest.raises(ValueError, match=r"raw\.safetensors: holds kind 'factors'; editing needs kind 'eigen'"):
        apply_edit(EditRequest("kfac", EDITED, energy=0.5), state_dict, EDITED, factors=raw)
    with pytest.raises(TypeError, match=r"TinyMLP\.balanced_subnet_data and \.balanced_subnet_loss"):
        apply_edit(EditRequest("bsn", EDITED, ratio=0.1), state_dict, EDITED, module=module, datamodule=data)
    with pytest.raises(ValueError, match=r"method 'bsn' needs the datamodule"):
        apply_edit(EditRequest("bsn", EDITED, ratio=0.1), state_dict, EDITED, module=tiny_module(BsnMLP))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"retain_weight": 1.5}, r"retain_weight=1\.5"),
        ({"retain_weight": True}, r"retain_weight=True"),
        ({"epochs": 0}, r"epochs=0"),
        ({"batch_size": 2.0}, r"batch_size=2\.0"),
        ({"max_forget": 0}, r"max_forget=0"),
        ({"lr": 0.0}, r"lr=0\.0"),
        ({"momentum": math.nan}, r"momentum=nan"),
        ({"score_init": "random"}, r"score_init='random'"),
    ],
)
def test_balanced_subnet_settings_rejects_misconfiguration(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BalancedSubnetSettings(**kwargs)


# -- outputs --------------------------------------------------------------------------------------------------------
def test_edited_copies_are_outside_lightnings_last_checkpoint_lookup(tmp_path: Path) -> None:
    module = tiny_module()
    last = write_last(tmp_path, module)
    folder = last.parent
    checkpoint = torch.load(last)
    requests = [
        EditRequest("kfac", EDITED, energy=0.6),
        EditRequest("svd", EDITED, keep_fraction=0.5),
        EditRequest("bsn", ["fc1"], ratio=0.0015),
    ]
    guard = OutputGuard()
    for request in requests:
        path = edited_checkpoint_path(last, request)
        assert path == folder / EDITED_FOLDER / f"last-{request.tag}.ckpt"
        write_edited_checkpoint(path, checkpoint, module.state_dict(), request, last, EDITED, guard)
        assert path.is_file()
    assert found_last_checkpoints(folder) == {os.path.normpath(str(last))}
    assert (
        edited_checkpoint_path(last, requests[0], tmp_path / "out") == tmp_path / "out" / f"last-{requests[0].tag}.ckpt"
    )
    assert edited_checkpoint_path(tmp_path / "model", requests[0]).name == f"model-{requests[0].tag}.ckpt"


def test_edited_copies_never_go_to_the_source_folder(tmp_path: Path) -> None:
    """A folder given explicitly must not be the one Lightning searches: there ``last-<tag>.ckpt`` would be found by
    ``ckpt_path="last"`` (and, being the newest file, resumed from)."""
    last = write_last(tmp_path, tiny_module())
    request = EditRequest("svd", EDITED, energy=0.5)
    for folder in (last.parent, tmp_path / "edited" / ".." / "checkpoints"):
        with pytest.raises(ValueError, match=r"folder=.*is the folder of the source checkpoint"):
            edited_checkpoint_path(last, request, folder)
    assert found_last_checkpoints(last.parent) == {os.path.normpath(str(last))}


def test_output_guard(tmp_path: Path) -> None:
    request = EditRequest("svd", EDITED, energy=0.5)
    foreign = tmp_path / "edited" / "foreign.ckpt"
    foreign.parent.mkdir()
    foreign.write_bytes(b"not ours")
    guard = OutputGuard()
    with pytest.raises(FileExistsError, match=re.escape(repr(str(foreign))) + r" already exists and was not written"):
        guard.check(foreign)
    with pytest.raises(FileExistsError, match=re.escape(str(foreign))):
        write_edited_checkpoint(foreign, {"epoch": 0}, {}, request, tmp_path / "last.ckpt", EDITED, guard)
    assert foreign.read_bytes() == b"not ours"

    own = tmp_path / "edited" / "own.ckpt"
    write_edited_checkpoint(own, {"epoch": 0}, {"w": torch.zeros(2)}, request, tmp_path / "last.ckpt", EDITED, guard)
    write_edited_checkpoint(own, {"epoch": 1}, {"w": torch.ones(2)}, request, tmp_path / "last.ckpt", EDITED, guard)
    assert torch.load(own)["epoch"] == 1 and torch.equal(torch.load(own)["state_dict"]["w"], torch.ones(2))
    assert guard.check(tmp_path / "edited" / ".." / "edited" / "own.ckpt")  # the same file by another spelling
    with pytest.raises(FileExistsError, match=re.escape(str(own))):
        OutputGuard().check(own)  # another run's guard did not create it

    overwrite = OutputGuard(overwrite=True)
    assert overwrite.check(foreign) == foreign
    write_edited_checkpoint(foreign, {"epoch": 2}, {}, request, tmp_path / "last.ckpt", EDITED, overwrite)
    assert torch.load(foreign)["epoch"] == 2


# -- edit_checkpoint end to end -------------------------------------------------------------------------------------
def test_edit_checkpoint_end_to_end(tmp_path: Path) -> None:
    module, data = tiny_module(), tiny_data()
    factors = factor_file(tmp_path / "factors.safetensors", module, EDITED, data)
    last = write_last(tmp_path, module)
    digest = sha256(last)
    live = snapshot(dict(module.named_parameters()))
    checkpoint = torch.load(last)
    original = snapshot(checkpoint["state_dict"])
    requests = [
        request
        for method in ("kfac", "kfac-separable", "svd")
        for request in requests_for(method, EDITED, energy=0.9, keep_fraction=0.05)
    ]
    lines: list[str] = []

    rows = edit_checkpoint(
        checkpoint,
        last,
        requests,
        module=module,
        datamodule=data,
        factors=factors,
        scorer=Scorer(module, data),
        log=lines.append,
    )

    assert [(row.method, row.tag) for row in rows] == [(r.method, r.tag) for r in requests]
    assert [(row.energy, row.keep_fraction, row.ratio) for row in rows] == [
        (r.energy, r.keep_fraction, r.ratio) for r in requests
    ]
    assert data.evaluations == 1 + len(requests)  # the unedited model once, then once per edit
    assert all(row.before == rows[0].before for row in rows) and set(rows[0].before) == {"val/acc", "val/loss"}
    stored = load_factors(factors, module)
    for request, row in zip(requests, rows):
        assert row.layer_names == EDITED and row.layers == EDITED and row.source_checkpoint == str(last)
        assert 0 < row.kept_fraction <= 1 and row.kept_pairs <= row.total_pairs and 0 < row.relative_change <= 1
        assert row.total_pairs == (D_HID * D_IN + D_HID * D_HID if request.method != "svd" else D_IN + D_HID)
        path = Path(row.edited_checkpoint)
        assert path == last.parent / EDITED_FOLDER / f"last-{request.tag}.ckpt" and path.is_file()
        payload = torch.load(path)  # weights_only: the edit record is plain data
        assert payload["epoch"] == 0
        record = payload[EDIT_KEY]
        assert record["source"] == str(last) and record["layer_names"] == EDITED
        assert EditRequest(**{f.name: record[f.name] for f in fields(EditRequest)}) == request
        edited = payload["state_dict"]
        changed = {key for key, value in edited.items() if not torch.equal(value, original[key])}
        assert changed == {"fc1.weight", "fc2.weight"}, (request.tag, changed)
        kind, value = request.strength
        expected, _ = edit_state_dict(
            original,
            stored if request.method != "svd" else None,
            EDITED,
            method=CURVATURE_METHOD[request.method],
            **{kind: value},
        )
        assert_bit_identical(edited, expected)
    strong = rows[[r.tag for r in requests].index(EditRequest("svd", EDITED, keep_fraction=0.05).tag)]
    assert strong.kept_pairs == 2 and strong.kept_fraction == 2 / (D_IN + D_HID)  # ⌈0.05 · r⌉ = 1 per layer
    assert strong.after["val/loss"] != strong.before["val/loss"]
    assert len(lines) == len(requests) and all(line.startswith("memcurve: ") for line in lines)
    assert "val/loss" in lines[0] and str(rows[0].edited_checkpoint) in lines[0]

    assert sha256(last) == digest  # the original file, the checkpoint dict and the live module are untouched
    assert EDIT_KEY not in checkpoint and set(checkpoint) == {"state_dict", "epoch"}
    assert_bit_identical(checkpoint["state_dict"], original)
    assert_bit_identical(dict(module.named_parameters()), live)
    assert found_last_checkpoints(last.parent) == {os.path.normpath(str(last))}


def test_edit_checkpoint_without_scorer_or_saving(tmp_path: Path) -> None:
    module = tiny_module()
    last = tmp_path / "last.ckpt"  # never written: nothing is saved
    rows = edit_checkpoint(
        {"state_dict": module.state_dict()},
        last,
        [EditRequest("svd", "fc*", energy=0.5)],
        module=module,
        save=False,
        log=lambda line: None,
    )
    assert rows[0].before == rows[0].after == {} and rows[0].edited_checkpoint is None
    assert rows[0].layer_names == EDITED and not tmp_path.joinpath(EDITED_FOLDER).exists()


def _other_factors(tmp_path: Path, data: TinyData) -> Path:
    other = tiny_module(hidden=7)
    return factor_file(tmp_path / "other.safetensors", other, EDITED, data)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("no layer", ValueError, r"layer pattern 'nope\*' matches no nn\.Linear module"),
        ("no factors for the layer", ValueError, r"\['head'\] have no factors in .*factors\.safetensors"),
        ("no factors at all", ValueError, r"K-FAC methods need factors="),
        (
            "factors of another model",
            FactorFileError,
            r"other\.safetensors: layer 'fc1' weight has shape \(10, 6\) in the "
            r"checkpoint, \(7, 6\) in the factor file",
        ),
        ("bsn without its methods", TypeError, r"TinyMLP\.balanced_subnet_data and \.balanced_subnet_loss"),
    ],
)
def test_edit_checkpoint_checks_before_any_work(tmp_path: Path, case: str, error: type, match: str) -> None:
    module, data = tiny_module(), tiny_data()
    factors: Path | None = factor_file(tmp_path / "factors.safetensors", module, EDITED, data)
    good = EditRequest("svd", EDITED, energy=0.5)  # listed first: nothing of it may be done
    bad = {
        "no layer": EditRequest("svd", ["fc1", "nope*"], energy=0.5),
        "no factors for the layer": EditRequest("kfac", ["fc1", "head"], energy=0.5),
        "no factors at all": EditRequest("kfac-separable", EDITED, energy=0.5),
        "factors of another model": EditRequest("kfac", EDITED, energy=0.5),
        "bsn without its methods": EditRequest("bsn", EDITED, ratio=0.1),
    }[case]
    if case == "no factors at all":
        factors = None
    if case == "factors of another model":
        factors = _other_factors(tmp_path, data)
    last = write_last(tmp_path, module)
    with pytest.raises(error, match=match):
        edit_checkpoint(
            torch.load(last),
            last,
            [good, bad],
            module=module,
            datamodule=data,
            factors=factors,
            scorer=Scorer(module, data),
            log=lambda line: None,
        )
    assert data.evaluations == 0 and not (last.parent / EDITED_FOLDER).exists()


def test_edit_checkpoint_checks_outputs_before_any_work(tmp_path: Path) -> None:
    module, data = tiny_module(), tiny_data()
    last = write_last(tmp_path, module)
    requests = requests_for("svd", EDITED, energy=[0.5, 0.9])
    foreign = edited_checkpoint_path(last, requests[1])
    foreign.parent.mkdir()
    foreign.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match=re.escape(str(foreign))):
        edit_checkpoint(
            torch.load(last),
            last,
            requests,
            module=module,
            datamodule=data,
            scorer=Scorer(module, data),
            log=lambda line: None,
        )
    assert data.evaluations == 0 and sorted(foreign.parent.iterdir()) == [foreign]
    assert foreign.read_bytes() == b"not ours"


def test_check_requests(tmp_path: Path) -> None:
    module, data = tiny_module(), tiny_data()
    stored = load_factors(factor_file(tmp_path / "factors.safetensors", module, ["fc1"], data), module)
    check_requests([EditRequest("kfac", "fc1", energy=0.5), EditRequest("svd", "*", energy=0.5)], module, stored)
    with pytest.raises(ValueError, match=r"\['fc2'\] have no factors"):
        check_requests([EditRequest("kfac", "fc?", energy=0.5)], module, stored)
    with pytest.raises(ValueError, match=r"method='kfac' needs factors="):
        check_requests([EditRequest("kfac", "fc1", energy=0.5)], module)
    with pytest.raises(ValueError, match=r"'re:fc\[3-9\]' matches no nn\.Linear"):
        check_requests([EditRequest("svd", "re:fc[3-9]", energy=0.5)], module)
    check_requests([EditRequest("bsn", "fc1", ratio=0.1)], tiny_module(BsnMLP), datamodule=tiny_data())
    with pytest.raises(ValueError, match="needs the datamodule"):
        check_requests([EditRequest("bsn", "fc1", ratio=0.1)], tiny_module(BsnMLP))


# -- BalancedSubnet through edit_checkpoint -------------------------------------------------------------------------
def test_bsn_through_edit_checkpoint(tmp_path: Path) -> None:
    module, data = tiny_module(BsnMLP), tiny_data()
    last = write_last(tmp_path, module)
    digest = sha256(last)
    live = snapshot(dict(module.named_parameters()))
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    checkpoint = torch.load(last)
    original = snapshot(checkpoint["state_dict"])
    ratio = 0.15  # fc1: 0.15 · 60 = 9 weights, fc2: 0.15 · 100 = 15 weights
    requests = [EditRequest("bsn", EDITED, ratio=ratio), EditRequest("bsn", ["fc1"], ratio=0.05)]
    settings = BalancedSubnetSettings(epochs=2, batch_size=8, max_forget=6, seed=3)
    lines: list[str] = []
    with torch.inference_mode():  # as when a checkpoint is written from a validation hook
        rows = edit_checkpoint(
            checkpoint,
            last,
            requests,
            module=module,
            datamodule=data,
            bsn=settings,
            scorer=Scorer(module, data),
            log=lines.append,
        )

    assert data.bsn_calls == [{"batch_size": 8, "max_forget": 6, "max_retain": None, "seed": 3}] * 2
    assert data.evaluations == 3
    for request, row in zip(requests, rows):
        edited = torch.load(row.edited_checkpoint)["state_dict"]
        names = list(row.layer_names)
        assert names == (EDITED if len(request.layers) == 2 else ["fc1"])
        pruned_total = 0
        for name in names:
            weight, new = original[f"{name}.weight"], edited[f"{name}.weight"]
            assert bool((weight != 0).all())
            zeroed = new == 0
            assert int(zeroed.sum()) == math.floor(request.ratio * weight.numel() + 0.5), name
            assert torch.equal(new[~zeroed], weight[~zeroed])
            pruned_total += int(zeroed.sum())
        changed = {key for key, value in edited.items() if not torch.equal(value, original[key])}
        assert changed == {f"{name}.weight" for name in names}
        assert row.method == "bsn" and row.ratio == request.ratio and row.tag == request.tag
        assert row.total_pairs == sum(original[f"{n}.weight"].numel() for n in names)
        assert row.kept_pairs == row.total_pairs - pruned_total
        assert row.kept_fraction == pytest.approx(1 - pruned_total / row.total_pairs)
    assert sum("mask training loss" in line for line in lines) == 2
    assert sha256(last) == digest
    assert_bit_identical(checkpoint["state_dict"], original)
    assert_bit_identical(dict(module.named_parameters()), live)
    assert {name: p.requires_grad for name, p in module.named_parameters()} == flags
    assert module.training


# -- report ---------------------------------------------------------------------------------------------------------
def make_row(method: str = "kfac", before: dict | None = None, **changes: Any) -> EditRow:
    strength = {"energy": None, "keep_fraction": None, "ratio": None}
    strength.update({k: changes.pop(k) for k in list(changes) if k in strength})
    if all(v is None for v in strength.values()):
        strength["energy"] = 0.5
    kind = next(k for k, v in strength.items() if v is not None)
    request = EditRequest(method, changes.pop("layers", EDITED), **{kind: strength[kind]})
    values = {
        "method": method,
        "layers": list(request.layers),
        **strength,
        "tag": request.tag,
        "layer_names": list(EDITED),
        "kept_pairs": 10,
        "total_pairs": 160,
        "kept_fraction": 10 / 160,
        "relative_change": 0.25,
        "source_checkpoint": "ckpt/last.ckpt",
        "edited_checkpoint": f"ckpt/edited/last-{request.tag}.ckpt",
        "seconds": 0.5,
        "before": {"val/acc": 0.9, "val/loss": 0.3} if before is None else before,
        "after": {"val/acc": 0.8, "val/loss": 0.4},
    }
    values.update(changes)
    return EditRow(**values)


def test_write_report_appends_and_round_trips(tmp_path: Path) -> None:
    first = [make_row(energy=0.6), make_row("svd", keep_fraction=0.0015, after={"val/acc": 0.5, "val/loss": 1.0})]
    second = [make_row("bsn", ratio=0.00150000001, edited_checkpoint=None)]
    assert read_report(tmp_path) == []
    path = write_report(tmp_path, first)
    assert path == tmp_path / "pruning_report.json"
    write_report(tmp_path, second)
    assert read_report(tmp_path) == first + second
    assert read_report(tmp_path)[2].ratio == 0.00150000001 and read_report(tmp_path)[1].keep_fraction == 0.0015
    assert len(json.loads(path.read_text())) == 3

    with (tmp_path / "pruning_report.csv").open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 3
    assert {"before val/acc", "after val/acc", "before val/loss", "after val/loss"} <= set(table[0])
    assert float(table[1]["after val/acc"]) == 0.5 and float(table[1]["before val/acc"]) == 0.9
    assert table[0]["layers"] == "fc1 fc2" and table[2]["method"] == "bsn"

    write_report(tmp_path, second, name="other")
    write_report(tmp_path, second, name="other")
    assert read_report(tmp_path, name="other") == second * 2
    write_report(tmp_path, second, name="other", append=False)
    assert read_report(tmp_path, name="other") == second
    assert read_report(tmp_path) == first + second  # other names are other files


class ReportingModule:
    report_metrics: ClassVar[tuple[tuple[str, str], ...]] = (("val/loss", "loss"), ("missing/metric", "missing"))

    @staticmethod
    def report_tables(rows):
        return [("Accuracy only", [("val/acc", "accuracy")])]


def test_markdown_tables_and_columns() -> None:
    rows = [make_row(energy=0.6), make_row("svd", keep_fraction=0.1), make_row("bsn", ratio=0.01)]
    columns = report_columns(rows)
    assert columns == [("val/acc", "val/acc")]  # the default columns the rows carry
    assert report_columns(rows, ReportingModule()) == [("val/loss", "loss")]
    only_loss = [make_row(before={"val/loss": 0.3}, after={"val/loss": 0.4})]
    assert report_columns(only_loss) == [("val/loss", "val/loss")]  # none of the defaults: every metric
    assert report_columns([], ReportingModule()) == list(ReportingModule.report_metrics)

    table = markdown_table(rows, [("val/acc", "acc"), ("val/loss", "loss")]).splitlines()
    assert len(table) == 2 + 1 + len(rows)
    assert table[0] == "| layers | method | setting | kept | rel. change | acc | loss |"
    assert table[2].startswith("| – | unedited |") and table[2].endswith("| 0.900 | 0.300 |")
    assert table[3] == "| fc1 fc2 | kfac | energy 0.6 | 6.2500% | 0.250 | 0.800 | 0.400 |"
    assert "keep fraction 0.1" in table[4] and "ratio 0.01" in table[5]
    unscored = [make_row(before={}, after={})]
    assert len(markdown_table(unscored, []).splitlines()) == 3  # no unedited line without scores

    markdown = report_markdown(rows, ReportingModule())
    assert "| layers | method | setting | kept | rel. change | loss |" in markdown
    assert "\nAccuracy only:\n| layers | method | setting | kept | rel. change | accuracy |" in markdown
    assert markdown.count("unedited") == 2
    assert report_markdown(rows) == markdown_table(rows, columns)


def test_plot_rows_one_axis_per_column() -> None:
    rows = [make_row(energy=e) for e in (0.3, 0.6)] + [make_row("svd", keep_fraction=k) for k in (0.1, 0.2)]
    rows.append(make_row("kfac", energy=0.6, layers=["fc1"]))
    figure = plot_rows(rows, ReportingModule())
    assert len(figure.axes) == len(report_columns(rows, ReportingModule())) == 1
    assert len(figure.axes[0].get_lines()) == 3 + 1  # kfac on two layer sets, svd, and the unedited line
    figure = plot_rows(rows, type("Two", (), {"report_metrics": (("val/acc", "acc"), ("val/loss", "loss"))})())
    assert [axis.get_title() for axis in figure.axes] == ["acc (val/acc)", "loss (val/loss)"]


def test_log_rows_distinct_steps(tmp_path: Path) -> None:
    rows = [
        make_row(energy=e, after={"val/acc": a, "val/loss": 1.0 - a})
        for e, a in ((0.003, 0.1), (0.004, 0.2), (0.005, 0.3))
    ]
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    log_rows(writer, rows)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    curve = f"prune/kfac/energy/L{layers_id(rows[0].layers)}"
    assert {tag.rsplit("/", 2)[0] for tag in events.Tags()["scalars"]} >= {curve}
    acc = {(e.step, round(e.value, 6)) for e in events.Scalars(f"{curve}/val/acc")}
    assert acc == {(0, 0.9), (3000, 0.1), (4000, 0.2), (5000, 0.3)}
    strength = sorted((e.step, e.value) for e in events.Scalars(f"{curve}/strength"))
    assert [s for s, _ in strength] == [3000, 4000, 5000]
    assert [v for _, v in strength] == pytest.approx([0.003, 0.004, 0.005])
    kept = events.Scalars(f"{curve}/kept_fraction")
    assert sorted(e.step for e in kept) == [3000, 4000, 5000]


def test_scorer_scores_a_copy_and_the_unedited_model_once(tmp_path: Path) -> None:
    module, data = tiny_module(), tiny_data()
    live = snapshot(module.state_dict())
    scorer = Scorer(module, data)
    zeros = {key: torch.zeros_like(value) for key, value in live.items()}
    first = scorer.before(live)
    assert scorer.before(live) == first and data.evaluations == 1  # cached: the unedited model is scored once
    assert scorer(zeros, live)["val/loss"] == pytest.approx(math.log(D_OUT)) and data.evaluations == 2
    # another unedited state dict (a scorer reused for another checkpoint) is scored, not served from the cache
    assert scorer.before(zeros)["val/loss"] == pytest.approx(math.log(D_OUT)) and data.evaluations == 3
    assert_bit_identical(module.state_dict(), live)
    with pytest.raises(TypeError, match=r"evaluate=True scores Linear with its own validation loop, but it has no "):
        Scorer(nn.Linear(2, 2), data)


class PlainMLP(pl.LightningModule):
    """A foreign module: no evaluation_metrics, ``(x, y)`` batches, metrics logged by its own validation_step."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(D_IN, D_HID), nn.Linear(D_HID, D_HID), nn.Linear(D_HID, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())


class PlainData(pl.LightningDataModule):
    def __init__(self, data: TinyData) -> None:
        super().__init__()
        self.data = data

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        dataset = torch.utils.data.TensorDataset(self.data.x, self.data.y)
        return torch.utils.data.DataLoader(dataset, batch_size=16)


def test_scorer_runs_the_modules_own_validation_loop_on_a_copy() -> None:
    """Without evaluation_metrics the score is every metric the module's validation_step logs, from a separate
    Trainer on a copy; the module, its mode and the global random state are untouched."""
    torch.manual_seed(0)
    module, data = PlainMLP(), tiny_data()
    module.train()
    live = snapshot(module.state_dict())
    random_state = torch.get_rng_state()
    scorer = Scorer(module, PlainData(data))
    before = scorer.before(live)
    logits = module(data.x).detach()
    assert before == pytest.approx(
        {
            "val/loss": float(F.cross_entropy(logits, data.y)),
            "val/acc": float((logits.argmax(-1) == data.y).float().mean()),
        }
    )
    zeros = {key: torch.zeros_like(value) for key, value in live.items()}
    assert scorer(zeros, live) == pytest.approx(
        {"val/loss": math.log(D_OUT), "val/acc": float((data.y == 0).float().mean())}
    )
    assert torch.equal(torch.get_rng_state(), random_state)  # a loader iterator draws a seed: put back
    assert_bit_identical(module.state_dict(), live)
    assert module.training and module._trainer is None


class Unscorable(pl.LightningModule):
    """Neither evaluation_metrics nor validation_step: nothing to score with."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_OUT)


@pytest.mark.parametrize(
    ("module", "datamodule", "error", "match"),
    [
        (Unscorable, None, TypeError, r"evaluate=True scores Unscorable .*no validation_step; define validation_step"),
        (PlainMLP, None, ValueError, r"evaluate=True scores PlainMLP .*but there is no validation data"),
    ],
)
def test_scorer_refuses_what_it_cannot_score(module: type, datamodule: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Scorer(module(), datamodule).before(module().state_dict())
