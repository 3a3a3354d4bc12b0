"""The settings of one factor pass, declared once: :class:`FactorSettings`.

One frozen dataclass holds every option of the K-FAC factor pass (what is accumulated, how the Fisher targets
are drawn, how much data is read, how memory is spent). It is what ``collect_sums`` / ``collect_factors`` take,
what ``KFACFactors(settings=...)`` takes, and what the ``memcurve factors`` command line is built from; the
attribute docstrings below are the help text of every one of them. Values are validated once, when the object
is made, with a message naming the argument, the value and what is allowed.

Who reads what: the pass itself (``collect_sums``) reads ``mode``, ``fisher``, ``mc_samples``, ``position``,
``bias``, ``dtype``, ``seed``, ``drop_last_position``, ``max_batches`` and ``offload_to_cpu``;
``collect_factors`` also ``separate_passes``. Building the loader (``max_samples``, ``batch_size``), selecting
layers (``on_non_linear``), the output (``store``, ``sharded``) and the memory plan (``memory_budget_gb``) are
the caller's (``KFACFactors``, ``memcurve factors``), which read them from the same object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from memcurve.curvature.fisher import FISHER_TYPES
from memcurve.curvature.tracker import BIAS_MODES, DTYPES, MODES, ON_NON_LINEAR, POSITIONS
from memcurve.utils.arguments import check_choice, check_positive_int

__all__ = ["DEFAULT_SETTINGS", "FILE_SETTINGS", "STORE", "FactorSettings"]

STORE = ("eigen", "factors")
# What a factor file (or a sharded index) records about the pass; the reader requires every one of them.
FILE_SETTINGS = ("mode", "position", "bias", "dtype", "drop_last_position", "fisher", "mc_samples")


@dataclass(frozen=True)
class FactorSettings:
    """Everything about one K-FAC factor pass (see the module docstring for who reads which field)."""

    mode: str = "expand"
    """``expand`` (every counted position is a sample) or ``reduce`` (one sample per sequence)."""

    fisher: str = "sampled"
    """``sampled`` (targets drawn from the model: the true Fisher) or ``empirical`` (the data labels)."""

    mc_samples: int = 1
    """Draws per input for the sampled Fisher, each with its own backward pass (1 for the empirical Fisher)."""

    position: str = "all"
    """``all`` positions, or ``cls`` (position 0 only, as the paper's ViT experiments)."""

    bias: str = "exclude"
    """``exclude`` (A over the input only, as the paper) or ``homogeneous`` (A over [a, 1])."""

    dtype: str = "float32"
    """Accumulation dtype of the sums, ``float32`` or ``float64`` (eigendecompositions are float64 either way)."""

    seed: int = 0
    """Seed of the sampled Fisher targets (each draw is keyed by seed, example index, position and draw)."""

    drop_last_position: bool | None = None
    """Drop each sequence's last position (causal LMs: it has no next-token target); None: the adapter's
    default (``True`` for the causal-LM adapter, ``False`` otherwise)."""

    on_non_linear: str = "skip"
    """A layer pattern that also matches modules that are not linear layers: ``skip`` them or raise (``error``)."""

    store: str = "eigen"
    """``eigen`` (eigenvalues and eigenvectors, what pruning and probing read) or the raw ``factors``."""

    max_batches: int | None = None
    """At most this many batches per process (None: all)."""

    max_samples: int | None = None
    """Use only the first N examples of the dataset, across all processes (None: all)."""

    batch_size: int | None = None
    """Batch size of the factor pass (None: the dataloader's)."""

    sharded: bool = False
    """Reduce each layer to one owning rank, which eigendecomposes it and writes its own shard; rank zero writes
    ``<stem>.index.json``. Needed under FSDP."""

    offload_to_cpu: bool = False
    """Keep the sums in host memory (the Gram products of each batch then run on the CPU: slower, but the device
    holds no factor memory while collecting)."""

    separate_passes: bool = False
    """Collect A in one pass (forwards only) and G in a second (forward + Fisher backward) over the same data, so
    the device holds the A sums or the G sums, never both. Needs a deterministic dataloader (checked through the
    counts)."""

    memory_budget_gb: float | None = None
    """Refuse to start when the planned factor memory of a rank exceeds this many GB (10⁹ bytes); None: no limit
    (the plan is printed either way)."""

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_choice("fisher", self.fisher, FISHER_TYPES)
        check_choice("position", self.position, POSITIONS)
        check_choice("bias", self.bias, BIAS_MODES)
        check_choice("dtype", self.dtype, tuple(DTYPES))
        check_choice("on_non_linear", self.on_non_linear, ON_NON_LINEAR)
        check_choice("store", self.store, STORE)
        check_positive_int("mc_samples", self.mc_samples, allow_none=False)
        check_positive_int("max_batches", self.max_batches, allow_none=True)
        check_positive_int("max_samples", self.max_samples, allow_none=True)
        check_positive_int("batch_size", self.batch_size, allow_none=True)
        if self.fisher == "empirical" and self.mc_samples != 1:
            raise ValueError(
                f"mc_samples={self.mc_samples}: the empirical Fisher uses the data labels; mc_samples must be 1"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**63)")
        if self.drop_last_position is not None and not isinstance(self.drop_last_position, bool):
            raise TypeError(
                f"drop_last_position={self.drop_last_position!r} must be True, False or None (the adapter's default)"
            )
        for name in ("sharded", "offload_to_cpu", "separate_passes"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be True or False")
        budget = self.memory_budget_gb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
            raise ValueError(f"memory_budget_gb={budget!r} must be a positive number of GB or None")

    def replace(self, **changes: Any) -> FactorSettings:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolve(self, adapter: Any) -> FactorSettings:
        """These settings with ``drop_last_position`` decided: the adapter's ``drop_last_position`` when None."""
        if self.drop_last_position is not None:
            return self
        return self.replace(drop_last_position=bool(getattr(adapter, "drop_last_position", False)))

    def file_settings(self) -> dict[str, Any]:
        """What factor files and sharded indexes record about the pass (the keys of ``FILE_SETTINGS``).

        ``drop_last_position`` must be decided first (:meth:`resolve`)."""
        if self.drop_last_position is None:
            raise ValueError("drop_last_position=None is not decided yet; call FactorSettings.resolve(adapter) first")
        return {name: getattr(self, name) for name in FILE_SETTINGS}


DEFAULT_SETTINGS = FactorSettings()  # the default of ``collect_sums`` / ``collect_factors`` (frozen: safe to share)
