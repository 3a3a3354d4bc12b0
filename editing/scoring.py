"""The one scorer of edits: the module's own ``evaluation_metrics`` on the unedited and on the edited weights.

Contract: a LightningModule that defines ``evaluation_metrics(datamodule, shard=False) -> {metric: float}`` is
scored by it (on a deep copy: the live model is never modified); if its signature has ``reference_state_dict``,
metrics relative to the unedited model (the LM's nDCG) always get the ORIGINAL weights as reference. ``shard=False``:
one process scores all the data alone, so a DDP run reports the single-process figures.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["Scorer", "check_scorable"]


def check_scorable(module: Any, argument: str = "evaluate") -> None:
    """``TypeError`` (naming the fix) unless ``module`` has ``evaluation_metrics``."""
    if not callable(getattr(module, "evaluation_metrics", None)):
        raise TypeError(
            f"{argument}=True needs {type(module).__name__}.evaluation_metrics(datamodule, shard=False) -> dict of "
            f"metrics; define it or pass {argument}=False"
        )


class Scorer:
    """Scores state dicts with a private copy of ``module``; the unedited score is computed once per unedited state
    dict (cached for the last one given)."""

    def __init__(self, module: nn.Module, datamodule: Any) -> None:
        check_scorable(module)
        self.module = copy.deepcopy(module)
        self.datamodule = datamodule
        self._relative = "reference_state_dict" in inspect.signature(self.module.evaluation_metrics).parameters
        self._before: dict[str, float] | None = None
        self._before_of: Mapping[str, Any] | None = None  # the state dict ``_before`` scores

    def __call__(self, state_dict: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float]:
        self.module.load_state_dict(state_dict)
        if self._relative:
            return dict(self.module.evaluation_metrics(self.datamodule, shard=False, reference_state_dict=reference))
        return dict(self.module.evaluation_metrics(self.datamodule, shard=False))

    def before(self, original: Mapping[str, Any]) -> dict[str, float]:
        if self._before is None or self._before_of is not original:
            self._before, self._before_of = self(original, original), original
        return dict(self._before)
