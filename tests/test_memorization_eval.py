"""The mem/ tags: logged by NoisyLabelClassifier on its own (no callback), by the MemorizationEval callback on a
plain LightningModule (same figures), on the shared schedule, never during sanity checking."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memcurve.callbacks import MemorizationEval
from memcurve.data import NoisyLabelDataModule
from memcurve.lightning_modules import NoisyLabelClassifier

MEM_TAGS = ("mem/noised_acc", "mem/gt_recovery", "mem/clean_train_acc")


class PlainClassifier(pl.LightningModule):
    """A LightningModule that knows nothing of memorization: images -> logits, validation accuracy only."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def validation_step(self, batch, batch_idx) -> None:
        accuracy = (self(batch["image"]).argmax(-1) == batch["label"]).float().mean()
        self.log("val/acc", accuracy, batch_size=len(batch["label"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def digits(**overrides) -> NoisyLabelDataModule:
    options = {"val_size": 297, "subset_size": 200, "val_subset_size": 50, "batch_size": 50, "eval_batch_size": 128}
    return NoisyLabelDataModule(**(options | overrides))


def trainer(tmp_path: Path, **overrides) -> pl.Trainer:
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**(options | overrides))


def test_noisy_label_classifier_logs_mem_tags_without_any_callback(tmp_path, tiny_vit_kwargs):
    torch.manual_seed(0)
    module = NoisyLabelClassifier(model_kwargs=tiny_vit_kwargs, warmup_epochs=0)
    run = trainer(tmp_path)
    results = run.validate(module, datamodule=digits(), verbose=False)[0]
    assert not any(isinstance(callback, MemorizationEval) for callback in run.callbacks)
    assert set(MEM_TAGS) <= set(results)
    for tag in MEM_TAGS:
        assert 0.0 <= results[tag] <= 1.0


def test_memorization_eval_on_a_plain_module_gives_the_classifier_figures(tmp_path, tiny_vit_kwargs):
    torch.manual_seed(0)
    classifier = NoisyLabelClassifier(model_kwargs=tiny_vit_kwargs, warmup_epochs=0)
    expected = trainer(tmp_path).validate(classifier, datamodule=digits(), verbose=False)[0]
    callback = MemorizationEval()
    plain = PlainClassifier(classifier.model)
    results = trainer(tmp_path, callbacks=[callback]).validate(plain, datamodule=digits(), verbose=False)[0]
    for tag in MEM_TAGS:
        assert results[tag] == expected[tag], tag
    assert callback.last_results["num_noised"] == 20 and callback.last_results["num_clean"] == 180
    # without the callback a plain module logs no mem/ tag
    bare = trainer(tmp_path).validate(plain, datamodule=digits(), verbose=False)[0]
    assert not set(MEM_TAGS) & set(bare)


@pytest.mark.parametrize("use_callback", [False, True])
def test_schedule_every_n_epochs_and_the_last_never_the_sanity_check(tmp_path, tiny_vit_kwargs, use_callback):
    torch.manual_seed(0)
    classifier = NoisyLabelClassifier(
        model_kwargs=tiny_vit_kwargs, warmup_epochs=0, memorization_eval_every_n_epochs=0 if use_callback else 2
    )
    module = PlainClassifier(classifier.model) if use_callback else classifier
    callbacks = [MemorizationEval(every_n_epochs=2)] if use_callback else []
    logger = TensorBoardLogger(tmp_path, name="run")
    run = trainer(tmp_path, max_epochs=3, logger=logger, callbacks=callbacks, num_sanity_val_steps=1)
    run.fit(module, datamodule=digits(subset_size=100, val_subset_size=20))
    events = EventAccumulator(str(next(Path(run.log_dir).glob("events.out.tfevents.*"))))
    events.Reload()
    steps_per_epoch = 2  # 100 images, batches of 50
    for tag in MEM_TAGS:
        # epochs 2 (every 2nd) and 3 (the last), never the sanity check at step 0
        assert [event.step for event in events.Scalars(tag)] == [2 * steps_per_epoch - 1, 3 * steps_per_epoch - 1]


def test_a_datamodule_without_a_memorization_pass_is_an_error(tmp_path, tiny_vit_kwargs):
    plain = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8)))
    module = NoisyLabelClassifier(model_kwargs=tiny_vit_kwargs)
    with pytest.raises(ValueError, match=r"memorization_eval_every_n_epochs=1 needs a datamodule .*=0 to turn"):
        trainer(tmp_path).fit(module, train_dataloaders=plain, val_dataloaders=plain)
    # validate() on given loaders scores just them (how a held-out split is scored): no error, no mem/ pass.
    with pytest.raises(ValueError, match="MemorizationEval needs a datamodule with a memorization_dataloader"):
        trainer(tmp_path, callbacks=[MemorizationEval()]).validate(
            PlainClassifier(module.model), dataloaders=plain, verbose=False
        )
