"""FactorSettings: the options of a factor pass declared once, validated once, read by every layer that uses them."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

import jsonargparse
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from memcurve.adapters import ClassificationAdapter
from memcurve.callbacks import KFACFactors
from memcurve.curvature import (
    FactorFileError,
    FactorSettings,
    collect_factors,
    collect_sums,
    eigendecompose,
    load_factors,
    save_factors,
    save_sharded_factors,
)
from memcurve.curvature.factor_file import METADATA_KEY, REQUIRED_SETTINGS, canonical_settings
from memcurve.curvature.settings import FILE_SETTINGS

RTOL, ATOL = 1e-10, 1e-12  # float64 sums against a float64 per-sample reference: only summation order differs
TUPLES = ClassificationAdapter(0, 1, None)  # (inputs, labels) batches without example indices
FIELDS = {field.name for field in dataclasses.fields(FactorSettings)}


def test_defaults():
    settings = FactorSettings()
    assert dataclasses.asdict(settings) == {
        "mode": "expand",
        "fisher": "sampled",
        "mc_samples": 1,
        "position": "all",
        "bias": "exclude",
        "dtype": "float32",
        "seed": 0,
        "drop_last_position": None,
        "on_non_linear": "skip",
        "store": "eigen",
        "max_batches": None,
        "max_samples": None,
        "batch_size": None,
        "sharded": False,
        "offload_to_cpu": False,
        "separate_passes": False,
        "memory_budget_gb": None,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.mode = "reduce"  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"drop_last_position=None is not decided yet"):
        settings.file_settings()


def test_resolve_and_file_settings():
    class LastDropping(ClassificationAdapter):
        drop_last_position = True

    assert FactorSettings().resolve(ClassificationAdapter()).drop_last_position is False
    assert FactorSettings().resolve(LastDropping()).drop_last_position is True
    assert FactorSettings(drop_last_position=False).resolve(LastDropping()).drop_last_position is False
    stored = FactorSettings(fisher="empirical", position="cls", max_batches=3).resolve(LastDropping()).file_settings()
    assert tuple(stored) == FILE_SETTINGS == REQUIRED_SETTINGS
    assert stored == {
        "mode": "expand",
        "position": "cls",
        "bias": "exclude",
        "dtype": "float32",
        "drop_last_position": True,
        "fisher": "empirical",
        "mc_samples": 1,
    }


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"mode": "mean"}, ValueError, r"mode='mean' is not supported; choose one of \('expand', 'reduce'\)"),
        ({"fisher": "true"}, ValueError, r"fisher='true' is not supported; choose one of \('sampled', 'empirical'\)"),
        ({"mc_samples": 0}, ValueError, r"mc_samples=0 must be a positive integer"),
        ({"mc_samples": 2.0}, ValueError, r"mc_samples=2.0 must be a positive integer"),
        ({"fisher": "empirical", "mc_samples": 4}, ValueError, r"mc_samples=4: the empirical Fisher .* must be 1"),
        ({"position": "first"}, ValueError, r"position='first' is not supported; choose one of \('all', 'cls'\)"),
        ({"bias": "include"}, ValueError, r"bias='include' is not supported; choose one of \('exclude', 'homog"),
        ({"dtype": "float16"}, ValueError, r"dtype='float16' is not supported; choose one of \('float32', 'float64'\)"),
        ({"dtype": torch.float64}, ValueError, r"dtype=torch.float64 is not supported; choose one of \('float32'"),
        ({"seed": -1}, ValueError, r"seed=-1 must be an integer in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, ValueError, r"seed=9223372036854775808 must be an integer in \[0, 2\*\*63\)"),
        ({"drop_last_position": "yes"}, TypeError, r"drop_last_position='yes' must be True, False or None"),
        ({"on_non_linear": "warn"}, ValueError, r"on_non_linear='warn' is not supported; choose one of \('error'"),
        ({"store": "both"}, ValueError, r"store='both' is not supported; choose one of \('eigen', 'factors'\)"),
        ({"max_batches": 0}, ValueError, r"max_batches=0 must be a positive integer or None"),
        ({"max_samples": -5}, ValueError, r"max_samples=-5 must be a positive integer or None"),
        ({"batch_size": True}, ValueError, r"batch_size=True must be a positive integer or None"),
        ({"sharded": "yes"}, TypeError, r"sharded='yes' must be True or False"),
        ({"offload_to_cpu": 1}, TypeError, r"offload_to_cpu=1 must be True or False"),
        ({"separate_passes": None}, TypeError, r"separate_passes=None must be True or False"),
        ({"memory_budget_gb": 0}, ValueError, r"memory_budget_gb=0 must be a positive number of GB or None"),
        ({"memory_budget_gb": "10"}, ValueError, r"memory_budget_gb='10' must be a positive number of GB or None"),
    ],
)
def test_each_bad_value_names_the_field_and_the_value(changes, error, message):
    with pytest.raises(error, match=message):
        FactorSettings(**changes)
    with pytest.raises(error, match=message):  # a copy is validated again
        FactorSettings().replace(**changes)


def test_every_option_is_declared_once():
    """No KFACFactors argument repeats a FactorSettings field: the pass options live in ``settings`` only."""
    callback_arguments = set(inspect.signature(KFACFactors.__init__).parameters) - {"self"}
    assert "settings" in callback_arguments
    assert not callback_arguments & FIELDS, f"declared twice: {sorted(callback_arguments & FIELDS)}"
    for function in (collect_sums, collect_factors):
        assert not set(inspect.signature(function).parameters) & FIELDS, function.__name__


def test_yaml_builds_the_callback_through_jsonargparse():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(KFACFactors, "cb")
    config = parser.parse_string(
        """
        cb:
          layers: ["model.blocks.*.mlp.fc1", "model.blocks.*.mlp.fc2"]
          when: validate
          settings: {position: cls, fisher: sampled, mc_samples: 4, memory_budget_gb: 10, sharded: true}
        """
    )
    callback = parser.instantiate_classes(config).cb
    assert isinstance(callback, KFACFactors) and isinstance(callback.settings, FactorSettings)
    assert callback.settings == FactorSettings(
        position="cls", fisher="sampled", mc_samples=4, memory_budget_gb=10, sharded=True
    )
    assert callback.layers == ["model.blocks.*.mlp.fc1", "model.blocks.*.mlp.fc2"] and callback.when == "validate"
    defaults = parser.instantiate_classes(parser.parse_string("cb: {layers: [model.head]}")).cb
    assert defaults.settings == FactorSettings()
    bad = parser.parse_string("cb: {layers: [model.head], settings: {fisher: empirical, mc_samples: 4}}")
    with pytest.raises(ValueError, match=r"mc_samples=4: the empirical Fisher"):
        parser.instantiate_classes(bad)


# -- the pass with settings = the old behaviour: a per-sample dense reference --------------------------------------
def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (12,), generator=generator)
    return [(x[i : i + 4], y[i : i + 4]) for i in range(0, 12, 4)]


def per_sample_reference(model: nn.Module, data: list) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Empirical Fisher, bias excluded: A = mean of a aᵀ, G = mean of g gᵀ with g = ∂CE(x_n, y_n)/∂s, one
    example at a time (no hooks, no batching)."""
    a_sums = {"0": torch.zeros(5, 5, dtype=torch.float64), "2": torch.zeros(7, 7, dtype=torch.float64)}
    g_sums = {"0": torch.zeros(7, 7, dtype=torch.float64), "2": torch.zeros(4, 4, dtype=torch.float64)}
    n = 0
    for x, y in data:
        for i in range(len(x)):
            a0 = x[i : i + 1]
            s0 = model[0](a0)
            a2 = torch.tanh(s0)
            s2 = model[2](a2)
            loss = nn.functional.cross_entropy(s2, y[i : i + 1], reduction="sum")
            g0, g2 = torch.autograd.grad(loss, [s0, s2])
            for name, a, g in (("0", a0, g0), ("2", a2, g2)):
                a_sums[name] += a.detach().T @ a.detach()
                g_sums[name] += g.T @ g
            n += 1
    return {name: (a_sums[name] / n, g_sums[name] / n) for name in a_sums}


