"""FSDP2 on CPU: two gloo processes under Lightning's ModelParallelStrategy (``fully_shard`` in ``configure_model``).

The factor pass, the band probe and the pruning callbacks run on sharded parameters (DTensors) and give what one
process gives: the sharded factors, owners and index of the tiny OLMo-2 (memcurve's CausalLMModule), of a foreign
LightningModule that shards itself, and of the tiny ViT, within 1e-6 in float64; the probe's band statistics; and a
pruned fit-end checkpoint scored by an unsharded copy. A strategy that would write distributed checkpoints is refused
in ``setup``.

Both ranks run this file as a script (launched like torchrun would), one run after another in one process group;
meanwhile this process computes the single-process references.
"""

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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from memcurve.callbacks import BandActivationProbe, KFACFactors, KFACPruning
from memcurve.curvature import FactorSettings, assign_owners, load_factors
from memcurve.curvature.factor_file import model_fingerprint
from memcurve.curvature.layers import named_linear_modules
from memcurve.data import NoisyLabelDataModule
from memcurve.lightning_modules import CausalLMModule, NoisyLabelClassifier
from memcurve.tiny import TINY_OLMO2, RandomTokens, RandomTokensData
from memcurve.utils.sharding import parameters_sharded, repeated_blocks, shards_parameters, whole_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD_SIZE = 2
RTOL, ATOL = 1e-6, 1e-12  # float64 sums: only the order of the cross-rank sums differs
LM_LAYERS = [
    "model.model.layers.*.mlp.gate_proj",
    "model.model.layers.*.mlp.up_proj",
    "model.model.layers.1.self_attn.q_proj",
]
FOREIGN_LAYERS = ["net.model.layers.*.mlp.up_proj", "net.model.layers.0.self_attn.o_proj"]
TINY_VIT = {"img_size": 8, "in_chans": 1, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}
VIT_LAYERS = ["model.blocks.*.mlp.fc1", "model.blocks.1.attn.proj"]


