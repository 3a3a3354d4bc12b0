"""TextDataModule: plain text for a pretrained causal LM — token blocks for K-FAC factors, evaluation or fine-tuning.

The direct Hugging Face path (``memcurve factors --model <HF folder or hub id> --text <source>``): the text is read
with :func:`~memcurve.data.text_sources.load_documents` (a ``.txt`` file split into documents at blank lines or
``%`` lines, a folder of ``.txt`` files, a ``.jsonl`` file, or ``hf:<name or path>[:<config>]``), tokenized with
the model's own tokenizer (:func:`~memcurve.data.text_sources.build_tokenizer`: ``AutoTokenizer.from_pretrained``
of the model folder or hub id; a tokenizer without a pad token pads with EOS), without special tokens.

Blocks: the documents of a split are laid end to end, each followed by EOS, and the stream is cut into
non-overlapping blocks of ``block_size`` tokens, in order; the last, shorter block is right-padded with the pad
token and masked out (``attention_mask`` 0), so every token of the text is in exactly one block (a single leftover
token, which would have no next token to predict, is dropped). Batches are dicts ``input_ids`` [B, T] long,
``attention_mask`` [B, T] long and ``index`` [B] long (the block's row in its split), what
:class:`~memcurve.lightning_modules.CausalLMModule` and its ``CausalLMFisherAdapter`` read: the next-token labels
are derived from them (padding and each block's last position carry no loss and are left out of the factors).

Splits: with ``val_fraction=0`` (default) ``train`` and ``val`` are both the whole text (a factor pass over a
pretrained model needs no held-out data, and ``trainer.validate`` needs a ``val`` loader); otherwise a seeded
random ``val_fraction`` of the documents forms ``val``, the rest ``train``, each in its original order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from memcurve.data.label_noise import seeded_rng
from memcurve.data.text_sources import (
    TokenBlockDataset,
    TokenizerFacts,
    build_tokenizer,
    encode_texts,
    load_documents,
    token_stream,
)
from memcurve.utils.arguments import check_int, check_positive_int
from memcurve.utils.sampling import unpadded_shard_sampler

__all__ = ["TEXT_SOURCES", "TextDataModule"]

TEXT_SOURCES = ("<file.txt>", "<file.jsonl>", "<folder of .txt>", "hf:<name or path>[:<config>]")
_VAL_STREAM = 20  # seeded_rng stream of the document split
_BLOCK_STREAM = 21  # seeded_rng stream of the max_blocks subset


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~"))


def _check_text(text: Any) -> None:
    if not isinstance(text, str) or not text:
        raise ValueError(f"text={text!r} must be a non-empty string: one of {TEXT_SOURCES}")
    if text.startswith("hf:"):
        if not text[3:]:
            raise ValueError(f"text={text!r} needs a dataset name or path after 'hf:', e.g. 'hf:wikitext'")
        return
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"text={text!r}: no such file or folder; give one of {TEXT_SOURCES}")
    if path.is_dir():
        if next(path.rglob("*.txt"), None) is None:
            raise ValueError(f"text={text!r} is a folder without .txt files; give one of {TEXT_SOURCES}")
    elif path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"text={text!r} is a {path.suffix or 'suffix-less'} file; give one of {TEXT_SOURCES}")
    elif path.stat().st_size == 0:
        raise ValueError(f"text={text!r} is an empty file; give a file with text in it")


class TextDataModule(TokenizerFacts, pl.LightningDataModule):
    """Token blocks of plain text for a pretrained causal LM (see the module docstring).

    Args:
        text: ``.txt`` file, ``.jsonl`` file, folder of ``.txt`` files, or ``hf:<name or path>[:<config>]``.
        tokenizer: the model folder or hub id (``AutoTokenizer.from_pretrained``), or a ``tokenizer.json`` path.
        block_size: tokens per block (at least 2: one next-token pair); at most the model's context length.
        batch_size: training batch size (per process).
        eval_batch_size: batch size of ``val`` and of the unshuffled ``train`` pass (default: ``batch_size``).
        max_documents: keep a seeded random subset of this many documents (in order), None for all.
        max_blocks: keep a seeded random subset of this many blocks of each split (in order), None for all.
        val_fraction: fraction of the documents held out as ``val``, in [0, 1); 0: ``val`` is the whole text.
        text_column: document field of ``.jsonl`` and ``hf:`` sources.
        split: dataset split of ``hf:`` sources.
        num_workers: DataLoader workers; the data do not depend on it.
        seed: seeds the document subset, the split, the block subset and the training shuffle.
    """

    def __init__(
        self,
        text: str,
        tokenizer: str,
        block_size: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_documents: int | None = None,
        max_blocks: int | None = None,
        val_fraction: float = 0.0,
        text_column: str = "text",
        split: str = "train",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_text(text)
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(
                f"tokenizer={tokenizer!r} must be the model folder, a hub id or a tokenizer.json path (non-empty)"
            )
        if _looks_local(tokenizer) and not Path(tokenizer).expanduser().exists():
            raise FileNotFoundError(f"tokenizer={tokenizer!r}: no such folder or file; give the model folder")
        check_int("block_size", block_size, 2, " (a block needs a token and the next one to predict)")
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size, allow_none=True)
        check_positive_int("max_documents", max_documents, allow_none=True)
        check_positive_int("max_blocks", max_blocks, allow_none=True)
        numeric = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
        if not numeric or not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction!r} must be a number in [0, 1)")
        for name, value in (("text_column", text_column), ("split", split)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name}={value!r} must be a non-empty string")
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed, 0)
        self.save_hyperparameters()
        self.text = text
        self.tokenizer_spec = tokenizer
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.max_documents = max_documents
        self.max_blocks = max_blocks
        self.val_fraction = float(val_fraction)
        self.text_column = text_column
        self.split = split
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer = None
        self.train_documents: list[str] = []
        self.val_documents: list[str] = []
        self.train_set: TokenBlockDataset | None = None
        self.val_set: TokenBlockDataset | None = None

    # -- building ------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to download: local text, or a hub dataset / tokenizer fetched by ``setup`` when online."""

    def setup(self, stage: str | None = None) -> None:
        """Read, tokenize and block the text once (idempotent)."""
        self._build()

    def _build(self) -> None:
        if self.train_set is not None:
            return
        try:
            documents = load_documents(
                self.text,
                text_column=self.text_column,
                split=self.split,
                max_documents=self.max_documents,
                seed=self.seed,
            )
        except (ValueError, FileNotFoundError) as error:  # name the DataModule's argument, not the loader's
            raise type(error)(f"text={self.text!r}: {error}") from error
        train_documents, val_documents = self._split_documents(documents)
        tokenizer = build_tokenizer(self.tokenizer_spec, train_documents)
        eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
        train_set = self._blocks(encode_texts(tokenizer, train_documents), eos, pad)
        if len(train_set) == 0:
            raise ValueError(f"text={self.text!r} holds fewer than 2 tokens; nothing to make a block of")
        val_set = self._blocks(encode_texts(tokenizer, val_documents), eos, pad) if val_documents else train_set
        self._tokenizer = tokenizer
        self.train_documents, self.val_documents = train_documents, val_documents or train_documents
        self.train_set, self.val_set = train_set, val_set

    def _split_documents(self, documents: list[str]) -> tuple[list[str], list[str]]:
        """(train, val) documents, each in its original order; val empty when ``val_fraction`` is 0."""
        if self.val_fraction == 0:
            return documents, []
        count = len(documents)
        num_val = max(1, math.floor(self.val_fraction * count + 0.5))
        if count - num_val < 1:
            raise ValueError(
                f"val_fraction={self.val_fraction} holds out {num_val} of the {count} documents of "
                f"text={self.text!r}; at least one must remain for training (lower val_fraction or set it to 0)"
            )
        is_val = np.zeros(count, dtype=bool)
        is_val[seeded_rng(self.seed, stream=_VAL_STREAM).choice(count, size=num_val, replace=False)] = True
        return [d for d, v in zip(documents, is_val) if not v], [d for d, v in zip(documents, is_val) if v]

    def _blocks(self, token_lists: list[list[int]], eos: int, pad: int) -> TokenBlockDataset:
        dataset = TokenBlockDataset.from_stream(token_stream(token_lists, eos), self.block_size, pad_token_id=pad)
        if self.max_blocks is None or self.max_blocks >= len(dataset):
            return dataset
        rng = seeded_rng(self.seed, stream=_BLOCK_STREAM)
        keep = torch.from_numpy(np.sort(rng.choice(len(dataset), size=self.max_blocks, replace=False)))
        mask = None if dataset.attention_mask is None else dataset.attention_mask[keep]
        return TokenBlockDataset(dataset.blocks[keep], mask)

    # -- loaders -------------------------------------------------------------------------------------
    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError("TextDataModule.setup() must run before its dataloaders are requested")

    def _loader(self, dataset: TokenBlockDataset, batch_size: int, sampler=None, generator=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=generator is not None and sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Training blocks, shuffled by a generator seeded with ``seed``."""
        self._require_setup()
        return self._loader(self.train_set, self.batch_size, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        return self.evaluation_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def memorization_dataloader(self) -> DataLoader:
        """The training blocks in order, unshuffled (what ``KFACFactors(dataloader="train")`` reads)."""
        return self.evaluation_dataloader("train")

    def evaluation_dataloader(self, split: Literal["train", "val"], shard: bool = True) -> DataLoader:
        """``train`` or ``val`` blocks in order; under DDP each rank gets an unpadded shard unless ``shard=False``
        (one process evaluating everything)."""
        self._require_setup()
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not one of ('train', 'val')")
        dataset = self.train_set if split == "train" else self.val_set
        sampler = unpadded_shard_sampler(dataset, self.trainer) if shard else None
        return self._loader(dataset, self.eval_batch_size, sampler=sampler)
