"""Shared fixtures: tiny real models and the embedded digits data, CPU only, offline."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_VIT_KWARGS = {"img_size": 8, "in_chans": 1, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture
def tiny_vit_kwargs() -> dict:
    return dict(TINY_VIT_KWARGS)


@pytest.fixture(scope="module")
def one_thread():
    """Tensors in these tests are tiny: one intra-op thread avoids oversubscription on a busy 2-core machine
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
