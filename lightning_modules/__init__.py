"""LightningModules: the noisy-label image classifier (and, later, the causal LM wrapper)."""

from memcurve.lightning_modules.noisy_label_classifier import NoisyLabelClassifier, warmup_cosine_factor

__all__ = ["NoisyLabelClassifier", "warmup_cosine_factor"]
