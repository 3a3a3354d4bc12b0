"""The held-out protocol's data roles: seeded, disjoint splits of a run's held-out (validation) set.

Every number a report calls held-out comes from one of three disjoint roles:

* ``factors`` (optional): held-out examples the K-FAC factors are collected on (the LM's factor text); a ViT's
  factors come from its training images instead, and this role is then empty;
* ``selection``: the only data an ``auto`` strength is chosen on (the budget's metric, nothing else);
* ``test``: the data the held-out cost of the chosen edit is reported on.

Memorization is measured on the memorized set (noised training images, planted canaries), which is in none of the
roles and is never used to choose a K-FAC or SVD strength. :func:`split_held_out` is a pure function of the size,
the fractions and the seed; :class:`HeldOutSplits` is saved beside every sweep (``held_out_splits.json``) with a
sha256 of its indices, which every report names. :func:`subset_loader` and :class:`HeldOutView` give a role's data
to a scorer: a loader over the role's examples in order, and a DataModule whose validation data is the role's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Subset

from memcurve.utils.arguments import check_int
from memcurve.utils.files import atomic_write
from memcurve.utils.sampling import loader_like

__all__ = [
    "ROLES",
    "HeldOutSettings",
    "HeldOutSplits",
    "HeldOutView",
    "global_seed",
    "held_out_size",
    "split_held_out",
    "subset_loader",
]

ROLES = ("factors", "selection", "test")


@dataclass(frozen=True)
class HeldOutSettings:
    """How a run's held-out (validation) set is split into the protocol's roles."""

    selection_fraction: float = 0.5
    """Fraction of the held-out examples (after the factor role) that choose the strength; the rest is the test."""
    factor_fraction: float = 0.0
    """Fraction of the held-out examples the factors are collected on (0: factors come from the training data)."""
    seed: int | None = None
    """Seed of the split (None: the run's seed)."""

    def __post_init__(self) -> None:
        for name in ("selection_fraction", "factor_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"held_out.{name}={value!r} must be a number in [0, 1)")
        if not 0 < self.selection_fraction < 1:
            raise ValueError(
                f"held_out.selection_fraction={self.selection_fraction!r} must be in (0, 1): both the selection and "
                "the test split need examples"
            )
        if not 0 <= self.factor_fraction < 1:
            raise ValueError(f"held_out.factor_fraction={self.factor_fraction!r} must be in [0, 1)")
        if self.seed is not None:
            check_int("held_out.seed", self.seed, minimum=0)


@dataclass(frozen=True)
class HeldOutSplits:
    """Disjoint, sorted example indices of a held-out set of ``size`` examples, per role."""

    size: int
    seed: int
    settings: HeldOutSettings
    roles: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[int] = set()
        for role, indices in self.roles.items():
            if role not in ROLES:
                raise ValueError(f"held-out role {role!r} is not one of {ROLES}")
            if any(not 0 <= i < self.size for i in indices):
                raise ValueError(f"held-out role {role!r} has indices outside [0, {self.size})")
            if seen & set(indices):
                raise ValueError(f"held-out role {role!r} shares examples with another role")
            seen |= set(indices)

    def indices(self, role: str) -> tuple[int, ...]:
        if role not in ROLES:
            raise ValueError(f"role={role!r} is not one of {ROLES}")
        return tuple(self.roles.get(role, ()))

    @property
    def sha256(self) -> str:
        """Content hash of the split (size, seed and every role's indices): the name reports give it."""
        text = json.dumps({"size": self.size, "seed": self.seed, "roles": {r: list(self.indices(r)) for r in ROLES}})
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def name(self) -> str:
        """``held-out seed 0: factors 0 / selection 148 / test 149 of 297 (sha256 1a2b3c4d)``."""
        counts = " / ".join(f"{role} {len(self.indices(role))}" for role in ROLES)
        return f"held-out seed {self.seed}: {counts} of {self.size} (sha256 {self.sha256[:8]})"

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "seed": self.seed,
            "selection_fraction": self.settings.selection_fraction,
            "factor_fraction": self.settings.factor_fraction,
            "settings_seed": self.settings.seed,
            "roles": {role: list(self.indices(role)) for role in ROLES},
            "sha256": self.sha256,
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False, argument: str = "output_dir") -> None:
        """Write the split to ``path`` (atomically). An existing file holding another split is refused, naming
        ``argument`` (the folder's), unless ``overwrite`` (reports naming it would lie); one holding this split is
        left as it is."""
        path = Path(path)
        if path.is_file() and not overwrite:
            saved = HeldOutSplits.from_json(json.loads(path.read_text()))
            if saved.sha256 != self.sha256:
                raise FileExistsError(
                    f"{argument}: {path} holds another held-out split ({saved.name}) than this run's ({self.name}); "
                    f"choose another {argument} or pass overwrite"
                )
            return
        text = json.dumps(self.to_json())
        atomic_write(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> HeldOutSplits:
        settings = HeldOutSettings(
            selection_fraction=record["selection_fraction"],
            factor_fraction=record["factor_fraction"],
            seed=record.get("settings_seed"),
        )
        splits = cls(
            size=int(record["size"]),
            seed=int(record["seed"]),
            settings=settings,
            roles={role: tuple(int(i) for i in record["roles"].get(role, [])) for role in ROLES},
        )
        if record.get("sha256") != splits.sha256:
            raise ValueError(
                "held_out_splits.json: its sha256 is missing or does not match its indices (the file was altered)"
            )
        return splits


def global_seed() -> int:
    """The seed of the running Lightning job (``seed_everything`` records it in ``PL_GLOBAL_SEED``), 0 without one:
    the default seed of a split made inside a run, the same for every callback of that run."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def split_held_out(size: int, settings: HeldOutSettings = HeldOutSettings(), seed: int | None = None) -> HeldOutSplits:
    """Split ``size`` held-out examples into the roles: a seeded permutation (NumPy ``default_rng``), the first
    ``round(factor_fraction·size)`` to ``factors``, then ``round(selection_fraction·rest)`` to ``selection``, the
    rest to ``test``. ``settings.seed`` when set, else ``seed`` (the run's); one of them must be given."""
    check_int("held-out size", size, minimum=2)
    seed = settings.seed if seed is None or settings.seed is not None else seed
    if seed is None:
        raise ValueError("held_out.seed is None and no run seed was given: the split must be seeded")
    order = np.random.default_rng(seed).permutation(size)
    num_factors = math.floor(settings.factor_fraction * size + 0.5)
    rest = size - num_factors
    num_selection = math.floor(settings.selection_fraction * rest + 0.5)
    if num_selection < 1 or rest - num_selection < 1:
        raise ValueError(
            f"a held-out set of {size} examples leaves {num_selection} for selection and {rest - num_selection} for "
            f"test (held_out.selection_fraction={settings.selection_fraction}, factor_fraction="
            f"{settings.factor_fraction}); each needs at least one"
        )
    parts = np.split(order, [num_factors, num_factors + num_selection])
    roles = {role: tuple(sorted(int(i) for i in part)) for role, part in zip(ROLES, parts)}
    return HeldOutSplits(size=size, seed=int(seed), settings=settings, roles=roles)


def subset_loader(loader: DataLoader, indices: Sequence[int]) -> DataLoader:
    """The examples ``indices`` of ``loader``'s (map-style) dataset, in order, batched and collated as ``loader``."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"a held-out split needs a torch DataLoader, got {type(loader).__name__}")
    if not hasattr(loader.dataset, "__getitem__") or not hasattr(loader.dataset, "__len__"):
        raise TypeError(
            f"a held-out split needs a map-style dataset (with __len__ and __getitem__); "
            f"{type(loader.dataset).__name__} is not one"
        )
    return loader_like(loader, Subset(loader.dataset, list(indices)))


class HeldOutView:
    """A DataModule seen through one held-out role: ``val_dataloader()`` and ``evaluation_dataloader("val")`` give
    the role's examples of the validation set (in order, unsharded); every other attribute is the DataModule's
    (the memorized set, the training data, the tokenizer ...). What a report's ``test`` scores read."""

    def __init__(self, datamodule: Any, indices: Sequence[int], role: str = "test") -> None:
        self._datamodule = datamodule
        self._indices = tuple(indices)
        self.role = role

    def _validation_loader(self) -> DataLoader:
        base = self._datamodule
        if callable(getattr(base, "evaluation_dataloader", None)):
            return base.evaluation_dataloader("val", shard=False)
        loaders = base.val_dataloader()
        if isinstance(loaders, (list, tuple)):
            if len(loaders) != 1:
                raise ValueError(f"a held-out split needs one validation loader; the DataModule has {len(loaders)}")
            loaders = loaders[0]
        return loaders

    def val_dataloader(self) -> DataLoader:
        return subset_loader(self._validation_loader(), self._indices)

    def evaluation_dataloader(self, split: str, shard: bool = True) -> DataLoader:
        if split == "val":
            return self.val_dataloader()
        return self._datamodule.evaluation_dataloader(split, shard=shard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._datamodule, name)


def held_out_size(datamodule: Any) -> int:
    """Number of examples of the DataModule's validation set (what the roles split)."""
    return len(HeldOutView(datamodule, ())._validation_loader().dataset)
