"""A LightningDataModule that corrupts a known fraction of training labels.

Every batch is a dict with ``image``, ``label`` (the label trained on: noisy for noised training
examples), ``true_label``, ``index`` (position in the training set) and ``is_noised``, so memorization
metrics need no second lookup. Validation labels are never noised.

The noise is saved as ``label_noise.json`` in the run's log directory and inside every checkpoint (the
DataModule ``state_dict``); on resume the regenerated noise is compared with the saved one and any
difference is an error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from memcurve.data.label_noise import LabelNoise, make_symmetric_noise, seeded_rng
from memcurve.data.sources import SOURCES, ImageSplits, load_image_source, source_info
from memcurve.utils.arguments import check_positive_int
from memcurve.utils.sampling import unpadded_shard_sampler

__all__ = [
    "AUGMENTATIONS",
    "NoisyLabelDataModule",
    "NoisyLabelDataset",
]

AUGMENTATIONS = ("none", "shift", "shift_flip", "random_resized_crop")
NOISE_FILENAME = "label_noise.json"


class NoisyLabelDataset(Dataset):
    """Training or evaluation view of an image source with (possibly) corrupted labels."""

    def __init__(
        self,
        base: Dataset,
        base_indices: Tensor,
        labels: Tensor,
        true_labels: Tensor,
        transform: v2.Transform | None = None,
    ) -> None:
        self.base = base
        self.base_indices = base_indices
        self.labels = labels
        self.true_labels = true_labels
        self.is_noised = labels != true_labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base_indices)

    def __getitem__(self, index: int) -> dict[str, Tensor | int]:
        image, _ = self.base[int(self.base_indices[index])]
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "label": self.labels[index],
            "true_label": self.true_labels[index],
            "index": index,
            "is_noised": self.is_noised[index],
        }


class NoisyLabelDataModule(pl.LightningDataModule):
    """Image classification data with symmetric label noise on the training split.

    Args:
        source: one of ``digits`` (embedded, default), ``fashion_mnist``, ``cifar10``, ``cifar100``,
            ``imagefolder``, ``hf``.
        root: data folder (fashion_mnist, cifar, imagefolder) or HF dataset name / local path (hf).
        noise_fraction: fraction p of training labels to corrupt, in [0, 1); exactly round(p·N) are.
        seed: seeds the validation split, the subset and the noise (independent of ``seed_everything``).
        batch_size: training batch size (per process).
        eval_batch_size: batch size of validation and of the memorization evaluation pass.
        num_workers: DataLoader workers; the data and the noise do not depend on it.
        val_size: for sources without a held-out split, the number (int) or fraction (float) of
            images held out for validation before the noise is drawn.
        subset_size: train on a random subset of this many images (the paper analysed 10k images).
        val_subset_size: evaluate on a random subset of this many validation images.
        image_size: resize images to this side length (default: the source's native size).
        normalize: standardize pixels with the source's per-channel mean and std.
        augment: training augmentation: ``none``, ``shift`` (random shifts of up to ``shift_pixels``),
            ``shift_flip`` (shifts plus horizontal flips; CIFAR's standard recipe with shift_pixels=4),
            ``random_resized_crop`` (ImageNet recipe). Augmentation makes memorization partial.
        shift_pixels: maximum shift of the ``shift`` augmentations.
        noise_file: a saved ``label_noise.json`` that the generated noise must match (an error if not).
        hf_train_split, hf_val_split, hf_image_column, hf_label_column: for ``source="hf"``.
    """

    def __init__(
        self,
        source: str = "digits",
        root: str | None = None,
        noise_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        val_size: int | float = 0.1,
        subset_size: int | None = None,
        val_subset_size: int | None = None,
        image_size: int | None = None,
        normalize: bool = True,
        augment: Literal["none", "shift", "shift_flip", "random_resized_crop"] = "none",
        shift_pixels: int = 1,
        noise_file: str | None = None,
        hf_train_split: str = "train",
        hf_val_split: str | None = "validation",
        hf_image_column: str = "image",
        hf_label_column: str = "label",
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source={source!r} is not one of {SOURCES}")
        if not isinstance(noise_fraction, (int, float)) or not 0.0 <= noise_fraction < 1.0:
            raise ValueError(f"noise_fraction={noise_fraction!r} must be a number in [0, 1)")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r} is not one of {AUGMENTATIONS}")
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size)
        check_positive_int("subset_size", subset_size, allow_none=True)
        check_positive_int("val_subset_size", val_subset_size, allow_none=True)
        check_positive_int("image_size", image_size, allow_none=True)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be a non-negative integer")
        if not isinstance(shift_pixels, int) or shift_pixels < 0:
            raise ValueError(f"shift_pixels={shift_pixels!r} must be a non-negative integer")
        if isinstance(val_size, float) and not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size={val_size!r} as a fraction must be in (0, 1); pass an int for a count")
        if isinstance(val_size, int) and val_size < 1:
            raise ValueError(f"val_size={val_size!r} as a count must be at least 1")
        self.save_hyperparameters()
        self.source = source
        self.root = root
        self.noise_fraction = float(noise_fraction)
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.subset_size = subset_size
        self.val_subset_size = val_subset_size
        self.normalize = normalize
        self.augment = augment
        self.shift_pixels = shift_pixels
        self.noise_file = noise_file
        self.hf_options = {
            "hf_train_split": hf_train_split,
            "hf_val_split": hf_val_split,
            "hf_image_column": hf_image_column,
            "hf_label_column": hf_label_column,
        }
        self.info = source_info(source, image_size)
        self.noise: LabelNoise | None = None
        self.train_set: NoisyLabelDataset | None = None
        self.train_eval_set: NoisyLabelDataset | None = None
        self.val_set: NoisyLabelDataset | None = None
        self._pending_noise_check: tuple[LabelNoise, str] | None = None

    # -- facts the model checks against ---------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        """Known statically for the built-in sources; for imagefolder/hf after ``setup``."""
        return self._splits.num_classes if getattr(self, "_splits", None) else self.info.num_classes

    @property
    def in_chans(self) -> int:
        return self._splits.in_chans if getattr(self, "_splits", None) else self.info.in_chans

    @property
    def image_size(self) -> int:
        return self._splits.image_size if getattr(self, "_splits", None) else self.info.image_size

    # -- building the splits -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.noise is not None:
            return
        splits = load_image_source(self.source, root=self.root, image_size=self.hparams.image_size, **self.hf_options)
        self._splits = splits
        train_indices, val_base, val_indices = self._split_indices(splits)
        if self.subset_size is not None:
            train_indices = self._subset(train_indices, self.subset_size, "subset_size", "training", stream=1)
        if self.val_subset_size is not None:
            val_indices = self._subset(val_indices, self.val_subset_size, "val_subset_size", "validation", stream=3)
        true_labels = splits.train_labels[train_indices]
        self.noise = make_symmetric_noise(
            true_labels, splits.num_classes, self.noise_fraction, self.seed, source_indices=train_indices
        )
        train_transform, eval_transform = self._transforms(splits)
        noisy, true = self.noise.noisy_labels, self.noise.true_labels
        self.train_set = NoisyLabelDataset(splits.train, train_indices, noisy, true, train_transform)
        self.train_eval_set = NoisyLabelDataset(splits.train, train_indices, noisy, true, eval_transform)
        val_labels = (splits.val_labels if splits.val is not None else splits.train_labels)[val_indices]
        self.val_set = NoisyLabelDataset(val_base, val_indices, val_labels, val_labels, eval_transform)
        self._verify_and_save_noise()

    def _split_indices(self, splits: ImageSplits) -> tuple[Tensor, Dataset, Tensor]:
        num_train = len(splits.train_labels)
        if splits.val is not None:
            return torch.arange(num_train), splits.val, torch.arange(len(splits.val_labels))
        num_val = self.val_size if isinstance(self.val_size, int) else math.floor(self.val_size * num_train + 0.5)
        if not 0 < num_val < num_train:
            raise ValueError(
                f"val_size={self.val_size!r} holds out {num_val} of the {num_train} images of source "
                f"{self.source!r}; it must leave at least one image on each side"
            )
        permutation = torch.as_tensor(seeded_rng(self.seed, stream=0).permutation(num_train))
        return permutation[num_val:].sort().values, splits.train, permutation[:num_val].sort().values

    def _subset(self, indices: Tensor, size: int, argument: str, split: str, stream: int) -> Tensor:
        if size > len(indices):
            raise ValueError(
                f"{argument}={size} is larger than the {len(indices)} {split} images of source {self.source!r}"
            )
        chosen = seeded_rng(self.seed, stream=stream).choice(len(indices), size=size, replace=False)
        return indices[torch.as_tensor(chosen)].sort().values

    def _transforms(self, splits: ImageSplits) -> tuple[v2.Transform | None, v2.Transform | None]:
        size = splits.image_size
        augmentations = {
            "none": [],
            "shift": [v2.RandomCrop(size, padding=self.shift_pixels)],
            "shift_flip": [v2.RandomCrop(size, padding=self.shift_pixels), v2.RandomHorizontalFlip()],
            "random_resized_crop": [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()],
        }[self.augment]
        normalization = [v2.Normalize(list(splits.mean), list(splits.std))] if self.normalize else []
        train = v2.Compose(augmentations + normalization) if augmentations or normalization else None
        evaluation = v2.Compose(normalization) if normalization else None
        return train, evaluation

    # -- noise persistence ---------------------------------------------------------------------------
    def _verify_and_save_noise(self) -> None:
        assert self.noise is not None
        if self.noise_file is not None:
            self.noise.check_matches(LabelNoise.load(self.noise_file), origin=f"noise_file='{self.noise_file}'")
        if self._pending_noise_check is not None:
            self.noise.check_matches(*self._pending_noise_check)
            self._pending_noise_check = None
        trainer = self.trainer
        # Only beside real logs: a logger-less Trainer's log_dir is the working directory.
        log_dir = trainer.log_dir if trainer is not None and getattr(trainer, "logger", None) is not None else None
        if log_dir is None:
            return
        path = Path(log_dir) / NOISE_FILENAME
        if path.exists():  # resuming into the same log directory
            self.noise.check_matches(LabelNoise.load(path), origin=f"'{path}'")
        elif trainer.is_global_zero:
            self.noise.save(path)
            rank_zero_info(
                f"memcurve: {self.noise.num_noised} of {len(self.noise.true_labels)} training labels noised "
                f"(p={self.noise_fraction}, seed={self.seed}); saved to {path}"
            )

    def state_dict(self) -> dict:
        if self.noise is None:
            return {}
        return {"label_noise": self.noise.to_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "label_noise" not in state_dict:
            return
        saved = LabelNoise.from_dict(state_dict["label_noise"], origin="the checkpoint")
        if self.noise is None:  # verified in setup
            self._pending_noise_check = (saved, "the checkpoint")
        else:
            self.noise.check_matches(saved, origin="the checkpoint")

    # -- loaders -------------------------------------------------------------------------------------
    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, evaluation: bool, shard: bool = True
    ) -> DataLoader:
        sampler = unpadded_shard_sampler(dataset, self.trainer) if evaluation and shard else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def _require_setup(self) -> None:
        if self.noise is None:
            raise RuntimeError("NoisyLabelDataModule.setup() must run before its dataloaders are requested")

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.train_set, self.batch_size, shuffle=True, evaluation=False)

    def val_dataloader(self) -> DataLoader:
        return self.evaluation_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def memorization_dataloader(self) -> DataLoader:
        """The whole training set in order, without augmentation: the memorization evaluation pass."""
        return self.evaluation_dataloader("train")

    def evaluation_dataloader(self, split: Literal["train", "val"], shard: bool = True) -> DataLoader:
        """Unaugmented ``train`` or ``val`` data in order; under DDP each rank gets an unpadded shard unless
        ``shard=False`` (one process evaluating everything, e.g. rank zero scoring a pruned checkpoint)."""
        self._require_setup()
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not one of ('train', 'val')")
        dataset = self.train_eval_set if split == "train" else self.val_set
        return self._loader(dataset, self.eval_batch_size, shuffle=False, evaluation=True, shard=shard)
