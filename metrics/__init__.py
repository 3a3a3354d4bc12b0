"""torchmetrics metrics: memorization of noisy labels (and, later, verbatim recall of text)."""

from memcurve.metrics.memorization import (
    CleanTrainAccuracy,
    GroundTruthRecovery,
    MemorizationMetrics,
    NoisedLabelAccuracy,
    clean_train_accuracy,
    ground_truth_recovery,
    noised_label_accuracy,
)

__all__ = [
    "CleanTrainAccuracy",
    "GroundTruthRecovery",
    "MemorizationMetrics",
    "NoisedLabelAccuracy",
    "clean_train_accuracy",
    "ground_truth_recovery",
    "noised_label_accuracy",
]
