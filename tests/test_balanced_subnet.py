"""BalancedSubnet: exact mask ratio, straight-through gradients, untouched weights, the forget/retain trade-off on a
tiny problem, the edited-checkpoint export of BalancedSubnetPruning, and misconfiguration."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import memcurve.callbacks.checkpoint_pruning as checkpoint_pruning
from memcurve.callbacks import BalancedSubnetPruning
from memcurve.curvature import (
    MaskedWeights,
    apply_masks,
    mask_edits,
    mask_ste,
    topk_keep_mask,
    train_balanced_subnet,
)
from memcurve.curvature.balanced_subnet import num_pruned
from memcurve.data import NoisyLabelDataModule
from memcurve.editing import EDIT_KEY, EDITED_FOLDER, BalancedSubnetSettings, EditRequest
from memcurve.editing.request import layers_id
from memcurve.lightning_modules import NoisyLabelClassifier

LAYERS = ["0", "2"]
MASKED = ["model.blocks.*.mlp.fc1", "model.blocks.*.mlp.fc2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# -- a tiny problem: an MLP that memorized 24 flipped labels among 240 linearly separable points --------------------
def xy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def mean_loss(model: nn.Module, batches) -> float:
    with torch.no_grad():
        total = sum(float(xy_loss(model, batch)) * len(batch[1]) for batch in batches)
    return total / sum(len(batch[1]) for batch in batches)


@pytest.fixture(scope="module")
def memorized_mlp():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(240, 16, generator=generator)
    y = (x @ torch.randn(16, 4, generator=generator)).argmax(1)
    forget = torch.zeros(240, dtype=torch.bool)
    forget[:24] = True
    y[forget] = (y[forget] + 1) % 4  # flipped labels: only memorization fits them
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    forget_batches = [(x[forget][i : i + 8], y[forget][i : i + 8]) for i in range(0, 24, 8)]
    retain_batches = [(x[~forget][i : i + 36], y[~forget][i : i + 36]) for i in range(0, 216, 36)]
    return model, forget_batches, retain_batches


def masked_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    edited = copy.deepcopy(model)
    edited.load_state_dict(apply_masks(model.state_dict(), masks))
    return edited


# -- the mask --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "ratio"), [((64, 16), 0.0015), ((64, 16), 0.1), ((7, 13), 0.5), ((4, 64), 0.99)])
def test_mask_prunes_exactly_round_ratio_of_smallest_scores(shape, ratio):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = topk_keep_mask(scores, ratio)
    pruned = math.floor(ratio * scores.numel() + 0.5)
    assert mask.dtype == torch.bool and mask.shape == scores.shape and int((~mask).sum()) == pruned
    if 0 < pruned < scores.numel():  # brute force: every pruned |score| <= every kept |score|
        assert scores.abs()[~mask].max() <= scores.abs()[mask].min()


def test_mask_ties_break_by_index():
    mask = topk_keep_mask(torch.ones(3, 4), 0.25)
    assert (~mask).flatten().nonzero().flatten().tolist() == [0, 1, 2]
    assert num_pruned(1000, 0.0015) == 2 and num_pruned(1000, 0.0025) == 3  # halves round up


def test_straight_through_gradient_reaches_scores():
    weight = torch.randn(6, 5, dtype=torch.float64)
    scores = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    mask = mask_ste(scores, 0.3)
    assert torch.equal(mask, topk_keep_mask(scores, 0.3).double())
    (weight * mask).sum().backward()
    assert torch.equal(scores.grad, weight * scores.detach().sign())  # d mask/d|s| = identity


def test_masked_forward_leaves_model_untouched_and_trains_scores_only(memorized_mlp):
    model, forget_batches, _ = memorized_mlp
    state = {key: value.clone() for key, value in model.state_dict().items()}
    keys = list(model.state_dict())
    with MaskedWeights(model, LAYERS, ratio=0.1, seed=3) as masked:
        assert not any(parameter.requires_grad for parameter in model.parameters())
        loss = masked.call(xy_loss, forget_batches[0])
        loss.backward()
        assert list(model.state_dict()) == keys  # no module replaced, no key renamed
        masks = masked.keep_masks()
    assert all(parameter.requires_grad and parameter.grad is None for parameter in model.parameters())
    assert all(bool(masked.scores[name].grad.abs().sum() > 0) for name in LAYERS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # bitwise
    # The masked forward is the model with the masked weights.
    assert float(loss) == pytest.approx(float(xy_loss(masked_copy(model, masks), forget_batches[0])), rel=1e-6)


def test_training_forgets_the_memorized_set_and_keeps_the_rest(memorized_mlp):
    model, forget_batches, retain_batches = memorized_mlp
    state = {key: value.clone() for key, value in model.state_dict().items()}
    forget_before, retain_before = mean_loss(model, forget_batches), mean_loss(model, retain_batches)
    result = train_balanced_subnet(model, LAYERS, forget_batches, retain_batches, xy_loss, ratio=0.1)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert model.training  # mode restored
    assert [int((~mask).sum()) for mask in result.masks.values()] == [102, 26]  # round(0.1 · 1024), round(0.1 · 256)
    assert len(result.history) == 5 and result.history[0]["steps"] == 6
    edited = masked_copy(model, result.masks)
    forget_after, retain_after = mean_loss(edited, forget_batches), mean_loss(edited, retain_batches)
    random = {name: topk_keep_mask(torch.rand(mask.shape), 0.1) for name, mask in result.masks.items()}
    forget_random = mean_loss(masked_copy(model, random), forget_batches)
    assert forget_before < 0.01 and retain_before < 0.01
    assert forget_after > 1.0 and forget_after > 2 * forget_random  # targeted, not just any 10% of the weights
    assert retain_after < 0.2
    again = train_balanced_subnet(model, LAYERS, forget_batches, retain_batches, xy_loss, ratio=0.1)
    assert all(torch.equal(again.masks[name], result.masks[name]) for name in LAYERS)  # seeded


def test_training_works_inside_inference_mode(memorized_mlp):
    """A checkpoint written from a validation hook arrives under torch.inference_mode."""
    model, forget_batches, retain_batches = memorized_mlp
    with torch.inference_mode():
        result = train_balanced_subnet(model, LAYERS, forget_batches, retain_batches, xy_loss, ratio=0.1, epochs=1)
    assert [int((~mask).sum()) for mask in result.masks.values()] == [102, 26]


def test_apply_masks_copies_and_reports(memorized_mlp):
    model, _, _ = memorized_mlp
    state = model.state_dict()
    masks = {"0": topk_keep_mask(state["0.weight"], 0.25)}
    edited = apply_masks(state, masks)
    assert edited["0.weight"] is not state["0.weight"] and edited["2.weight"] is state["2.weight"]
    assert torch.equal(edited["0.weight"], state["0.weight"] * masks["0"])
    assert int((edited["0.weight"] == 0).sum()) == 256
    assert torch.equal(edited["0.bias"], state["0.bias"])
    edit = mask_edits(state, edited, masks)["0"]
    assert (edit.kept_pairs, edit.total_pairs, edit.method) == (768, 1024, "balanced_subnet")
    assert edit.change_norm == pytest.approx(float((state["0.weight"] * ~masks["0"]).norm()), rel=1e-6)
    assert 0 < edit.energy_kept < 1 and math.isnan(edit.threshold)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ratio": 0}, ValueError, r"ratio=0 must be a number in \(0, 1\)"),
        ({"ratio": 1.5}, ValueError, r"ratio=1.5 must be a number in \(0, 1\)"),
        ({"ratio": 1.0}, ValueError, r"ratio=1.0 must be a number in \(0, 1\)"),
        ({"ratio": 0.001}, ValueError, r"ratio=0.001 prunes no weight of layer '2' \(256 weights\)"),
        ({"retain_weight": 1.5}, ValueError, r"retain_weight=1.5 must be in \[0.0, 1.0\]"),
        ({"epochs": 0}, ValueError, r"epochs=0 must be a positive integer"),
        ({"lr": 0.0}, ValueError, r"lr=0.0 must be in \(0.0, inf\]"),
        ({"score_init": "zeros"}, ValueError, r"score_init='zeros' is not supported"),
        ({"forget_batches": []}, ValueError, r"forget_batches is empty: BalancedSubnet needs examples to forget"),
        ({"retain_batches": []}, ValueError, r"retain_batches is empty"),
        ({"forget_batches": iter([1])}, TypeError, r"forget_batches must be re-iterable"),
        ({"layer_names": []}, ValueError, r"layer_names is empty"),
        ({"layer_names": ["1"]}, TypeError, r"layer '1' is a ReLU; BalancedSubnet masks nn.Linear weights only"),
        ({"layer_names": ["9"]}, ValueError, r"layer '9' is not a module of the model"),
    ],
)
def test_misconfiguration(memorized_mlp, kwargs, error, message):
    model, forget_batches, retain_batches = memorized_mlp
    arguments = {"layer_names": LAYERS, "forget_batches": forget_batches, "retain_batches": retain_batches}
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        train_balanced_subnet(
            model, arguments.pop("layer_names"), arguments.pop("forget_batches"), arguments.pop("retain_batches"),
            xy_loss, **{"ratio": 0.1, **arguments},
        )  # fmt: skip


# -- the callback on a tiny ViT --------------------------------------------------------------------------------
def tiny_model(tiny_vit_kwargs) -> NoisyLabelClassifier:
    torch.manual_seed(0)
    return NoisyLabelClassifier(
        model_kwargs=tiny_vit_kwargs, lr=3e-3, warmup_epochs=0, memorization_eval_every_n_epochs=0
    )


def small_digits(**overrides) -> NoisyLabelDataModule:
    options = {"val_size": 297, "subset_size": 150, "val_subset_size": 60, "batch_size": 50, "eval_batch_size": 75}
    return NoisyLabelDataModule(**{**options, **overrides})


def fit(tmp_path: Path, model, callbacks, datamodule=None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(save_last=True, save_top_k=-1, every_n_epochs=1), *callbacks],
    )
    trainer.fit(model, datamodule=datamodule or small_digits())
    return trainer


def test_callback_exports_a_pruned_checkpoint_and_report(tmp_path, tiny_vit_kwargs, monkeypatch):
    lines = []
    monkeypatch.setattr(checkpoint_pruning, "rank_zero_info", lines.append)  # what the callback logs
    model = tiny_model(tiny_vit_kwargs)
    settings = BalancedSubnetSettings(epochs=2, batch_size=32)
    pruning = BalancedSubnetPruning(layers=MASKED, ratio=[0.01, 0.05], settings=settings, when="fit_end")
    trainer = fit(tmp_path, model, [pruning])
    folder = Path(trainer.log_dir) / "checkpoints"
    original = torch.load(folder / "fit-end.ckpt", weights_only=False)["state_dict"]
    for key, value in model.state_dict().items():  # the live model was never masked
        assert torch.equal(value, original[key]), key
    r001, r005 = (EditRequest("bsn", MASKED, ratio=ratio) for ratio in (0.01, 0.05))
    assert r001.tag == f"bsn-r0.01-L{layers_id(MASKED)}"
    pruned = torch.load(folder / EDITED_FOLDER / f"fit-end-{r001.tag}.ckpt", weights_only=False)
    assert pruned[EDIT_KEY]["method"] == "bsn" and pruned[EDIT_KEY]["ratio"] == 0.01
    changed = {key for key, value in pruned["state_dict"].items() if not torch.equal(value, original[key])}
    assert changed == {f"model.blocks.{b}.mlp.fc{f}.weight" for b in (0, 1) for f in (1, 2)}
    for key in changed:  # exactly round(0.01 · 4096) = 41 weights masked per layer
        newly_zero = (pruned["state_dict"][key] == 0) & (original[key] != 0)
        assert int(newly_zero.sum()) == 41, key
    rows = json.loads((Path(trainer.log_dir) / "pruning" / "pruning_report.json").read_text())
    assert [(row["method"], row["ratio"], row["tag"]) for row in rows] == [
        ("bsn", 0.01, r001.tag),
        ("bsn", 0.05, r005.tag),
    ]
    assert [row["total_pairs"] - row["kept_pairs"] for row in rows] == [4 * 41, 4 * 205]
    metrics = {"val/acc", "mem/noised_acc", "mem/gt_recovery", "mem/clean_train_acc"}
    assert set(rows[0]["before"]) == set(rows[0]["after"]) == metrics
    reloaded = NoisyLabelClassifier.load_from_checkpoint(folder / EDITED_FOLDER / f"fit-end-{r005.tag}.ckpt")
    datamodule = small_digits()
    datamodule.setup("fit")
    assert reloaded.evaluation_metrics(datamodule) == pytest.approx(rows[1]["after"])
    # The mask-training losses (first -> last epoch) are logged as one line per edit.
    for tag in (r001.tag, r005.tag):
        assert any(line.startswith(f"memcurve: {tag}: mask training loss forget ") for line in lines), lines


def test_callback_after_every_checkpoint_logs_to_tensorboard(tmp_path, tiny_vit_kwargs):
    """ModelCheckpoint saves from the validation hook (inference mode): the mask still trains."""
    layers = ["model.blocks.1.mlp.fc2"]
    pruning = BalancedSubnetPruning(
        layers=layers, ratio=0.01, settings=BalancedSubnetSettings(epochs=1), when="checkpoint"
    )
    trainer = fit(tmp_path, tiny_model(tiny_vit_kwargs), [pruning])
    folder = Path(trainer.log_dir) / "checkpoints" / EDITED_FOLDER
    tag = EditRequest("bsn", layers, ratio=0.01).tag
    assert (folder / f"epoch=0-step=3-{tag}.ckpt").is_file() and (folder / f"last-{tag}.ckpt").is_file()
    events = EventAccumulator(str(next(Path(trainer.log_dir).glob("events.out.tfevents.*"))))
    events.Reload()
    curve = f"prune/bsn/ratio/L{layers_id(layers)}"
    steps = {event.step for event in events.Scalars(f"{curve}/mem/noised_acc")}
    assert steps == {0, 10_000}  # unedited at 0, the edit at its ratio in parts per million
    strength = events.Scalars(f"{curve}/strength")  # the exact ratio, once per checkpoint (epoch 0, last)
    assert [(event.step, event.value) for event in strength] == [(10_000, pytest.approx(0.01))] * 2


def test_module_data_forget_is_the_noised_set(tiny_vit_kwargs):
    datamodule = small_digits()
    datamodule.setup("fit")
    forget, retain = tiny_model(tiny_vit_kwargs).balanced_subnet_data(datamodule, batch_size=8, max_retain=40)
    forget_rows = [row for batch in forget for row in zip(batch["is_noised"], batch["label"], batch["true_label"])]
    assert len(forget_rows) == 15 and all(noised and label != true for noised, label, true in forget_rows)
    retain_flags = torch.cat([batch["is_noised"] for batch in retain])
    assert len(retain_flags) == 40 and not retain_flags.any()


def test_request_tag_and_callback_misconfiguration(tiny_vit_kwargs):
    masked = layers_id(MASKED)
    assert EditRequest("bsn", MASKED, ratio=0.0015).tag == f"bsn-r0.0015-L{masked}"  # the ratio, never rounded
    assert EditRequest("svd", MASKED, energy=0.9).tag == f"svd-e0.9-L{masked}"
    assert [r.tag for r in BalancedSubnetPruning(layers=MASKED).requests] == [f"bsn-r0.0015-L{masked}"]  # default
    for kwargs, message in [
        ({"ratio": 0.0}, r"ratio=0.0 must be a number in \(0, 1\)"),
        ({"ratio": [0.01, 1.5]}, r"ratio=1.5 must be a number in \(0, 1\)"),
        ({"ratio": []}, r"method='bsn' needs at least one ratio value; got none"),
        ({"ratio": [0.01, 0.01]}, r"the same edit is requested twice"),
        ({"when": "epoch"}, r"when='epoch' is not supported"),
        ({"layers": []}, r"layers=\[\] must name at least one layer pattern"),
    ]:
        with pytest.raises(ValueError, match=message):
            BalancedSubnetPruning(**{"layers": MASKED, **kwargs})
    # The mask-training settings are validated where they are built (BalancedSubnetSettings), before any callback.
    for kwargs, message in [
        ({"retain_weight": -0.1}, r"retain_weight=-0.1 must be a number in \[0.0, 1.0\]"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"score_init": "ones"}, r"score_init='ones' is not supported"),
    ]:
        with pytest.raises(ValueError, match=message):
            BalancedSubnetPruning(layers=MASKED, settings=BalancedSubnetSettings(**kwargs))
    with pytest.raises(TypeError, match=r"settings must be a BalancedSubnetSettings, not dict"):
        BalancedSubnetPruning(layers=MASKED, settings={"epochs": 1})
    datamodule = small_digits(noise_fraction=0.0)
    datamodule.setup("fit")
    with pytest.raises(ValueError, match=r"no noised examples \(noise_fraction=0\): BalancedSubnet needs a forget"):
        tiny_model(tiny_vit_kwargs).balanced_subnet_data(datamodule, batch_size=8)
    pruning = BalancedSubnetPruning(layers=MASKED)
    with pytest.raises(TypeError, match=r"needs Linear.balanced_subnet_data and .balanced_subnet_loss"):
        pruning.setup(None, nn.Linear(2, 2), "fit")  # checked at setup, before any training
