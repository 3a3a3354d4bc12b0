"""Lightning callbacks: one callback per module, each usable on any run."""

from memcurve.callbacks.kfac_factors import KFACFactors
from memcurve.callbacks.memorization_eval import MemorizationEval, evaluate_memorization

__all__ = ["KFACFactors", "MemorizationEval", "evaluate_memorization"]
