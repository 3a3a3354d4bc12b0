"""Factor files: round trip, validation against the model and settings, corruption, truncation, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from memcurve.curvature import (
    FactorFileError,
    KFACTracker,
    LayerEigen,
    LayerFactors,
    eigendecompose,
    fisher_backward,
    load_factors,
    model_fingerprint,
    save_factors,
)
from memcurve.curvature import factor_file as storage_module

SETTINGS = {"fisher": "sampled", "mc_samples": 2}


def model_and_factors(bias: str = "homogeneous") -> tuple[nn.Module, KFACTracker, dict[str, LayerFactors]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4, bias=False))
    with KFACTracker(model, ["0", "2"], bias=bias) as tracker:
        fisher_backward(model(torch.randn(5, 6)), seed=0, example_index=torch.arange(5), mc_samples=2)
    return model, tracker, tracker.finalize()


def saved(tmp_path: Path, kind: str = "factors") -> tuple[nn.Module, Path, dict]:
    model, tracker, factors = model_and_factors()
    layers = factors if kind == "factors" else eigendecompose(factors)
    path = save_factors(
        tmp_path / "kfac" / "factors.safetensors",
        layers,
        model=model,
        settings={**tracker.settings(), **SETTINGS},
        extra={"epoch": 3},
    )
    return model, path, layers


@pytest.mark.parametrize("kind", ["factors", "eigen"])
def test_round_trip(tmp_path, kind):
    model, path, layers = saved(tmp_path, kind)
    stored = load_factors(path, model, expect={"mode": "expand", "fisher": "sampled"})
    assert stored.kind == kind and stored.extra == {"epoch": 3}
    assert stored.settings == {
        "mode": "expand",
        "position": "all",
        "bias": "homogeneous",
        "dtype": "float32",
        "drop_last_position": False,
        "fisher": "sampled",
        "mc_samples": 2,
    }
    assert stored.model_fingerprint == model_fingerprint(model)
    assert stored.layers.keys() == layers.keys()
    for name, want in layers.items():
        got = stored.layers[name]
        assert type(got) is type(want) and (got.count_A, got.count_G) == (want.count_A, want.count_G) == (5, 10)
        keys = ("A", "G") if kind == "factors" else ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G")
        for key in keys:
            assert torch.equal(getattr(got, key), getattr(want, key)), (name, key)
    assert getattr(stored.layers["0"], keys[0]).shape[0] == 7  # in_features 6 + the homogeneous coordinate
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind


def test_mismatched_model(tmp_path):
    model, path, _ = saved(tmp_path)
    wider = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4, bias=False))
    with pytest.raises(FactorFileError, match=r"factors.safetensors: layer '0' out_features is 9 in the model, 8 in"):
        load_factors(path, wider)
    extra_layer = nn.Sequential(*model, nn.Linear(4, 4))
    with pytest.raises(FactorFileError, match=r"model fingerprint .* does not match"):
        load_factors(path, extra_layer)
    with pytest.raises(FactorFileError, match=r"layer '2' is a Tanh in the model, not an nn.Linear"):
        load_factors(path, nn.Sequential(model[0], nn.Tanh(), nn.Tanh()))
    with pytest.raises(FactorFileError, match=r"setting 'mode' is 'expand', expected 'reduce'"):
        load_factors(path, model, expect={"mode": "reduce"})


def test_corrupted_file(tmp_path):
    model, path, _ = saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a byte of the last tensor's data: safetensors itself cannot notice
    path.write_bytes(bytes(data))
    with pytest.raises(FactorFileError, match=r"tensor '.*' is corrupted: sha256"):
        load_factors(path, model)


def test_truncated_file(tmp_path):
    model, path, _ = saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FactorFileError, match="not a readable safetensors file, it may be truncated"):
        load_factors(path, model)
    path.write_bytes(b"")
    with pytest.raises(FactorFileError, match="truncated"):
        load_factors(path)
    with pytest.raises(FileNotFoundError, match="no such factor file"):
        load_factors(tmp_path / "missing.safetensors")


def test_foreign_and_tampered_metadata(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(FactorFileError, match="not a memcurve factor file"):
        load_factors(foreign)
    _, path, _ = saved(tmp_path)
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()["memcurve"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # safe_open is not iterable
    for change, match in [
        ({"version": 99}, "format version 99, this memcurve reads 1"),
        (
            {"layers": {**meta["layers"], "0": {**meta["layers"]["0"], "count_A": 0}}},
            r"layer '0' has counts \(count_A, count_G\) = \(0, 10\), expected positive integers",
        ),
        ({"settings": {**meta["settings"], "fisher": "true"}}, "setting fisher='true' is not one of"),
        (
            {"tensors": {k: v for k, v in meta["tensors"].items() if k != "2/G"}},
            r"the tensor metadata lacks tensors \['2/G'\]",
        ),
    ]:
        save_file(tensors, str(path), metadata={"memcurve": json.dumps({**meta, **change})})
        with pytest.raises(FactorFileError, match=match):
            load_factors(path)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model, path, layers = saved(tmp_path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_factors(
            path,
            layers,
            model=model,
            settings={
                **SETTINGS,
                "mode": "reduce",
                "position": "all",
                "bias": "homogeneous",
                "dtype": "float32",
                "drop_last_position": False,
            },
        )
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]


def test_save_validation(tmp_path):
    model, tracker, factors = model_and_factors()
    with pytest.raises(ValueError, match=r"settings lack \['fisher', 'mc_samples'\]"):
        save_factors(tmp_path / "f.safetensors", factors, model=model, settings=tracker.settings())
    with pytest.raises(ValueError, match=r"layer '0': A has shape \(7, 7\), the model's layer \(bias='exclude'\)"):
        save_factors(
            tmp_path / "f.safetensors",
            factors,
            model=model,
            settings={**tracker.settings(), **SETTINGS, "bias": "exclude"},
        )
    with pytest.raises(ValueError, match=r"setting mode='mean' is not one of \('expand', 'reduce'\)"):
        save_factors(
            tmp_path / "f.safetensors",
            factors,
            model=model,
            settings={**tracker.settings(), **SETTINGS, "mode": "mean"},
        )
    with pytest.raises(ValueError, match=r"setting mc_samples=0 must be a positive integer"):
        save_factors(
            tmp_path / "f.safetensors",
            factors,
            model=model,
            settings={**tracker.settings(), **SETTINGS, "mc_samples": 0},
        )
    mixed = {"0": factors["0"], "2": LayerEigen(*(torch.zeros(1),) * 4, 1, 1)}
    with pytest.raises(TypeError, match="all be LayerFactors or all be LayerEigen"):
        save_factors(tmp_path / "f.safetensors", mixed, model=model, settings={**tracker.settings(), **SETTINGS})
    assert not any(tmp_path.iterdir())
