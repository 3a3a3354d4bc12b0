"""KFACPruning: remove the low-curvature weight directions of chosen layers in a copy of each checkpoint.

For each selected ``nn.Linear`` W with K-FAC factors A = U_A diag(λ) U_Aᵀ and G = U_G diag(μ) U_Gᵀ, the
``kronecker`` edit (the paper's) keeps the eigen-pairs (i, j) with the largest curvature κ = μ_i λ_j that
together hold ``energy`` of Σκ (or the top ``keep_fraction`` of pairs) and zeroes the rest in the eigenbasis:
W' = U_G ((U_Gᵀ W U_A) ⊙ M) U_Aᵀ. ``separable`` keeps the top eigenvectors of G and A separately:
W' = P_G P_Gᵀ W P_A P_Aᵀ. See :class:`~memcurve.callbacks.checkpoint_pruning.CheckpointPruning` for when it runs,
where the pruned checkpoint goes and what the report holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from memcurve.callbacks.checkpoint_pruning import CheckpointPruning, PruningSpec
from memcurve.curvature import StoredFactors, edit_state_dict, load_factors

__all__ = ["KFACPruning"]

MODES = ("kronecker", "separable")


class KFACPruning(CheckpointPruning):
    """Prune low-curvature directions at checkpoint time (the live model and the original file stay untouched).

    Args:
        factors: a factor file written by :class:`~memcurve.callbacks.KFACFactors`, or ``"latest"``: the file
            recorded in the checkpoint (``KFACFactors(when="checkpoint")``) or else the newest file of a
            KFACFactors callback of the same Trainer (put KFACFactors before this callback).
        layers: module-name patterns of the layers to edit; each needs factors in the file.
        energy: fraction(s) of Σκ to keep, in (0, 1].
        keep_fraction: fraction(s) of eigen-pairs to keep by count (small models concentrate Σκ in a few pairs).
        mode: ``kronecker`` (exact pair mask, default) or ``separable``.
        when, evaluate, output_dir, save_pruned: see CheckpointPruning.
    """

    def __init__(
        self,
        layers: list[str],
        factors: str = "latest",
        energy: float | list[float] | None = None,
        keep_fraction: float | list[float] | None = None,
        mode: str = "kronecker",
        when: str = "checkpoint",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; choose one of {MODES}")
        if factors != "latest" and not Path(factors).is_file():
            raise FileNotFoundError(f"factors='{factors}' does not exist; pass a KFACFactors file or 'latest'")
        super().__init__(f"kfac-{mode}", layers, energy, keep_fraction, when, evaluate, output_dir, save_pruned)
        self.factors = factors
        self.mode = mode
        self._loaded: tuple[str, StoredFactors] | None = None

    def factor_path(self, checkpoint: dict[str, Any]) -> str:
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

    def load(self, path: str, module: pl.LightningModule | None) -> StoredFactors:
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = (path, load_factors(path, module))
        return self._loaded[1]

    def edit_state_dict(
        self, state_dict: dict[str, torch.Tensor], spec: PruningSpec, checkpoint: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        module = self._trainer.lightning_module if self._trainer is not None else None
        stored = self.load(self.factor_path(checkpoint), module)
        return edit_state_dict(
            state_dict,
            stored,
            self.layer_names,
            method=self.mode,
            energy=spec.energy,
            keep_fraction=spec.keep_fraction,
        )
