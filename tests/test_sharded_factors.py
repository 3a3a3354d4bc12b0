"""Sharded K-FAC factors: owners, reduction to owners, shard files + index, lazy validated loading, DDP = 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from memcurve.callbacks import KFACFactors, KFACPruning
from memcurve.curvature import (
    FactorFileError,
    FactorSettings,
    LayerSums,
    ShardedLayers,
    assign_owners,
    collect_factors,
    collect_sums,
    eigendecompose,
    load_factors,
    reduce_to_owners,
    save_factors,
    save_sharded_factors,
)
from memcurve.curvature.layers import clean_module_name
from memcurve.curvature.sharded_storage import shard_name
from memcurve.editing import apply_edit, edit_checkpoint
from memcurve.lightning_modules import CausalLMModule
from memcurve.tiny import TINY_OLMO2, RandomTokens, RandomTokensData

LM_LAYERS = [
    "model.model.layers.*.mlp.gate_proj",
    "model.model.layers.*.mlp.up_proj",
    "model.model.layers.1.self_attn.q_proj",
]
RTOL, ATOL = 1e-6, 1e-12  # float64 sums: only the order of the cross-rank sums differs
WORLD_SIZE = 2


# -- tiny models and data ------------------------------------------------------------------------------------------


def tiny_lm() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(dict(TINY_OLMO2))


def validate_factors(
    output_dir: Path, devices: int = 1, strategy: str = "auto", logger=False, **options
) -> KFACFactors:
    """``trainer.validate`` of the tiny LM with a sharded KFACFactors callback (float64 sums); ``options``: more
    FactorSettings."""
    settings = FactorSettings(dtype="float64", sharded=True, **options)
    callbacks = [KFACFactors(layers=LM_LAYERS, settings=settings, when="validate", output_dir=str(output_dir))]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        limit_val_batches=1,
    )
    trainer.validate(tiny_lm(), datamodule=RandomTokensData(), verbose=False)
    return callbacks[0]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 3)
    )


MLP_LAYERS = ["0", "2", "4", "6"]


def mlp_eigen() -> tuple[nn.Module, dict, dict]:
    """The tiny MLP, its eigendecomposed float64 factors and the settings a factor file records."""
    model = mlp()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    batches = [(x[i : i + 5], torch.zeros(5, dtype=torch.long)) for i in range(0, 20, 5)]
    from memcurve.adapters import ClassificationAdapter

    adapter = ClassificationAdapter(0, 1, None)
    settings = FactorSettings(dtype="float64").resolve(adapter)
    factors = collect_factors(model, batches, MLP_LAYERS, settings, adapter=adapter)
    return model, eigendecompose(factors), settings.file_settings()


def sizes(model: nn.Module, names: list[str]) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {n: modules[n].in_features ** 2 + modules[n].out_features ** 2 for n in names}


def reconstruct(layer) -> tuple[torch.Tensor, torch.Tensor]:
    a = layer.eigvecs_A @ torch.diag(layer.eigvals_A) @ layer.eigvecs_A.T
    g = layer.eigvecs_G @ torch.diag(layer.eigvals_G) @ layer.eigvecs_G.T
    return a, g


# -- owners --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layer_sizes", "world_size", "owners", "loads"),
    [
        ({"a": 5, "b": 4, "c": 3, "d": 3, "e": 3}, 2, {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}, [8, 10]),
        (
            {"g0": 7, "u0": 7, "g1": 7, "u1": 7, "g2": 7, "u2": 7},
            4,
            {"g0": 0, "g1": 1, "g2": 2, "u0": 3, "u1": 0, "u2": 1},
            [14, 14, 7, 7],
        ),
        ({"x": 1, "y": 1}, 3, {"x": 0, "y": 1}, [1, 1, 0]),
        ({"x": 9}, 1, {"x": 0}, [9]),
    ],
)
def test_owners_are_deterministic_and_balanced(layer_sizes, world_size, owners, loads):
    got = assign_owners(layer_sizes, world_size)
    assert got == owners and list(got) == list(layer_sizes)  # keyed in the input order
    assert assign_owners(dict(reversed(list(layer_sizes.items()))), world_size) == owners  # order-free
    assert [sum(s for n, s in layer_sizes.items() if got[n] == r) for r in range(world_size)] == loads


def test_owner_arguments_are_checked():
    with pytest.raises(ValueError, match=r"world_size=0 must be a positive integer"):
        assign_owners({"a": 1}, 0)
    with pytest.raises(ValueError, match=r"layer 'a': size -1"):
        assign_owners({"a": -1}, 2)


def test_clean_module_names():
    assert clean_module_name("model.layers.0._fsdp_wrapped_module.mlp.up_proj") == "model.layers.0.mlp.up_proj"
    assert clean_module_name("_orig_mod.blocks.1._checkpoint_wrapped_module.fc1") == "blocks.1.fc1"


# -- single process: files, round trip, laziness -----------------------------------------------------------------
def test_single_process_round_trip_equals_the_unsharded_file(tmp_path):
    model, eigen, settings = mlp_eigen()
    single = load_factors(save_factors(tmp_path / "kfac.safetensors", eigen, model=model, settings=settings), model)
    owners = assign_owners(sizes(model, MLP_LAYERS), 3)
    index_path = save_sharded_factors(
        tmp_path / "sharded", eigen, model=model, settings=settings, owners=owners, extra={"run": 1}
    )
    assert index_path == tmp_path / "sharded" / "kfac.index.json"
    assert sorted(p.name for p in index_path.parent.iterdir()) == sorted(
        [index_path.name, *(shard_name("kfac", r, 3) for r in range(3))]
    )
    stored = load_factors(index_path, model, expect={"mode": "expand"})
    assert isinstance(stored.layers, ShardedLayers) and stored.layers.loaded == ()  # nothing read yet
    assert stored.kind == "eigen" and stored.settings == single.settings and stored.extra["run"] == 1
    assert stored.model_fingerprint == single.model_fingerprint and list(stored.layers) == sorted(MLP_LAYERS)
    first = stored.layers["2"]
    assert stored.layers.loaded == ("2",)
    for name in MLP_LAYERS:  # the same tensors, bit for bit
        for key in ("eigvals_A", "eigvecs_A", "eigvals_G", "eigvecs_G", "count_A", "count_G"):
            assert torch.equal(
                torch.as_tensor(getattr(stored.layers[name], key)), torch.as_tensor(getattr(single.layers[name], key))
            )
    assert stored.layers["2"] is first  # cached
    index = json.loads(index_path.read_text())
    assert {n: info["owner"] for n, info in index["layers"].items()} == owners
    for file, shard in index["shards"].items():  # each shard is a factor file of its own
        alone = load_factors(index_path.parent / file, model)
        assert sorted(alone.layers) == shard["layers"] and alone.extra["shard"]["rank"] == shard["rank"]


def test_reduce_to_owners_on_one_process_keeps_everything():
    sums = {"a": LayerSums(torch.eye(2), torch.eye(3), torch.tensor(4), torch.tensor(4))}
    assert reduce_to_owners(sums, {"a": 0})["a"] is sums["a"]
    with pytest.raises(ValueError, match=r"owners \{'a': 1\} are not ranks of a world of size 1"):
        reduce_to_owners(sums, {"a": 1})


def test_save_checks_the_layers_of_the_rank(tmp_path):
    model, eigen, settings = mlp_eigen()
    with pytest.raises(ValueError, match=r"must name the same layers"):
        save_sharded_factors(tmp_path, eigen, model=model, settings=settings, owners={"0": 0})
    with pytest.raises(ValueError, match=r"settings lack"):
        save_sharded_factors(tmp_path, eigen, model=model, settings={"mode": "expand"})


def test_corrupt_or_missing_shards_are_clear_errors(tmp_path):
    model, eigen, settings = mlp_eigen()
    owners = assign_owners(sizes(model, MLP_LAYERS), 2)
    index_path = save_sharded_factors(tmp_path, eigen, model=model, settings=settings, owners=owners)
    victim = next(n for n in MLP_LAYERS if owners[n] == 1)
    other = next(n for n in MLP_LAYERS if owners[n] == 0)
    shard = tmp_path / shard_name("kfac", 1, 2)
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF  # a flipped bit in the tensor data
    shard.write_bytes(bytes(data))
    stored = load_factors(index_path, model)
    with pytest.raises(FactorFileError, match=rf"{shard.name}: shard of layer '{victim}'.*corrupted"):
        stored.layers[victim]
    stored.layers[other]  # the other shard is fine
    shard.unlink()
    with pytest.raises(FactorFileError, match=rf"{shard.name}: shard of layers .*'{victim}'.* is missing"):
        load_factors(index_path)
    index_path.write_text("{not json")
    with pytest.raises(FactorFileError, match=r"not a readable JSON factor index"):
        load_factors(index_path)


def test_index_is_checked_against_the_model(tmp_path):
    model, eigen, settings = mlp_eigen()
    index_path = save_sharded_factors(tmp_path, eigen, model=model, settings=settings)
    with pytest.raises(FactorFileError, match=r"setting 'mode' is 'expand', expected 'reduce'"):
        load_factors(index_path, expect={"mode": "reduce"})
    other = mlp()
    other.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(FactorFileError, match=r"model fingerprint"):
        load_factors(index_path, other)
    wrong = nn.Sequential(
        nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 12), nn.Tanh(), nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 3)
    )
    with pytest.raises(FactorFileError, match=r"layer '0' out_features is 9 in the model, 8 in the index"):
        load_factors(index_path, wrong)


def test_kfac_pruning_reads_an_index(tmp_path):
    model, eigen, settings = mlp_eigen()
    single = save_factors(tmp_path / "kfac.safetensors", eigen, model=model, settings=settings)
    index = save_sharded_factors(
        tmp_path / "sharded", eigen, model=model, settings=settings, owners=assign_owners(sizes(model, MLP_LAYERS), 2)
    )
    checkpoint = {"state_dict": model.state_dict()}
    edited = []
    for name, path in (("single", single), ("index", index)):
        pruning = KFACPruning(layers=["2", "4"], factors=str(path), energy=0.6, evaluate=False)
        factors = pruning.factors_for(checkpoint)
        assert factors == str(path)
        # What the callback runs once a checkpoint was written (its requests, its factors).
        (row,) = edit_checkpoint(
            checkpoint, tmp_path / "last.ckpt", pruning.requests, module=model, factors=factors,
            output_folder=tmp_path / name, log=lambda line: None,
        )  # fmt: skip
        assert row.layer_names == ["2", "4"]
        edited.append(torch.load(row.edited_checkpoint, weights_only=False)["state_dict"])
    for key, value in edited[0].items():
        assert torch.equal(value, edited[1][key]), key
    assert not torch.equal(edited[1]["2.weight"], checkpoint["state_dict"]["2.weight"])
    stored = load_factors(index, model)
    result = apply_edit(pruning.requests[0], checkpoint["state_dict"], ["2", "4"], factors=stored)
    assert sorted(result.layers) == ["2", "4"] and stored.layers.loaded == ("2", "4")  # read lazily
    for key, value in result.state_dict.items():
        assert torch.equal(value, edited[1][key]), key


def test_collect_sums_in_separate_passes_or_offloaded_equal_one_pass():
    model = mlp()
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(2))
    batches = [(x[i : i + 4], torch.zeros(4, dtype=torch.long)) for i in range(0, 12, 4)]
    from memcurve.adapters import ClassificationAdapter

    settings = FactorSettings(dtype="float64", mc_samples=2)
    adapter = ClassificationAdapter(0, 1, None)
    both = collect_sums(model, batches, MLP_LAYERS, settings, adapter=adapter)
    only_a = collect_sums(model, batches, MLP_LAYERS, settings, adapter=adapter, factors=("A",))
    offloaded = settings.replace(offload_to_cpu=True)
    only_g = collect_sums(model, batches, MLP_LAYERS, offloaded, adapter=adapter, factors=("G",))
    for name, s in both.items():
        assert torch.equal(only_a[name].A_sum, s.A_sum) and only_a[name].G_sum.shape == (0, 0)
        assert torch.equal(only_g[name].G_sum, s.G_sum) and only_g[name].A_sum.shape == (0, 0)
        assert int(only_a[name].count_A) == int(only_g[name].count_A) == int(s.count_A) == 12
        assert int(only_g[name].count_G) == int(s.count_G) == 24 and int(only_a[name].count_G) == 0


# -- Lightning: one process, two gloo processes --------------------------------------------------------------------
def test_callback_separate_passes_and_offload_match_and_log_throughput(tmp_path):
    plain = validate_factors(tmp_path / "plain", logger=CSVLogger(tmp_path, name="log"))
    lean = validate_factors(tmp_path / "lean", separate_passes=True, offload_to_cpu=True, memory_budget_gb=1.0)
    a, b = load_factors(plain.saved_paths[-1]), load_factors(lean.saved_paths[-1])
    for name in a.layers:
        assert (a.layers[name].count_A, a.layers[name].count_G) == (b.layers[name].count_A, b.layers[name].count_G)
        for one, two in zip(reconstruct(a.layers[name]), reconstruct(b.layers[name])):
            torch.testing.assert_close(one, two, rtol=RTOL, atol=ATOL)
    tokens = int(RandomTokens().mask.sum())
    assert plain.last_throughput["unit"] == "tok" and plain.last_throughput["count"] == tokens
    assert lean.last_throughput["count"] == 2 * tokens  # two passes over the data
    metrics = (Path(tmp_path) / "log" / "version_0" / "metrics.csv").read_text()
    assert "kfac/tokens_per_s" in metrics and "kfac/peak_memory_gb" in metrics
    assert plain.memory_plan is not None and plain.memory_plan.peak > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_give_the_single_process_sharded_factors(tmp_path):
    # Lightning's own DDP strategy, its processes launched from outside (as torchrun would): each runs this file
    # as a script, so nothing needs to be imported by a test-package name in the children.
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD_SIZE)}
    env.update({"NODE_RANK": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, str(tmp_path)],
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(WORLD_SIZE)
    ]
    single = validate_factors(tmp_path / "world1")  # meanwhile, in this process
    outputs = [process.communicate(timeout=300)[0].decode(errors="replace") for process in processes]
    assert [process.returncode for process in processes] == [0] * WORLD_SIZE, outputs[0][-3000:] + outputs[1][-3000:]

    one = load_factors(single.saved_paths[-1])
    module = tiny_lm()
    for folder, stem in (("world2", "kfac"), ("world2_lean", "lean")):
        index_path = tmp_path / folder / f"{stem}.index.json"
        two = load_factors(index_path, module)
        assert list(two.layers) == list(one.layers)
        for name in one.layers:
            x, y = one.layers[name], two.layers[name]
            assert (x.count_A, x.count_G) == (y.count_A, y.count_G)
            torch.testing.assert_close(y.eigvals_A, x.eigvals_A, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(y.eigvals_G, x.eigvals_G, rtol=RTOL, atol=ATOL)
            for a, b in zip(reconstruct(x), reconstruct(y)):
                torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
        # Owners and the index: what one process writes for the same owners (only the shards' hashes differ).
        index = json.loads(index_path.read_text())
        dims = {n: (info["in_features"], info["out_features"]) for n, info in index["layers"].items()}
        owners = assign_owners({n: a * a + g * g for n, (a, g) in dims.items()}, WORLD_SIZE)
        assert {n: info["owner"] for n, info in index["layers"].items()} == owners
        assert len(set(owners.values())) == WORLD_SIZE
        reference = save_sharded_factors(
            tmp_path / f"{folder}_reference",
            {n: one.layers[n] for n in one.layers},
            model=module,
            settings=one.settings,
            owners=owners,
            world_size=WORLD_SIZE,
            stem=stem,
            extra=index["extra"],
        )
        expected = json.loads(reference.read_text())
        for shards in (index["shards"], expected["shards"]):
            for shard in shards.values():
                shard.pop("sha256")
        assert index == expected


def _ddp_worker(out_dir: Path) -> None:
    torch.set_num_threads(1)
    settings = FactorSettings(dtype="float64", sharded=True)
    callbacks = [
        KFACFactors(layers=LM_LAYERS, settings=settings, when="validate", output_dir=str(out_dir / "world2")),
        KFACFactors(
            layers=LM_LAYERS,
            settings=settings.replace(separate_passes=True, offload_to_cpu=True),
            when="validate",
            output_dir=str(out_dir / "world2_lean"),
            filename="lean.safetensors",  # state keys of two callbacks of one type must differ
        ),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        limit_val_batches=1,
    )
    trainer.validate(tiny_lm(), datamodule=RandomTokensData(), verbose=False)
    assert trainer.world_size == WORLD_SIZE
    assert callbacks[0].last_throughput["count"] == int(RandomTokens().mask.sum())  # summed over the ranks


if __name__ == "__main__":
    _ddp_worker(Path(sys.argv[1]))
