"""Reading K-FAC factors, whatever their format: one validated safetensors file or a sharded index.

``load_factors(path)`` reads a single file (:mod:`memcurve.curvature.factor_file`) or, for ``*.index.json``, the
per-owner shards of a sharded run (:mod:`memcurve.curvature.sharded_storage`, layers read lazily). Both validate
the same metadata and, given a model, refuse factors made for another model. The writers are
``save_factors`` (one file) and ``save_sharded_factors`` (per-rank shards + index).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from memcurve.curvature.factor_file import (
    FactorFileError,
    StoredFactors,
    check_layers_match_model,
    load_factor_file,
    model_fingerprint,
    save_factors,
)
from memcurve.curvature.sharded_storage import is_index_path, load_sharded_factors, save_sharded_factors

__all__ = [
    "FactorFileError",
    "StoredFactors",
    "check_layers_match_model",
    "load_factors",
    "model_fingerprint",
    "save_factors",
    "save_sharded_factors",
]


def load_factors(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    expect: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> StoredFactors:
    """Read and validate a factor file or a sharded index (``*.index.json``; ``layers`` is then a lazy mapping).

    ``expect`` pins settings, e.g. ``{"mode": "expand"}``; ``model`` (optional) must match the file: its layer
    shapes and fingerprint (factors of another model raise ``FactorFileError``).
    """
    if is_index_path(path):
        return load_sharded_factors(path, model, expect=expect, device=device)
    return load_factor_file(path, model, expect=expect, device=device)
