"""Data: noisy-label image classification, canary text (with an optional perturbation suite) and plain text
DataModules with offline sources.

The folder is named ``data`` in the repository but always imported as ``memcurve.data``.
"""

from memcurve.data.canary_text_datamodule import CanaryTextDataModule
from memcurve.data.label_noise import LabelNoise, make_symmetric_noise
from memcurve.data.noisy_label_datamodule import AUGMENTATIONS, NoisyLabelDataModule, NoisyLabelDataset
from memcurve.data.perturbations import REASONING_TASKS, PerturbationSettings, ProbeSet
from memcurve.data.sources import SOURCES, ImageSplits, SourceInfo, load_image_source, source_info
from memcurve.data.text_datamodule import TextDataModule
from memcurve.data.text_sources import (
    TokenBlockDataset,
    build_tokenizer,
    encode_texts,
    load_canary_texts,
    load_documents,
    token_stream,
)

__all__ = [
    "AUGMENTATIONS",
    "REASONING_TASKS",
    "SOURCES",
    "CanaryTextDataModule",
    "ImageSplits",
    "LabelNoise",
    "NoisyLabelDataModule",
    "NoisyLabelDataset",
    "PerturbationSettings",
    "ProbeSet",
    "SourceInfo",
    "TextDataModule",
    "TokenBlockDataset",
    "build_tokenizer",
    "encode_texts",
    "load_canary_texts",
    "load_documents",
    "load_image_source",
    "make_symmetric_noise",
    "source_info",
    "token_stream",
]
