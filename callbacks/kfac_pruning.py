"""KFACPruning: remove the low-curvature weight directions of chosen layers in a copy of each checkpoint.

For each selected linear layer W with K-FAC factors A = U_A diag(λ) U_Aᵀ and G = U_G diag(μ) U_Gᵀ, ``method="kfac"``
(the paper's edit) keeps the eigen-pairs (i, j) with the largest curvature κ = μ_i λ_j that together hold
``energy`` of Σκ (or the top ``keep_fraction`` of pairs) and zeroes the rest in the eigenbasis:
W' = U_G ((U_Gᵀ W U_A) ⊙ M) U_Aᵀ. ``method="kfac-separable"`` keeps the top eigenvectors of G and A separately:
W' = P_G P_Gᵀ W P_A P_Aᵀ. See :class:`~memcurve.callbacks.checkpoint_pruning.CheckpointPruning` for when it runs,
where the edited checkpoint goes and what the report holds.

Where the factors come from, checked in ``setup`` (before any training step):

* a file (or ``*.index.json``): loaded and checked against the module (layer names and shapes, model fingerprint),
  and every pruned layer must have factors in it;
* ``"latest"`` (the default): a :class:`~memcurve.callbacks.KFACFactors` callback placed BEFORE this one in
  ``callbacks`` that collects every pruned layer — with ``when="fit_end"`` (both defaults) its factor pass runs
  first at the end of fit and this callback prunes with the file it wrote; with ``when="checkpoint"`` it needs
  ``KFACFactors(when="checkpoint")``, whose file for each checkpoint is recorded in that checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl

from memcurve.callbacks.checkpoint_pruning import CheckpointPruning
from memcurve.callbacks.kfac_factors import KFACFactors
from memcurve.curvature.storage import StoredFactors, load_factors
from memcurve.data.held_out import HeldOutSettings
from memcurve.editing.auto import Budget
from memcurve.editing.protocol import strength_requests
from memcurve.utils.arguments import check_choice

__all__ = ["KFACPruning"]

METHODS = ("kfac", "kfac-separable")


class KFACPruning(CheckpointPruning):
    """Prune low-curvature directions in a copy of the fit-end (or every) checkpoint; the live model and the original
    stay untouched.

    Args:
        layers: module-name patterns of the layers to edit; each needs factors in the file.
        factors: a factor file or ``*.index.json`` written by :class:`~memcurve.callbacks.KFACFactors`, or
            ``"latest"``: the file of the KFACFactors callback placed before this one in the same Trainer (see the
            module docstring).
        energy: fraction(s) of Σκ to keep, in (0, 1]; one edited checkpoint per value.
        keep_fraction: fraction(s) of eigen-pairs to keep by count (small models concentrate Σκ in a few pairs).
        method: ``kfac`` (exact pair mask, the paper's) or ``kfac-separable``.
        when, evaluate, output_dir, save_pruned: see CheckpointPruning.
    """

    def __init__(
        self,
        layers: list[str],
        factors: str = "latest",
        energy: float | list[float] | Literal["auto"] | None = None,
        keep_fraction: float | list[float] | Literal["auto"] | None = None,
        method: str = "kfac",
        when: str = "fit_end",
        evaluate: bool = True,
        output_dir: str | None = None,
        save_pruned: bool = True,
        budget: Budget | None = None,
        held_out: HeldOutSettings | None = None,
    ) -> None:
        check_choice("method", method, METHODS)
        if factors != "latest" and not Path(factors).is_file():
            raise FileNotFoundError(f"factors={factors!r} does not exist; pass a KFACFactors file or 'latest'")
        super().__init__(layers, when, evaluate, output_dir, save_pruned, budget, held_out)
        self.requests = strength_requests(method, self.layers, energy=energy, keep_fraction=keep_fraction)
        self.check_auto()
        self.factors = factors
        self._stored: StoredFactors | None = None  # a given file, loaded and checked in setup
        self._source: KFACFactors | None = None  # factors="latest": the callback whose files are used

    def check_factors(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.factors == "latest":
            self._source = self.factor_callback(trainer)
            return
        stored = load_factors(self.factors, pl_module)  # names, shapes and fingerprint against the module
        if stored.kind != "eigen":
            raise ValueError(
                f"factors={self.factors!r} holds kind {stored.kind!r}; pruning needs kind 'eigen' (KFACFactors "
                "settings.store='eigen')"
            )
        missing = [name for name in self.layer_names if name not in stored.layers]
        if missing:
            raise ValueError(
                f"layers={self.layers!r}: {missing} have no factors in factors={self.factors!r}; layers with factors: "
                f"{sorted(stored.layers)[:20]}"
            )
        self._stored = stored if trainer.is_global_zero else None  # only rank zero edits

    def factor_callback(self, trainer: pl.Trainer) -> KFACFactors:
        """The KFACFactors callback ``factors="latest"`` reads: before this one, a compatible ``when``, collecting
        every pruned layer, storing eigendecompositions. Refuses (naming the fix) when there is none."""
        callbacks = list(trainer.callbacks)
        mine = callbacks.index(self) if self in callbacks else len(callbacks)
        found = [(i, c) for i, c in enumerate(callbacks) if isinstance(c, KFACFactors)]
        name = type(self).__name__
        if not found:
            raise ValueError(
                f"{name}(factors='latest') needs a KFACFactors callback before it in the same Trainer; add "
                f"KFACFactors(layers=...) before {name} in callbacks, or pass factors=<factor file>"
            )
        wanted = ("checkpoint",) if self.when == "checkpoint" else ("fit_end", "every_n_epochs", "checkpoint")
        usable = [(i, c) for i, c in found if c.when in wanted]
        if not usable:
            whens = sorted({c.when for _, c in found})
            fix = (
                "KFACFactors(when='checkpoint') (its file is recorded in each checkpoint), or when='fit_end' for both"
                if self.when == "checkpoint"
                else "KFACFactors(when='fit_end')"
            )
            raise ValueError(
                f"{name}(when={self.when!r}, factors='latest') needs {fix}; the Trainer has KFACFactors with when in "
                f"{whens}"
            )
        before = [c for i, c in usable if i < mine]
        if not before:
            raise ValueError(
                f"{name}(factors='latest') comes before its KFACFactors in callbacks; put KFACFactors first (at the "
                "end of fit both run in that order: factors, then pruning)"
            )
        covering = [c for c in before if set(self.layer_names) <= set(c.layer_names)]
        if not covering:
            collected = sorted({n for c in before for n in c.layer_names})
            missing = [n for n in self.layer_names if n not in collected]
            raise ValueError(
                f"layers={self.layers!r}: {missing} have no factors: KFACFactors collects {collected[:20]}; add them "
                f"to KFACFactors(layers=...) or prune only collected layers"
            )
        source = covering[0]
        if self.held_out is not None and source.dataloader == "val" and source.held_out != self.held_out:
            raise ValueError(
                f"{name}(held_out={self.held_out!r}) scores on the validation set, and its KFACFactors reads it with "
                f"held_out={source.held_out!r}: the factor data would overlap the selection and test splits; give "
                "KFACFactors(dataloader='val') the same held_out (with factor_fraction > 0), or dataloader='train'"
            )
        store = getattr(source.settings, "store", "eigen")
        if store != "eigen":
            raise ValueError(
                f"{name} needs eigendecomposed factors; KFACFactors(settings.store={store!r}) must be 'eigen'"
            )
        return source

    def factors_for(self, checkpoint: dict[str, Any]) -> StoredFactors | str:
        if self._stored is not None:
            return self._stored
        if self.factors != "latest":
            return self.factors
        source = self._source
        recorded = checkpoint.get(KFACFactors.checkpoint_key, {}).get("path")
        if source is not None and source.when == "checkpoint" and recorded:
            return recorded  # the file of this very checkpoint
        if source is not None and source.saved_paths:
            return source.saved_paths[-1]
        if recorded:
            return recorded
        raise FileNotFoundError(
            "factors='latest' but no factor file is known yet: the KFACFactors callback before KFACPruning has not "
            "written one (when='every_n_epochs' with more epochs than run?); pass factors=<path>"
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._stored = None