# -- modules and data (not memcurve's own for the foreign LM) -----------------------------------------------------
class ForeignLM(pl.LightningModule):
    """Someone else's LightningModule: an HF OLMo-2 under ``net``, its own loss and logging, and its own FSDP2
    ``configure_model`` (decoder layers, then the model), written the way Lightning's documentation shows."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = dict(TINY_OLMO2)
        self.net = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.device_mesh is None or parameters_sharded(self.net):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss(self, batch: dict) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])[:, :-1]
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def tiny_lm() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(dict(TINY_OLMO2))


def tiny_vit() -> NoisyLabelClassifier:
    torch.manual_seed(0)
    return NoisyLabelClassifier(model_kwargs=dict(TINY_VIT), warmup_epochs=0, memorization_eval_every_n_epochs=0)


def small_digits() -> NoisyLabelDataModule:
    # More training images (the factor pass reads one position of each) than fc1 has outputs: G has full rank, so
    # the κ order of its pairs, and with it the probe's bands, is not decided by round-off between tied zeros.
    return NoisyLabelDataModule(val_size=297, subset_size=160, val_subset_size=30, batch_size=40, eval_batch_size=40)


def fsdp2(devices: int, **options) -> ModelParallelStrategy:
    """FSDP2 alone: every device in the data-parallel dimension (``tensor_parallel_size`` defaults to the devices)."""
    return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1, **options)


def trainer(devices: int, callbacks: list, root: Path, strategy=None, **options) -> pl.Trainer:
    if strategy is None and devices > 1:
        strategy = fsdp2(devices)
    settings = {
        "accelerator": "cpu",
        "devices": devices,
        "strategy": strategy or "auto",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": root,
        "callbacks": callbacks,
    }
    return pl.Trainer(**(settings | options))


def factor_callback(layers: list[str], out: Path) -> KFACFactors:
    return KFACFactors(
        layers=layers, settings=FactorSettings(dtype="float64", sharded=True), when="validate", output_dir=str(out)
    )


def probe_callback(out: Path) -> BandActivationProbe:
    return BandActivationProbe(factors="latest", when="validate", dtype="float64", output_dir=str(out))


# -- the runs: the same function on two ranks (FSDP2) and on one process -----------------------------------------
def validate_runs(root: Path, devices: int) -> dict:
    """The tiny OLMo-2, the foreign LM (with the band probe) and the tiny ViT (with the probe), validated with
    sharded factors. Returns what the test compares."""
    lm = factor_callback(LM_LAYERS, root / "lm")
    one_file = KFACFactors(  # not sharded: rank zero decomposes every layer and writes one file
        layers=LM_LAYERS, settings=FactorSettings(dtype="float64"), when="validate", output_dir=str(root / "lm_file")
    )
    run = trainer(devices, [lm, one_file], root, limit_val_batches=1)
    run.validate(tiny_lm(), datamodule=RandomTokensData(), verbose=False)
    foreign, foreign_probe = factor_callback(FOREIGN_LAYERS, root / "foreign"), probe_callback(root / "foreign_probe")
    module = ForeignLM()
    trainer(devices, [foreign, foreign_probe], root).validate(module, datamodule=RandomTokensData(), verbose=False)
    sharded = parameters_sharded(module)
    vit, vit_probe = factor_callback(VIT_LAYERS, root / "vit"), probe_callback(root / "vit_probe")
    trainer(devices, [vit, vit_probe], root).validate(tiny_vit(), datamodule=small_digits(), verbose=False)
    return {
        "indexes": {"lm": lm.saved_paths[-1], "foreign": foreign.saved_paths[-1], "vit": vit.saved_paths[-1]}
        if lm.saved_paths
        else {},
        "file": one_file.saved_paths[-1] if one_file.saved_paths else None,
        "probes": {"foreign": foreign_probe.last_results, "vit": vit_probe.last_results},
        "tokens": lm.last_throughput["count"],
        "sharded": sharded,
    }


def prune_run(root: Path) -> dict:
    """A two-step fit of the foreign LM under FSDP2, factors and K-FAC pruning at fit end, scored by the module's
    own validation loop; then the same with a strategy that writes distributed checkpoints (refused in setup)."""
    factors = KFACFactors(
        layers=FOREIGN_LAYERS,
        settings=FactorSettings(dtype="float64", sharded=True),
        when="fit_end",
        output_dir=str(root / "fit_factors"),
    )
    pruning = KFACPruning(layers=FOREIGN_LAYERS, energy=[0.5], output_dir=str(root / "pruning"))
    run = trainer(
        WORLD_SIZE,
        [factors, pruning, ModelCheckpoint(dirpath=root / "checkpoints", save_top_k=0, save_last=True)],
        root,
        strategy=fsdp2(WORLD_SIZE, save_distributed_checkpoint=False),
        max_steps=2,
        limit_val_batches=1,
        enable_checkpointing=True,
    )
    run.fit(ForeignLM(), datamodule=RandomTokensData())
    refused = None
    try:
        trainer(
            WORLD_SIZE,
            [KFACPruning(layers=FOREIGN_LAYERS, energy=[0.5], output_dir=str(root / "refused"))],
            root,
            max_steps=1,
        ).fit(ForeignLM(), datamodule=RandomTokensData())
    except ValueError as error:
        refused = str(error)
    return {"rows": [row.__dict__ for row in pruning.rows], "refused": refused}


def fsdp1_facts() -> dict:
    """FSDP1 (torch's FullyShardedDataParallel, one unit per decoder layer, fully sharded over the two ranks): what
    the probe and the factor checks read within :func:`whole_parameters` — clean layer names, the unwrapped model's
    fingerprint, whole weights."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    module = tiny_lm()
    reference = {name: m.weight.detach().clone() for name, m in named_linear_modules(module).items()}
    fingerprint = model_fingerprint(module)
    layer = type(module.model.model.layers[0])
    wrapped = FullyShardedDataParallel(
        module, auto_wrap_policy=ModuleWrapPolicy({layer}), device_id=torch.device("cpu"), use_orig_params=True
    )
    batch = RandomTokens()[0]
    wrapped(batch["input_ids"][None], batch["attention_mask"][None])
    outside = {tuple(p.shape) for name, p in module.named_parameters() if name.endswith("up_proj.weight")}
    with whole_parameters(wrapped):  # the root wrapper, as the probe passes the strategy's model
        modules = named_linear_modules(module)
        same = all(torch.equal(modules[name].weight, weight) for name, weight in reference.items())
        return {
            "names": sorted(modules) == sorted(reference),
            "weights": same,
            "fingerprint": model_fingerprint(module) == fingerprint,
            "sharded_outside": outside != {(TINY_OLMO2["intermediate_size"], TINY_OLMO2["hidden_size"])},
        }


def worker(root: Path) -> None:
    torch.set_num_threads(1)
    result = {"validate": validate_runs(root / "world2", WORLD_SIZE), "prune": prune_run(root / "prune")}
    result["fsdp1"] = fsdp1_facts()
    if int(os.environ["LOCAL_RANK"]) == 0:
        (root / "result.json").write_text(json.dumps(result, default=str))


# -- the test -----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(root: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(WORLD_SIZE)}
    env.update({"NODE_RANK": "0", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    return [
        subprocess.Popen(
            [sys.executable, __file__, str(root)],
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(WORLD_SIZE)
    ]


def _assert_same_factors(two_path: str, one_path: str, module: torch.nn.Module) -> None:
    one, two = load_factors(one_path, module), load_factors(two_path, module)
    assert list(two.layers) == list(one.layers)
    for name in one.layers:
        x, y = one.layers[name], two.layers[name]
        assert (x.count_A, x.count_G) == (y.count_A, y.count_G)
        torch.testing.assert_close(y.eigvals_A, x.eigvals_A, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(y.eigvals_G, x.eigvals_G, rtol=RTOL, atol=ATOL)
        for a, b in ((x.eigvecs_A, y.eigvecs_A), (x.eigvecs_G, y.eigvecs_G)):  # the factors, not the eigenbases' signs
            va, vb = (x.eigvals_A, y.eigvals_A) if a is x.eigvecs_A else (x.eigvals_G, y.eigvals_G)
            torch.testing.assert_close(b @ torch.diag(vb) @ b.T, a @ torch.diag(va) @ a.T, rtol=RTOL, atol=ATOL)
    if not two_path.endswith(".index.json"):
        return
    index = json.loads(Path(two_path).read_text())
    dims = {n: (info["in_features"], info["out_features"]) for n, info in index["layers"].items()}
    owners = assign_owners({n: a * a + g * g for n, (a, g) in dims.items()}, WORLD_SIZE)
    assert {n: info["owner"] for n, info in index["layers"].items()} == owners
    assert index["world_size"] == WORLD_SIZE if "world_size" in index else True


def _probe_table(rows: list[dict]) -> dict:
    return {(r["layer"], r["band"], r["group"], r["basis"], r["statistic"]): (r["mean"], r["n"]) for r in rows}


def test_fsdp2_two_gloo_processes_match_one_process(tmp_path):
    processes = _launch(tmp_path)
    single = validate_runs(tmp_path / "world1", 1)  # meanwhile, in this process
    outputs = [process.communicate(timeout=600)[0].decode(errors="replace") for process in processes]
    assert [p.returncode for p in processes] == [0] * WORLD_SIZE, outputs[0][-4000:] + outputs[1][-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    two = result["validate"]

    # The parameters really were sharded (DTensors), and the ranks together read every token once.
    assert two["sharded"] and not single["sharded"]
    assert two["tokens"] == single["tokens"] == int(RandomTokens().mask.sum())
    for key, module in (("lm", tiny_lm()), ("foreign", ForeignLM()), ("vit", tiny_vit())):
        _assert_same_factors(two["indexes"][key], single["indexes"][key], module)
    _assert_same_factors(two["file"], single["indexes"]["lm"], tiny_lm())

    # The probe: the same band statistics (K-FAC and SVD bases, every group) as one process.
    for key in ("foreign", "vit"):
        want, got = _probe_table(single["probes"][key]), _probe_table(two["probes"][key])
        assert got.keys() == want.keys() and len(want) > 0
        for cell, (mean, n) in want.items():
            assert got[cell][1] == n, cell
            assert got[cell][0] == pytest.approx(mean, rel=1e-6, abs=1e-12, nan_ok=True), cell

    # Pruning at fit end: rank zero edits the full checkpoint and scores it with an unsharded copy of the module.
    rows = result["prune"]["rows"]
    assert [row["method"] for row in rows] == ["kfac"]
    row = rows[0]
    assert row["edited_checkpoint"] and Path(row["edited_checkpoint"]).exists()
    assert row["before"]["val_loss"] > 0 and row["after"]["val_loss"] > 0
    assert row["after"]["val_loss"] != row["before"]["val_loss"]
    edited = torch.load(row["edited_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    original = torch.load(row["source_checkpoint"], map_location="cpu", weights_only=False)
    changed = {k for k, v in edited.items() if not torch.equal(v, original["state_dict"][k])}
    assert changed == {
        "net.model.layers.0.mlp.up_proj.weight",
        "net.model.layers.1.mlp.up_proj.weight",
        "net.model.layers.0.self_attn.o_proj.weight",
    }
    assert "save_distributed_checkpoint=True" in result["prune"]["refused"]

    # FSDP1: outside, the parameters are flat shards; within whole_parameters, the probe's reads are the model's.
    assert result["fsdp1"] == {"names": True, "weights": True, "fingerprint": True, "sharded_outside": True}


def test_repeated_blocks_and_sharding_facts():
    lm, vit = tiny_lm(), tiny_vit()
    assert repeated_blocks(lm.model) == list(lm.model.model.layers)
    assert repeated_blocks(vit.model) == list(vit.model.blocks)
    assert repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())) == []
    assert not parameters_sharded(lm)
    assert shards_parameters(ModelParallelStrategy()) and not shards_parameters(pl.strategies.DDPStrategy())
    lm.configure_model()  # no device mesh (any strategy but ModelParallel): nothing happens
    assert not parameters_sharded(lm)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
