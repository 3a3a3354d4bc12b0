"""Symmetric label noise: which training labels are corrupted, and to what.

The noise is a pure function of (true labels, number of classes, fraction, seed): exactly
``floor(p * N + 0.5)`` labels (``p * N`` rounded half up) are corrupted, each to one of the *other*
classes drawn uniformly. It is drawn with NumPy's PCG64 from ``[seed, stream]`` in the main process,
before any DataLoader exists, so it is identical on every rank and for any ``num_workers``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from memcurve.utils.files import atomic_write

__all__ = ["LabelNoise", "make_symmetric_noise", "seeded_rng"]

FORMAT_VERSION = 1


def seeded_rng(seed: int, stream: int) -> np.random.Generator:
    """An independent, reproducible random stream per purpose (val split, subset, noise)."""
    return np.random.default_rng([seed, stream])


@dataclass(frozen=True)
class LabelNoise:
    """The corrupted labels of one training set.

    ``true_labels[i]`` and ``noisy_labels[i]`` refer to training example ``i`` of the DataModule (after
    validation split and subset); ``source_indices[i]`` is that example's index in the source dataset.
    """

    noise_fraction: float
    seed: int
    num_classes: int
    true_labels: Tensor
    noisy_labels: Tensor
    source_indices: Tensor

    @property
    def is_noised(self) -> Tensor:
        return self.noisy_labels != self.true_labels

    @property
    def noised_indices(self) -> Tensor:
        return torch.nonzero(self.is_noised).flatten()

    @property
    def num_noised(self) -> int:
        return int(self.is_noised.sum())

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in (self.true_labels, self.noisy_labels, self.source_indices):
            digest.update(tensor.to(torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "noise_fraction": self.noise_fraction,
            "seed": self.seed,
            "num_classes": self.num_classes,
            "num_train": len(self.true_labels),
            "num_noised": self.num_noised,
            "noised_indices": self.noised_indices.tolist(),
            "true_labels": self.true_labels.tolist(),
            "noisy_labels": self.noisy_labels.tolist(),
            "source_indices": self.source_indices.tolist(),
            "sha256": self.fingerprint(),
        }

    @classmethod
    def from_dict(cls, state: dict, origin: str = "state") -> LabelNoise:
        required = ("noise_fraction", "seed", "num_classes", "true_labels", "noisy_labels", "source_indices")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"label noise from {origin} lacks the fields {missing}; it is not a memcurve noise file")
        noise = cls(
            noise_fraction=float(state["noise_fraction"]),
            seed=int(state["seed"]),
            num_classes=int(state["num_classes"]),
            true_labels=torch.as_tensor(state["true_labels"], dtype=torch.int64),
            noisy_labels=torch.as_tensor(state["noisy_labels"], dtype=torch.int64),
            source_indices=torch.as_tensor(state["source_indices"], dtype=torch.int64),
        )
        if "sha256" in state and state["sha256"] != noise.fingerprint():
            raise ValueError(f"label noise from {origin} is corrupt: its sha256 does not match its labels")
        return noise

    def save(self, path: str | os.PathLike) -> None:
        text = json.dumps(self.to_dict())
        atomic_write(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LabelNoise:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"noise_file='{path}' does not exist")
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"noise_file='{path}' is not valid JSON ({error})") from error
        return cls.from_dict(state, origin=f"'{path}'")

    def check_matches(self, expected: LabelNoise, origin: str) -> None:
        """Raise if ``expected`` (e.g. from a checkpoint) differs from this noise; never reshuffle silently."""
        differences = []
        for field in ("noise_fraction", "seed", "num_classes"):
            if getattr(self, field) != getattr(expected, field):
                differences.append(f"{field}: saved {getattr(expected, field)!r}, now {getattr(self, field)!r}")
        for field in ("true_labels", "noisy_labels", "source_indices"):
            mine, theirs = getattr(self, field), getattr(expected, field)
            if mine.shape != theirs.shape:
                differences.append(f"{field}: saved {len(theirs)} entries, now {len(mine)}")
            elif not torch.equal(mine, theirs):
                differences.append(f"{field}: {int((mine != theirs).sum())} of {len(mine)} entries differ")
        if differences:
            raise ValueError(
                f"the label noise saved in {origin} does not match the noise of this data module "
                f"({'; '.join(differences)}). Resume with the same data settings (source, root, seed, "
                "noise_fraction, val_size, subset_size) as the original run."
            )


def make_symmetric_noise(
    true_labels: Tensor, num_classes: int, noise_fraction: float, seed: int, source_indices: Tensor | None = None
) -> LabelNoise:
    """Corrupt exactly ``round_half_up(noise_fraction * N)`` labels, each to a different class, uniformly."""
    if not 0.0 <= noise_fraction < 1.0:
        raise ValueError(f"noise_fraction={noise_fraction!r} must be in [0, 1)")
    true_labels = torch.as_tensor(true_labels, dtype=torch.int64)
    num_examples = len(true_labels)
    num_noised = math.floor(noise_fraction * num_examples + 0.5)
    if num_noised and num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2 to corrupt labels")
    if num_examples and (true_labels.min() < 0 or true_labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); found [{true_labels.min()}, {true_labels.max()}]")
    rng = seeded_rng(seed, stream=2)
    noised = np.sort(rng.choice(num_examples, size=num_noised, replace=False))
    # An offset in 1..C-1 maps every label to one of the C-1 other classes with equal probability.
    offsets = rng.integers(1, num_classes, size=num_noised) if num_noised else np.zeros(0, dtype=np.int64)
    noisy_labels = true_labels.clone()
    noised_t = torch.as_tensor(noised, dtype=torch.int64)
    noisy_labels[noised_t] = (true_labels[noised_t] + torch.as_tensor(offsets, dtype=torch.int64)) % num_classes
    if source_indices is None:
        source_indices = torch.arange(num_examples)
    return LabelNoise(
        noise_fraction=float(noise_fraction),
        seed=int(seed),
        num_classes=int(num_classes),
        true_labels=true_labels,
        noisy_labels=noisy_labels,
        source_indices=torch.as_tensor(source_indices, dtype=torch.int64),
    )