def test_collect_factors_with_settings_matches_a_per_sample_reference():
    model, data = tiny_mlp(), batches()
    settings = FactorSettings(fisher="empirical", dtype="float64")
    got = collect_factors(model, data, ["0", "2"], settings, adapter=TUPLES)
    want = per_sample_reference(model, data)
    for name, (a, g) in want.items():
        assert (got[name].count_A, got[name].count_G) == (12, 12)
        assert got[name].A.dtype == torch.float64
        torch.testing.assert_close(got[name].A, a, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got[name].G, g, rtol=RTOL, atol=ATOL)
    # max_batches lives in the settings; separate passes (A, then G) give the same factors
    two = collect_factors(model, data, ["0", "2"], settings.replace(max_batches=2), adapter=TUPLES)
    assert two["0"].count_A == 8
    apart = collect_factors(model, data, ["0", "2"], settings.replace(separate_passes=True), adapter=TUPLES)
    for name in want:
        torch.testing.assert_close(apart[name].A, got[name].A, rtol=0, atol=0)
        torch.testing.assert_close(apart[name].G, got[name].G, rtol=0, atol=0)


def test_collect_refuses_what_is_not_a_factor_settings():
    with pytest.raises(TypeError, match=r"settings must be a memcurve.curvature.FactorSettings .* not dict"):
        collect_factors(tiny_mlp(), batches(), ["0"], {"fisher": "empirical"}, adapter=TUPLES)
    with pytest.raises(ValueError, match=r"separate_passes=True reads the batches twice"):
        collect_factors(tiny_mlp(), iter(batches()), ["0"], FactorSettings(separate_passes=True), adapter=TUPLES)


