"""Framework-free K-FAC maths: covariance accumulation, Fisher targets, eigendecomposition, pair selection, storage.

Nothing here imports Lightning. A typical use::

    with KFACTracker(model, layer_names, mode="expand", position="all") as tracker:
        for batch in loader:
            tracker.set_mask(mask)                      # optional [B, T] valid positions
            logits = model(inputs)
            fisher_backward(logits, fisher_type="sampled", seed=0, example_index=indices, mc_samples=1, mask=mask)
    factors = tracker.finalize(reduce_across_ranks=True)   # {name: LayerFactors(A, G, count_A, count_G)}
    eigen = eigendecompose(factors)                         # {name: LayerEigen}, float64, descending
    save_factors(path, eigen, model=model, settings={**tracker.settings(), "fisher_type": "sampled", "mc_samples": 1})

Conventions (normalisation, modes, masks, bias, seeding, ties) are documented in each module's docstring.
"""

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
from memcurve.curvature.collect import ClassificationAdapter, FisherAdapter, collect_factors
from memcurve.curvature.distributed import all_reduce_sums, all_reduce_tensors, is_distributed
from memcurve.curvature.edit import EDIT_METHODS, LayerEdit, edit_layer, edit_state_dict
from memcurve.curvature.eigen import LayerEigen, eigendecompose, eigendecompose_layer, symmetric_eigh
from memcurve.curvature.fisher import FISHER_TYPES, fisher_backward, fisher_loss, sample_targets
from memcurve.curvature.selection import (
    count_pairs_above,
    energy_fraction,
    kappa,
    pair_mask,
    threshold_for_energy,
    threshold_for_keep_fraction,
)
from memcurve.curvature.storage import (
    FactorFileError,
    StoredFactors,
    atomic_write,
    load_factors,
    model_fingerprint,
    save_factors,
)
from memcurve.curvature.tracker import (
    BIAS_MODES,
    MODES,
    ON_NON_LINEAR,
    POSITIONS,
    KFACTracker,
    LayerFactors,
    LayerSums,
    compile_layer_patterns,
    merge_sums,
    normalize_sums,
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
    "STATISTICS",
    "BandBasis",
    "ClassificationAdapter",
    "FactorFileError",
    "FisherAdapter",
    "KFACTracker",
    "LayerEdit",
    "LayerEigen",
    "LayerFactors",
    "LayerSums",
    "StoredFactors",
    "all_reduce_sums",
    "all_reduce_tensors",
    "atomic_write",
    "band_labels",
    "band_means",
    "band_rank_bounds",
    "check_band_edges",
    "collect_factors",
    "compile_layer_patterns",
    "count_pairs_above",
    "edit_layer",
    "edit_state_dict",
    "eigendecompose",
    "eigendecompose_layer",
    "energy_fraction",
    "fisher_backward",
    "fisher_loss",
    "is_distributed",
    "kappa",
    "kfac_band_counts",
    "kfac_band_thresholds",
    "load_factors",
    "merge_sums",
    "model_fingerprint",
    "normalize_sums",
    "pair_mask",
    "sample_band_pairs",
    "sample_targets",
    "sampled_band_means",
    "save_factors",
    "select_linear_layers",
    "svd_band_counts",
    "symmetric_eigh",
    "threshold_for_energy",
    "threshold_for_keep_fraction",
]
