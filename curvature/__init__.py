"""Framework-free K-FAC maths: covariance accumulation, Fisher targets, eigendecomposition, pair selection, storage.

Nothing here imports Lightning. A typical use::

    with KFACTracker(model, layer_names, mode="expand", position="all") as tracker:
        for batch in loader:
            tracker.set_mask(mask)                      # optional [B, T] valid positions
            logits = model(inputs)
            fisher_backward(logits, fisher="sampled", seed=0, example_index=indices, mc_samples=1, mask=mask)
    factors = tracker.finalize(reduce_across_ranks=True)   # {name: LayerFactors(A, G, count_A, count_G)}
    eigen = eigendecompose(factors)                         # {name: LayerEigen}, float64, descending
    save_factors(path, eigen, model=model, settings={**tracker.settings(), "fisher": "sampled", "mc_samples": 1})

The same pass in one call, every option in one frozen :class:`FactorSettings` (validated once)::

    factors = collect_factors(model, loader, layer_names, FactorSettings(fisher="empirical", dtype="float64"))

At scale (``sharded``): every rank accumulates with ``collect_sums``, ``reduce_to_owners`` sends each layer to one
owning rank (``assign_owners``), owners eigendecompose and ``save_sharded_factors`` writes per-rank shards plus an
index that ``load_factors`` reads lazily; ``plan_memory`` sizes it all beforehand.

Modules: ``settings`` (``FactorSettings``: the options of a pass), ``sums`` (accumulators, normalisation,
cross-rank sum), ``tracker`` (hooks), ``fisher`` (targets), ``collect`` (the factor pass), ``owners`` (one owning
rank per layer), ``eigen``, ``selection``, ``edit``, ``bands``, ``balanced_subnet``, ``factor_file`` /
``sharded_storage`` / ``storage`` (formats and the reader), ``memory_plan``, ``layers`` (linear-layer shapes,
layouts and names). Nothing here imports Lightning or transformers; the HF and checkpoint integration lives in
:mod:`memcurve.editing`.

Conventions (normalisation, modes, masks, bias, seeding, ties) are documented in each module's docstring.
"""

from memcurve.curvature.balanced_subnet import (
    SCORE_INITS,
    BalancedSubnetResult,
    MaskedWeights,
    apply_masks,
    mask_edits,
    mask_ste,
    topk_keep_mask,
    train_balanced_subnet,
)
from memcurve.curvature.bands import (
    DEFAULT_BAND_EDGES,
    STATISTICS,
    BandBasis,
    band_labels,
    band_means,
    band_rank_bounds,
    check_band_edges,
    kfac_band_counts,
    kfac_band_thresholds,
    sample_band_pairs,
    sampled_band_means,
    svd_band_counts,
)
from memcurve.curvature.collect import collect_factors, collect_sums
from memcurve.curvature.edit import EDIT_METHODS, LayerEdit, edit_layer, edit_state_dict
from memcurve.curvature.eigen import LayerEigen, eigendecompose, eigendecompose_layer, symmetric_eigh
from memcurve.curvature.fisher import FISHER_TYPES, fisher_backward, fisher_loss, sample_targets
from memcurve.curvature.memory_plan import MemoryPlan, MemoryPlanError, plan_memory
from memcurve.curvature.owners import assign_owners, reduce_to_owners
from memcurve.curvature.selection import (
    count_pairs_above,
    energy_fraction,
    kappa,
    pair_mask,
    threshold_for_energy,
    threshold_for_keep_fraction,
)
from memcurve.curvature.settings import FactorSettings
from memcurve.curvature.sharded_storage import ShardedLayers, load_sharded_factors, save_sharded_factors
from memcurve.curvature.storage import (
    FactorFileError,
    StoredFactors,
    load_factors,
    model_fingerprint,
    save_factors,
)
from memcurve.curvature.sums import LayerFactors, LayerSums, all_reduce_sums, merge_sums, normalize_sums
from memcurve.curvature.tracker import (
    BIAS_MODES,
    MODES,
    ON_NON_LINEAR,
    POSITIONS,
    KFACTracker,
    compile_layer_patterns,
    select_linear_layers,
)

__all__ = [
    "BIAS_MODES",
    "DEFAULT_BAND_EDGES",
    "EDIT_METHODS",
    "FISHER_TYPES",
    "MODES",
    "ON_NON_LINEAR",
    "POSITIONS",
    "SCORE_INITS",
    "STATISTICS",
    "BalancedSubnetResult",
    "BandBasis",
    "FactorFileError",
    "FactorSettings",
    "KFACTracker",
    "LayerEdit",
    "LayerEigen",
    "LayerFactors",
    "LayerSums",
    "MaskedWeights",
    "MemoryPlan",
    "MemoryPlanError",
    "ShardedLayers",
    "StoredFactors",
    "all_reduce_sums",
    "apply_masks",
    "assign_owners",
    "band_labels",
    "band_means",
    "band_rank_bounds",
    "check_band_edges",
    "collect_factors",
    "collect_sums",
    "compile_layer_patterns",
    "count_pairs_above",
    "edit_layer",
    "edit_state_dict",
    "eigendecompose",
    "eigendecompose_layer",
    "energy_fraction",
    "fisher_backward",
    "fisher_loss",
    "kappa",
    "kfac_band_counts",
    "kfac_band_thresholds",
    "load_factors",
    "load_sharded_factors",
    "mask_edits",
    "mask_ste",
    "merge_sums",
    "model_fingerprint",
    "normalize_sums",
    "pair_mask",
    "plan_memory",
    "reduce_to_owners",
    "sample_band_pairs",
    "sample_targets",
    "sampled_band_means",
    "save_factors",
    "save_sharded_factors",
    "select_linear_layers",
    "svd_band_counts",
    "symmetric_eigh",
    "threshold_for_energy",
    "threshold_for_keep_fraction",
    "topk_keep_mask",
    "train_balanced_subnet",
]