# -- one name per idea: files written with the old name fisher_type still load ---------------------------------------
def _factor_file(tmp_path: Path) -> tuple[nn.Module, Path, dict]:
    model = tiny_mlp()
    adapter = TUPLES
    settings = FactorSettings(fisher="empirical", dtype="float64").resolve(adapter)
    eigen = eigendecompose(collect_factors(model, batches(), ["0", "2"], settings, adapter=adapter))
    return (
        model,
        save_factors(tmp_path / "new.safetensors", eigen, model=model, settings=settings.file_settings()),
        eigen,
    )


def _rename_in_metadata(path: Path, target: Path) -> None:
    """Rewrite a factor file as a memcurve of before the rename wrote it: ``fisher_type`` in its settings."""
    with safe_open(str(path), "pt") as fh:
        meta = json.loads(fh.metadata()[METADATA_KEY])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # safe_open is not iterable
    meta["settings"]["fisher_type"] = meta["settings"].pop("fisher")
    save_file(tensors, str(target), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def test_a_file_with_the_old_setting_name_loads(tmp_path):
    model, path, eigen = _factor_file(tmp_path)
    old = tmp_path / "old.safetensors"
    _rename_in_metadata(path, old)
    with safe_open(str(old), "pt") as fh:
        assert "fisher_type" in json.loads(fh.metadata()[METADATA_KEY])["settings"]
    stored = load_factors(old, model, expect={"fisher": "empirical"})
    assert stored.settings == load_factors(path, model).settings
    assert stored.settings["fisher"] == "empirical" and "fisher_type" not in stored.settings
    assert load_factors(old, expect={"fisher_type": "empirical"}).settings["fisher"] == "empirical"
    for name, layer in eigen.items():
        assert torch.equal(stored.layers[name].eigvals_G, layer.eigvals_G)
    with pytest.raises(FactorFileError, match=r"setting 'fisher' is 'empirical', expected 'sampled'"):
        load_factors(old, expect={"fisher_type": "sampled"})


def test_a_sharded_index_with_the_old_setting_name_loads(tmp_path):
    model, path, eigen = _factor_file(tmp_path)
    stored = load_factors(path, model)
    index_path = save_sharded_factors(
        tmp_path / "sharded", eigen, model=model, settings=stored.settings, owners={"0": 0, "2": 1}
    )
    index = json.loads(index_path.read_text())
    for file, shard in index["shards"].items():  # each shard as an old writer left it, and the index with it
        _rename_in_metadata(index_path.parent / file, index_path.parent / file)
        shard["sha256"] = hashlib.sha256((index_path.parent / file).read_bytes()).hexdigest()
    index["settings"]["fisher_type"] = index["settings"].pop("fisher")
    index_path.write_text(json.dumps(index))
    old = load_factors(index_path, model, expect={"fisher": "empirical"})
    assert old.settings == stored.settings
    for name, layer in eigen.items():
        assert torch.equal(old.layers[name].eigvecs_A, layer.eigvecs_A)


def test_writers_take_only_the_new_name(tmp_path):
    model, path, eigen = _factor_file(tmp_path)
    settings = canonical_settings({**load_factors(path).settings})
    old_style = {**{k: v for k, v in settings.items() if k != "fisher"}, "fisher_type": "empirical"}
    assert canonical_settings(old_style) == settings
    with pytest.raises(ValueError, match=r"setting 'fisher_type' is the old name of 'fisher'; pass fisher='empirical'"):
        save_factors(tmp_path / "again.safetensors", eigen, model=model, settings=old_style)
    with pytest.raises(ValueError, match=r"setting 'fisher_type' is the old name of 'fisher'"):
        save_sharded_factors(tmp_path / "sharded", eigen, model=model, settings=old_style)
