"""Lightning callbacks: one callback per module, each usable on any run."""

from memcurve.callbacks.balanced_subnet_pruning import BalancedSubnetPruning
from memcurve.callbacks.band_activation_probe import BandActivationProbe, ClassificationProbeAdapter, ProbeAdapter
from memcurve.callbacks.kfac_factors import KFACFactors
from memcurve.callbacks.kfac_pruning import KFACPruning
from memcurve.callbacks.memorization_eval import MemorizationEval
from memcurve.callbacks.svd_pruning import SVDPruning
from memcurve.callbacks.unlearning_pruning import UnlearningPruning

__all__ = [
    "BalancedSubnetPruning",
    "BandActivationProbe",
    "ClassificationProbeAdapter",
    "KFACFactors",
    "KFACPruning",
    "MemorizationEval",
    "ProbeAdapter",
    "SVDPruning",
    "UnlearningPruning",
]
