"""SVDPruning: the baseline edit — keep the top singular directions of each selected weight matrix.

W = U diag(σ) Vᵀ → W' = U_k diag(σ_k) V_kᵀ, with k the smallest rank whose σ² hold ``energy`` of Σσ² (or the
top ``keep_fraction`` of the singular directions). Same interface, files and report as
:class:`~memcurve.callbacks.KFACPruning`, so the two compare on equal terms; no factors needed.
"""

from __future__ import annotations

from typing import Any

import torch

from memcurve.callbacks.checkpoint_pruning import CheckpointPruning, PruningSpec
from memcurve.curvature import edit_state_dict

__all__ = ["SVDPruning"]


class SVDPruning(CheckpointPruning):
    """Prune low singular directions at checkpoint time (the live model and the original file stay untouched).

    Args:
        layers: module-name patterns of the layers to edit.
        energy: fraction(s) of Σσ² to keep, in (0, 1].
        keep_fraction: fraction(s) of singular directions (rank) to keep.
        when, evaluate, output_dir, save_pruned: see CheckpointPruning.
    """

    def __init__(
        self,
        layers: list[str],
        energy: float | list[float] | None = None,
        keep_fraction: float | list[float] | None = None,
        when: str = "checkpoint",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
    ) -> None:
        super().__init__("svd", layers, energy, keep_fraction, when, evaluate, output_dir, save_pruned)

    def edit_state_dict(
        self, state_dict: dict[str, torch.Tensor], spec: PruningSpec, checkpoint: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return edit_state_dict(
            state_dict, None, self.layer_names, method="svd", energy=spec.energy, keep_fraction=spec.keep_fraction
        )
