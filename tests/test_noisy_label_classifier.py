"""NoisyLabelClassifier: construction checks, schedule, TensorBoard tags, resume, and DDP = 1 process."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memcurve.callbacks import MemorizationEval
from memcurve.data import NoisyLabelDataModule
from memcurve.lightning_modules import NoisyLabelClassifier, warmup_cosine_factor
from memcurve.metrics import evaluate_memorization

EXPECTED_TAGS = {
    "train/loss_step",
    "train/loss_epoch",
    "train/acc",
    "val/acc",
    "val/loss",
    "mem/noised_acc",
    "mem/gt_recovery",
    "mem/clean_train_acc",
}


def tiny_model(tiny_vit_kwargs, **overrides) -> NoisyLabelClassifier:
    options = {"model_kwargs": tiny_vit_kwargs, "lr": 3e-3, "warmup_epochs": 1}
    options.update(overrides)
    return NoisyLabelClassifier(**options)


def small_digits(**overrides) -> NoisyLabelDataModule:
    options = {"val_size": 297, "subset_size": 300, "val_subset_size": 100, "batch_size": 50, "eval_batch_size": 128}
    options.update(overrides)
    return NoisyLabelDataModule(**options)


def trainer(tmp_path: Path, **overrides) -> pl.Trainer:
    options = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": TensorBoardLogger(tmp_path, name="run"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    options.update(overrides)
    return pl.Trainer(**options)


def test_warmup_then_cosine():
    factors = [warmup_cosine_factor(step, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for step in range(15)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))


def test_fit_logs_every_tag_to_tensorboard(tmp_path, tiny_vit_kwargs):
    pl.seed_everything(0)
    fit_trainer = trainer(tmp_path)
    fit_trainer.fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits())
    event_files = list(Path(fit_trainer.log_dir).glob("events.out.tfevents.*"))
    assert event_files
    accumulator = EventAccumulator(str(event_files[0]))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert EXPECTED_TAGS <= tags, EXPECTED_TAGS - tags
    values = {tag: accumulator.Scalars(tag)[-1].value for tag in EXPECTED_TAGS}
    for tag in ("val/acc", "mem/noised_acc", "mem/gt_recovery", "mem/clean_train_acc", "train/acc"):
        assert 0.0 <= values[tag] <= 1.0
    assert (Path(fit_trainer.log_dir) / "label_noise.json").is_file()


def test_memorization_metrics_match_a_plain_loop(tmp_path, tiny_vit_kwargs):
    datamodule = small_digits()
    model = tiny_model(tiny_vit_kwargs)
    results = trainer(tmp_path).validate(model, datamodule=datamodule, verbose=False)[0]
    model.eval()
    preds, noisy, true, noised = [], [], [], []
    with torch.no_grad():
        for index in range(len(datamodule.train_eval_set)):
            item = datamodule.train_eval_set[index]
            preds.append(int(model(item["image"][None]).argmax()))
            noisy.append(int(item["label"]))
            true.append(int(item["true_label"]))
            noised.append(bool(item["is_noised"]))
    mem = [p == n for p, n, m in zip(preds, noisy, noised) if m]
    gt = [p == t for p, t, m in zip(preds, true, noised) if m]
    clean = [p == t for p, t, m in zip(preds, true, noised) if not m]
    assert results["mem/noised_acc"] == pytest.approx(sum(mem) / len(mem))
    assert results["mem/gt_recovery"] == pytest.approx(sum(gt) / len(gt))
    assert results["mem/clean_train_acc"] == pytest.approx(sum(clean) / len(clean))


def test_resume_restores_and_verifies_noise(tmp_path, tiny_vit_kwargs):
    first = trainer(tmp_path, max_epochs=1)
    first.fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits())
    checkpoint = next(Path(first.log_dir).glob("checkpoints/*.ckpt"))
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["NoisyLabelDataModule"]["label_noise"]["num_noised"] == 30
    resumed = trainer(tmp_path, max_epochs=2)
    resumed.fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits(), ckpt_path=checkpoint)
    assert resumed.current_epoch == 2
    with pytest.raises(ValueError, match="label noise saved in the checkpoint does not match"):
        trainer(tmp_path, max_epochs=2).fit(
            tiny_model(tiny_vit_kwargs), datamodule=small_digits(seed=1), ckpt_path=checkpoint
        )


def _ddp_validate(tmp_path, tiny_vit_kwargs, devices):
    torch.manual_seed(0)
    model = tiny_model(tiny_vit_kwargs)
    strategy = "ddp_spawn" if devices > 1 else "auto"
    run = trainer(tmp_path, devices=devices, strategy=strategy, logger=False)
    # 300 training / 100 validation images with eval batches of 128: shards are uneven across 2 ranks.
    return run.validate(model, datamodule=small_digits(), verbose=False)[0]


def test_two_gloo_processes_give_the_single_process_metrics(tmp_path, tiny_vit_kwargs):
    single = _ddp_validate(tmp_path, tiny_vit_kwargs, devices=1)
    double = _ddp_validate(tmp_path, tiny_vit_kwargs, devices=2)
    for tag in ("val/acc", "mem/noised_acc", "mem/gt_recovery", "mem/clean_train_acc"):
        assert double[tag] == pytest.approx(single[tag], abs=1e-7), tag


def test_evaluate_memorization_restores_train_mode(tiny_vit_kwargs):
    model = tiny_model(tiny_vit_kwargs)
    model.train()
    datamodule = small_digits()
    datamodule.setup("fit")
    results = evaluate_memorization(model, datamodule.memorization_dataloader())
    assert model.training and results["num_noised"] == 30 and results["num_clean"] == 270


def test_unknown_timm_model_name():
    message = r"model_name='vit_tinyy_patch16_224' is not a timm model.*vit_tiny_patch16_224"
    with pytest.raises(ValueError, match=message):
        NoisyLabelClassifier(model_name="vit_tinyy_patch16_224")


def test_image_size_incompatible_with_patch_size(tiny_vit_kwargs):
    with pytest.raises(ValueError, match=r"img_size=\(9, 9\) is not divisible by patch_size=\(2, 2\)"):
        tiny_model({**tiny_vit_kwargs, "img_size": 9})


@pytest.mark.parametrize(
    ("model_overrides", "data_overrides", "message"),
    [
        ({"num_classes": 7}, {}, r"model num_classes=7 does not match the data: source 'digits' has 10 classes"),
        ({"model_kwargs": {"in_chans": 3}}, {}, r"in_chans=3 does not match the data's 1 channel"),
        ({}, {"image_size": 16}, r"img_size=\(8, 8\) does not match the data's image size 16"),
    ],
)
def test_model_and_data_mismatch(tmp_path, tiny_vit_kwargs, model_overrides, data_overrides, message):
    kwargs = {**tiny_vit_kwargs, **model_overrides.pop("model_kwargs", {})}
    model = tiny_model(kwargs, **model_overrides)
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path).fit(model, datamodule=small_digits(**data_overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_classes": 1}, "num_classes=1 must be an integer >= 2"),
        ({"lr": -1.0}, "lr=-1.0 must be >= 0"),
        ({"label_smoothing": 1.0}, r"label_smoothing=1.0 must be in \[0, 1\)"),
        ({"memorization_eval_every_n_epochs": -2}, "memorization_eval_every_n_epochs=-2"),
    ],
)
def test_bad_hyperparameters(tiny_vit_kwargs, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(tiny_vit_kwargs, **overrides)


def test_memorization_eval_needs_a_noisy_label_datamodule(tmp_path, tiny_vit_kwargs):
    with pytest.raises(ValueError, match="every_n_epochs=0 must be a positive integer"):
        MemorizationEval(every_n_epochs=0)
    plain = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8)))
    with pytest.raises(ValueError, match="needs a datamodule with a memorization_dataloader"):
        trainer(tmp_path).fit(tiny_model(tiny_vit_kwargs), train_dataloaders=plain, val_dataloaders=plain)


def test_validate_on_given_loaders_scores_them_without_the_memorization_pass(tmp_path, tiny_vit_kwargs):
    """How a held-out split is scored: validate(dataloaders=...) logs val/ only and reads no memorized set."""
    images, labels = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    dataset = [{"image": x, "label": y} for x, y in zip(images, labels)]
    plain = torch.utils.data.DataLoader(dataset, batch_size=4)
    results = trainer(tmp_path).validate(tiny_model(tiny_vit_kwargs), dataloaders=plain, verbose=False)[0]
    assert "val/acc" in results and not any(key.startswith("mem/") for key in results)
