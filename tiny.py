"""Tiny real models and data built from config (no download): what the tests, the GPU check's rehearsal and quick
experiments use, defined once."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["TINY_OLMO2", "RandomTokens", "RandomTokensData"]

TINY_OLMO2: dict = {  # an OLMo-2 of two decoder layers, hidden 32: builds in milliseconds
    "model_type": "olmo2",
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}


class RandomTokens(Dataset):
    """``n`` right-padded random token sequences of 3 to ``length`` tokens of :data:`TINY_OLMO2`'s vocabulary, with
    their index (the default 11 is odd: two ranks hold different numbers of them)."""

    def __init__(self, n: int = 11, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, TINY_OLMO2["vocab_size"], (n, length), generator=g)
        lengths = torch.randint(3, length + 1, (n,), generator=g)
        self.mask = (torch.arange(length)[None] < lengths[:, None]).long()
        self.ids[self.mask == 0] = TINY_OLMO2["pad_token_id"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "index": i}


class RandomTokensData(pl.LightningDataModule):
    """:class:`RandomTokens` as training and validation data, batches of 3."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(), batch_size=3)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(), batch_size=3)
