"""KFACPruning: remove the low-curvature weight directions of chosen layers in a copy of each checkpoint.

For each selected linear layer W with K-FAC factors A = U_A diag(λ) U_Aᵀ and G = U_G diag(μ) U_Gᵀ, ``method="kfac"``
(the paper's edit) keeps the eigen-pairs (i, j) with the largest curvature κ = μ_i λ_j that together hold
``energy`` of Σκ (or the top ``keep_fraction`` of pairs) and zeroes the rest in the eigenbasis:
W' = U_G ((U_Gᵀ W U_A) ⊙ M) U_Aᵀ. ``method="kfac-separable"`` keeps the top eigenvectors of G and A separately:
W' = P_G P_Gᵀ W P_A P_Aᵀ. See :class:`~memcurve.callbacks.checkpoint_pruning.CheckpointPruning` for when it runs,
where the edited checkpoint goes and what the report holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memcurve.callbacks.checkpoint_pruning import CheckpointPruning
from memcurve.editing import requests_for
from memcurve.utils.arguments import check_choice

__all__ = ["KFACPruning"]

METHODS = ("kfac", "kfac-separable")


class KFACPruning(CheckpointPruning):
    """Prune low-curvature directions at checkpoint time (the live model and the original file stay untouched).

    Args:
        layers: module-name patterns of the layers to edit; each needs factors in the file.
        factors: a factor file or ``*.index.json`` written by :class:`~memcurve.callbacks.KFACFactors`, or
            ``"latest"``: the file recorded in the checkpoint (``KFACFactors(when="checkpoint")``) or else the newest
            file of a KFACFactors callback of the same Trainer (put KFACFactors before this callback).
        energy: fraction(s) of Σκ to keep, in (0, 1]; one edited checkpoint per value.
        keep_fraction: fraction(s) of eigen-pairs to keep by count (small models concentrate Σκ in a few pairs).
        method: ``kfac`` (exact pair mask, the paper's) or ``kfac-separable``.
        when, evaluate, output_dir, save_pruned: see CheckpointPruning.
    """

    def __init__(
        self,
        layers: list[str],
        factors: str = "latest",
        energy: float | list[float] | None = None,
        keep_fraction: float | list[float] | None = None,
        method: str = "kfac",
        when: str = "checkpoint",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
    ) -> None:
        check_choice("method", method, METHODS)
        if factors != "latest" and not Path(factors).is_file():
            raise FileNotFoundError(f"factors={factors!r} does not exist; pass a KFACFactors file or 'latest'")
        super().__init__(layers, when, evaluate, output_dir, save_pruned)
        self.requests = requests_for(method, self.layers, energy=energy, keep_fraction=keep_fraction)
        self.factors = factors

    def factors_for(self, checkpoint: dict[str, Any]) -> str:
        if self.factors != "latest":
            return self.factors
        recorded = checkpoint.get("kfac_factors", {}).get("path")
        if recorded:
            return recorded
        trainer = self._trainer
        for callback in trainer.callbacks if trainer is not None else []:
            if getattr(callback, "saved_paths", None):
                return callback.saved_paths[-1]
        raise FileNotFoundError(
            "factors='latest' but no factor file is known yet: add a KFACFactors callback before KFACPruning "
            "(when='checkpoint' records its file in each checkpoint), or pass factors=<path>"
        )
