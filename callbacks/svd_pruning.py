"""SVDPruning: the baseline edit — keep the top singular directions of each selected weight matrix.

W = U diag(σ) Vᵀ → W' = U_k diag(σ_k) V_kᵀ, with k the smallest rank whose σ² hold ``energy`` of Σσ² (or the
top ``keep_fraction`` of the singular directions). Same pipeline, files and report as
:class:`~memcurve.callbacks.KFACPruning`, so the two compare on equal terms; no factors needed.
"""

from __future__ import annotations

from typing import Literal

from memcurve.callbacks.checkpoint_pruning import CheckpointPruning
from memcurve.data.held_out import HeldOutSettings
from memcurve.editing.auto import Budget
from memcurve.editing.protocol import strength_requests

__all__ = ["SVDPruning"]


class SVDPruning(CheckpointPruning):
    """Prune low singular directions in a copy of the fit-end (or every) checkpoint; the live model and the original
    stay untouched.

    Args:
        layers: module-name patterns of the layers to edit.
        energy: fraction(s) of Σσ² to keep, in (0, 1].
        keep_fraction: fraction(s) of singular directions (rank) to keep.
        when, evaluate, output_dir, save_pruned: see CheckpointPruning.
    """

    def __init__(
        self,
        layers: list[str],
        energy: float | list[float] | Literal["auto"] | None = None,
        keep_fraction: float | list[float] | Literal["auto"] | None = None,
        when: str = "fit_end",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
        budget: Budget | None = None,
        held_out: HeldOutSettings | None = None,
    ) -> None:
        super().__init__(layers, when, evaluate, output_dir, save_pruned, budget, held_out)
        self.requests = strength_requests("svd", self.layers, energy=energy, keep_fraction=keep_fraction)
        self.check_auto()
