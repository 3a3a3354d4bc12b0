"""The memory plan of a factor pass: numbers against a hand computation, the table, the budget error."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from memcurve.callbacks import KFACFactors
from memcurve.curvature import FactorSettings, MemoryPlanError, plan_memory
from memcurve.curvature.memory_plan import format_bytes
from memcurve.lightning_modules import CausalLMModule
from memcurve.tiny import TINY_OLMO2

# Layer a: A 3x3, G 5x5 (owner 0); layer b: A 2x2, G 4x4 (owner 1); float32 sums (4 bytes).
DIMS = {"a": (3, 5), "b": (2, 4)}
OWNERS = {"a": 0, "b": 1}
A_SUM = {"a": 9 * 4, "b": 4 * 4}
G_SUM = {"a": 25 * 4, "b": 16 * 4}
RESULT = {"a": 8 * (9 + 3 + 25 + 5), "b": 8 * (4 + 2 + 16 + 4)}  # float64 eigenvalues + eigenvectors
WORKSPACE = {"a": (9 + 25) * 4 + 4 * 8 * 25, "b": (4 + 16) * 4 + 4 * 8 * 16}  # normalised factors + eigh of the larger
BUFFER = 25 * 4  # the reduction's copy of the largest matrix


def test_plan_matches_a_hand_computation():
    plan = plan_memory(DIMS, OWNERS, world_size=2)
    for layer in plan.layers:
        n = layer.name
        assert (layer.A_sum, layer.G_sum, layer.result, layer.workspace) == (
            A_SUM[n],
            G_SUM[n],
            RESULT[n],
            WORKSPACE[n],
        )
    every_sum = sum(A_SUM.values()) + sum(G_SUM.values())
    for rank in plan.ranks:
        n = "ab"[rank.rank]
        assert rank.layers == (n,)
        assert rank.collect == every_sum + BUFFER  # every rank accumulates every layer
        assert rank.owner == A_SUM[n] + G_SUM[n] + WORKSPACE[n] + RESULT[n]
        assert rank.host == RESULT[n]
    assert plan.peak == A_SUM["a"] + G_SUM["a"] + WORKSPACE["a"] + RESULT["a"] == 1408

    separate = plan_memory(DIMS, OWNERS, world_size=2, separate_passes=True)
    assert separate.ranks[0].collect == max(sum(A_SUM.values()), sum(G_SUM.values())) + BUFFER == 264

    offloaded = plan_memory(DIMS, OWNERS, world_size=2, offload_to_cpu=True)
    assert [(r.collect, r.owner) for r in offloaded.ranks] == [(BUFFER, 0), (BUFFER, 0)]
    assert offloaded.ranks[0].host == A_SUM["a"] + G_SUM["a"] + WORKSPACE["a"] + RESULT["a"] + RESULT["a"]

    alone = plan_memory(DIMS, {"a": 0, "b": 0}, world_size=1, dtype="float64", store="factors")
    (rank,) = alone.ranks
    assert rank.collect == 2 * every_sum  # float64, no reduction buffer
    assert rank.owner == 2 * every_sum + 2 * max((9 + 25) * 4, (4 + 16) * 4) * 2


def test_table_and_budget_error():
    plan = plan_memory(DIMS, OWNERS, world_size=2)
    table = plan.table()
    assert "K-FAC memory plan: 2 layers, world size 2, float32 sums" in table
    assert table.count("\n") == 1 + 1 + 2 + 1 + 2 + 1 - 1  # head, layer header, 2 layers, rank header, 2 ranks, total
    plan.check(None)
    plan.check(1408e-9)  # exactly fits
    with pytest.raises(MemoryPlanError, match=r"1.4 kB of device memory on rank 0.*memory_budget_gb=1e-06") as error:
        plan.check(1e-6)
    message = str(error.value)
    assert "restrict `layers`" in message and "separate_passes=True" in message
    assert f"offload_to_cpu=True (device peak {format_bytes(BUFFER)})" in message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float16"}, r"dtype='float16' is not supported"),
        ({"store": "both"}, r"store='both' is not supported"),
        ({"world_size": 1}, r"world_size=1 must be a positive integer above every owner rank"),
    ],
)
def test_bad_plan_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_memory(DIMS, OWNERS, **{"world_size": 2, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"memory_budget_gb": 0}, ValueError, r"memory_budget_gb=0 must be a positive number of GB or None"),
        ({"sharded": "yes"}, TypeError, r"sharded='yes' must be True or False"),
        ({"sharded": True, "filename": "kfac.pt"}, ValueError, r"sharded=True needs a '<stem>.safetensors' name"),
    ],
)
def test_bad_callback_options(kwargs, error, message):
    with pytest.raises(error, match=message):
        settings = FactorSettings(**{k: v for k, v in kwargs.items() if k != "filename"})
        KFACFactors(layers=["model.*"], settings=settings, filename=kwargs.get("filename"))


def test_callback_refuses_to_start_above_the_budget(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(dict(TINY_OLMO2))
    budget = FactorSettings(memory_budget_gb=1e-6)
    callback = KFACFactors(layers=["model.model.layers.*.mlp.up_proj"], settings=budget, when="validate")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False)
    loader = torch.utils.data.DataLoader([{"input_ids": torch.ones(4, dtype=torch.long)}], batch_size=1)
    with pytest.raises(MemoryPlanError, match=r"above memory_budget_gb=1e-06"):
        trainer.validate(module, dataloaders=loader, verbose=False)
    assert callback.memory_plan is not None and callback.memory_plan.peak > 1000
