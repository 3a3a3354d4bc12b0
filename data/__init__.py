"""Data: noisy-label image classification (and, later, canary text) DataModules with offline sources.

The folder is named ``data`` in the repository but always imported as ``memcurve.data``.
"""

from memcurve.data.label_noise import LabelNoise, make_symmetric_noise
from memcurve.data.noisy_label_datamodule import AUGMENTATIONS, NoisyLabelDataModule, NoisyLabelDataset
from memcurve.data.sources import SOURCES, ImageSplits, SourceInfo, load_image_source, source_info

__all__ = [
    "AUGMENTATIONS",
    "SOURCES",
    "ImageSplits",
    "LabelNoise",
    "NoisyLabelDataModule",
    "NoisyLabelDataset",
    "SourceInfo",
    "load_image_source",
    "make_symmetric_noise",
    "source_info",
]
