"""NoisyLabelDataModule: splits, batches, rank/worker independence, persistence and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch

from memcurve.data import LabelNoise, NoisyLabelDataModule
from memcurve.data.noisy_label_datamodule import NOISE_FILENAME


def digits(**overrides) -> NoisyLabelDataModule:
    options = {"source": "digits", "noise_fraction": 0.1, "seed": 0, "val_size": 297, "batch_size": 64}
    options.update(overrides)
    datamodule = NoisyLabelDataModule(**options)
    datamodule.setup("fit")
    return datamodule


def fake_trainer(rank: int = 0, world_size: int = 1, log_dir=None) -> SimpleNamespace:
    logger = object() if log_dir is not None else None
    return SimpleNamespace(
        global_rank=rank, world_size=world_size, log_dir=log_dir, logger=logger, is_global_zero=rank == 0
    )


def test_digits_split_and_exact_noise():
    datamodule = digits()
    assert len(datamodule.train_set) == 1500 and len(datamodule.val_set) == 297
    assert datamodule.noise.num_noised == 150
    assert int(datamodule.train_set.is_noised.sum()) == 150
    # Train and validation images are disjoint and together the whole source.
    train, val = set(datamodule.train_set.base_indices.tolist()), set(datamodule.val_set.base_indices.tolist())
    assert not train & val and len(train | val) == 1797


def test_validation_labels_are_never_noised():
    datamodule = digits(noise_fraction=0.5)
    assert not datamodule.val_set.is_noised.any()
    assert torch.equal(datamodule.val_set.labels, datamodule.val_set.true_labels)
    for batch in datamodule.val_dataloader():
        assert torch.equal(batch["label"], batch["true_label"]) and not batch["is_noised"].any()


def test_training_batches_carry_both_labels_index_and_flag():
    datamodule = digits()
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"image", "label", "true_label", "index", "is_noised"}
    assert batch["image"].shape == (64, 1, 8, 8) and batch["image"].dtype == torch.float32
    noise = datamodule.noise
    assert torch.equal(batch["label"], noise.noisy_labels[batch["index"]])
    assert torch.equal(batch["true_label"], noise.true_labels[batch["index"]])
    assert torch.equal(batch["is_noised"], batch["label"] != batch["true_label"])


def test_normalization_uses_source_statistics():
    raw = digits(normalize=False).train_eval_set[0]["image"]
    normalized = digits().train_eval_set[0]["image"]
    info = digits().info
    assert torch.allclose(normalized, (raw - info.mean[0]) / info.std[0], atol=1e-6)


def test_same_noise_on_every_rank_and_shards_cover_the_training_set_once():
    shards, fingerprints = [], []
    for rank in range(2):
        datamodule = NoisyLabelDataModule(source="digits", val_size=297, eval_batch_size=100)
        datamodule.trainer = fake_trainer(rank=rank, world_size=2)
        datamodule.setup("fit")
        fingerprints.append(datamodule.noise.fingerprint())
        shards.append(torch.cat([batch["index"] for batch in datamodule.memorization_dataloader()]))
    assert fingerprints[0] == fingerprints[1]
    assert len(shards[0]) + len(shards[1]) == 1500
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(1500))


def test_data_and_noise_do_not_depend_on_num_workers():
    def read(num_workers):
        datamodule = digits(num_workers=num_workers, eval_batch_size=500)
        batches = list(datamodule.memorization_dataloader())
        return (
            datamodule.noise.fingerprint(),
            torch.cat([b["label"] for b in batches]),
            torch.cat([b["image"] for b in batches]),
        )

    zero, two = read(0), read(2)
    assert zero[0] == two[0]
    assert torch.equal(zero[1], two[1]) and torch.equal(zero[2], two[2])


def test_seed_changes_split_and_noise():
    assert digits(seed=0).noise.fingerprint() != digits(seed=1).noise.fingerprint()


def test_subset_is_reproducible_and_sized():
    first, again = digits(subset_size=300), digits(subset_size=300)
    assert len(first.train_set) == 300 and first.noise.num_noised == 30
    assert torch.equal(first.noise.source_indices, again.noise.source_indices)
    assert len(digits(val_subset_size=50).val_set) == 50


def test_noise_saved_beside_logs_and_verified_when_it_exists(tmp_path):
    datamodule = NoisyLabelDataModule(source="digits", val_size=297)
    datamodule.trainer = fake_trainer(log_dir=str(tmp_path))
    datamodule.setup("fit")
    saved = LabelNoise.load(tmp_path / NOISE_FILENAME)
    saved.check_matches(datamodule.noise, origin="test")
    other_seed = NoisyLabelDataModule(source="digits", val_size=297, seed=1)
    other_seed.trainer = fake_trainer(log_dir=str(tmp_path))
    with pytest.raises(ValueError, match="does not match the noise"):
        other_seed.setup("fit")


def test_checkpoint_state_round_trip_and_mismatch():
    state = digits().state_dict()
    restored = NoisyLabelDataModule(source="digits", val_size=297)
    restored.load_state_dict(state)  # before setup: checked in setup
    restored.setup("fit")
    mismatched = NoisyLabelDataModule(source="digits", val_size=297, noise_fraction=0.2)
    mismatched.load_state_dict(state)
    with pytest.raises(ValueError, match=r"saved in the checkpoint does not match.*noise_fraction: saved 0.1, now 0.2"):
        mismatched.setup("fit")


def test_noise_file_argument_is_checked(tmp_path):
    path = tmp_path / "noise.json"
    digits().noise.save(path)
    digits(noise_file=str(path))
    with pytest.raises(ValueError, match="noise_file="):
        digits(noise_file=str(path), seed=3)


def test_hf_source_with_in_memory_dataset():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(40, 4, 4, generator=generator).tolist()
    labels = torch.arange(40).remainder(4).tolist()
    features = datasets.Features(
        {"img": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))), "y": datasets.ClassLabel(4)}
    )
    table = datasets.Dataset.from_dict({"img": images, "y": labels}, features=features)
    datamodule = NoisyLabelDataModule(
        source="hf",
        root=table,
        hf_image_column="img",
        hf_label_column="y",
        val_size=8,
        noise_fraction=0.25,
        batch_size=8,
    )
    datamodule.setup("fit")
    assert datamodule.num_classes == 4 and datamodule.in_chans == 1 and datamodule.image_size == 4
    assert len(datamodule.train_set) == 32 and datamodule.noise.num_noised == 8
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (8, 1, 4, 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"source": "mnist2"}, r"source='mnist2' is not one of \('digits'"),
        ({"noise_fraction": 1.0}, r"noise_fraction=1.0 must be a number in \[0, 1\)"),
        ({"noise_fraction": -0.1}, r"noise_fraction=-0.1"),
        ({"augment": "mixup"}, r"augment='mixup' is not one of"),
        ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
        ({"val_size": 1.5}, r"val_size=1.5 as a fraction must be in \(0, 1\)"),
        ({"num_workers": -1}, r"num_workers=-1"),
        ({"image_size": 0}, r"image_size=0"),
    ],
)
def test_bad_arguments_fail_eagerly(overrides, message):
    with pytest.raises(ValueError, match=message):
        NoisyLabelDataModule(**overrides)


def test_subset_larger_than_dataset():
    message = r"subset_size=5000 is larger than the 1500 training images of source 'digits'"
    with pytest.raises(ValueError, match=message):
        digits(subset_size=5000)


def test_missing_data_root():
    datamodule = NoisyLabelDataModule(source="fashion_mnist", root="/nonexistent/fashion")
    with pytest.raises(FileNotFoundError, match=r"root='/nonexistent/fashion' does not exist"):
        datamodule.setup("fit")


def test_val_size_must_leave_training_images():
    with pytest.raises(ValueError, match="val_size=1797 holds out 1797"):
        digits(val_size=1797)
