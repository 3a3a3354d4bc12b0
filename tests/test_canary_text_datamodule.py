"""CanaryTextDataModule and its text sources: insertion counts, controls, determinism, persistence, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import yaml

from memcurve.data import CanaryTextDataModule
from memcurve.data import text_sources as sources
from memcurve.data.canary_text_datamodule import CANARY_FILENAME, _insertion_digest
from memcurve.data.text_sources import build_tokenizer, load_canary_texts, load_documents
from memcurve.utils.sampling import UnpaddedDistributedSampler

SMALL = {
    "corpus_fraction": 0.03,
    "vocab_size": 320,
    "canaries_per_level": 2,
    "block_size": 48,
    "val_fraction": 0.1,
    "batch_size": 8,
    "eval_batch_size": 16,
}
CANARY_LINES = [
    f"Canary number {i}: the {word} heron of Valparaiso counts {i * 7} silver lanterns before dawn."
    for i, word in enumerate(["amber", "brisk", "cobalt", "dusky", "eager", "fabled", "gilded", "hollow"])
]


def small(**overrides) -> CanaryTextDataModule:
    options = dict(SMALL)
    options.update(overrides)
    datamodule = CanaryTextDataModule(**options)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="module")
def dm() -> CanaryTextDataModule:
    return small()


def fake_trainer(rank: int = 0, world_size: int = 1, log_dir=None) -> SimpleNamespace:
    logger = object() if log_dir is not None else None
    return SimpleNamespace(
        global_rank=rank, world_size=world_size, log_dir=log_dir, logger=logger, is_global_zero=rank == 0
    )


def occurrences(stream: np.ndarray, pattern: list[int]) -> np.ndarray:
    """Start positions of ``pattern`` in ``stream``."""
    if len(stream) < len(pattern):
        return np.zeros(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(stream, len(pattern))
    return np.flatnonzero((windows == np.asarray(pattern)).all(axis=1))


# -- insertion -----------------------------------------------------------------------------------------------
def test_each_canary_is_inserted_exactly_level_times(dm):
    eos = dm.eos_token_id
    log = dm.insertion_log
    assert [c["level"] for c in log["canaries"]] == [0, 0, 1, 1, 4, 4, 16, 16, 64, 64]
    trained = dm.train_set.blocks.flatten().numpy()
    for canary in log["canaries"]:
        ids = canary["token_ids"]
        assert len(canary["offsets"]) == canary["level"] == len(canary["blocks"])
        # The stream holds the canary, preceded by EOS, exactly at the logged offsets and nowhere else.
        found = occurrences(dm.train_stream, [eos, *ids]) + 1
        assert found.tolist() == canary["offsets"]
        for start, block in zip(canary["offsets"], canary["blocks"]):
            assert start + len(ids) < len(trained) and dm.train_stream[start + len(ids)] == eos
            assert block == start // dm.block_size
        # Every copy lies in the trained blocks (none in the dropped remainder).
        assert len(occurrences(trained, ids)) == canary["level"]


def test_never_seen_controls_are_nowhere_and_no_canary_is_in_val(dm):
    for canary in dm.insertion_log["canaries"]:
        if canary["level"] == 0:
            assert len(occurrences(dm.train_stream, canary["token_ids"])) == 0
        assert len(occurrences(dm.val_stream, canary["token_ids"])) == 0
        assert canary["text"] not in "\n".join(dm.train_documents + dm.val_documents)


def test_documents_holding_a_canary_are_removed(tmp_path):
    corpus = tmp_path / "corpus.txt"
    body = [f"Document {i} talks about weather, tea, rivers and the price of {i} apples today." for i in range(60)]
    body[5] = f"Someone once said {CANARY_LINES[3]} and then left."
    body[9] = body[8]  # an exact duplicate
    corpus.write_text("\n\n".join(body))
    datamodule = small(
        corpus=str(corpus),
        corpus_fraction=None,
        canaries=CANARY_LINES,
        duplicate_levels=(0, 2),
        canaries_per_level=3,
        block_size=32,
        prefix_length=4,
        suffix_length=6,
        vocab_size=300,
    )
    documents = datamodule.insertion_log["documents"]
    assert documents["duplicates_removed"] == 1 and documents["holding_a_canary_removed"] == 1
    assert documents["train"] + documents["val"] == 58
    assert not any("Someone once said" in doc for doc in datamodule.train_documents + datamodule.val_documents)


def test_same_seed_same_data_and_other_seed_other_placement(dm):
    again = small()
    assert np.array_equal(again.train_stream, dm.train_stream) and np.array_equal(again.val_stream, dm.val_stream)
    assert again.insertion_log == dm.insertion_log
    assert torch.equal(again.training_windows(20, 16, seed=3), dm.training_windows(20, 16, seed=3))
    first = [b["index"] for b in dm.train_dataloader()]
    assert all(torch.equal(a["index"], b) for a, b in zip(again.train_dataloader(), first))
    other = small(seed=1)
    offsets = [c["offsets"] for c in dm.insertion_log["canaries"]]
    assert [c["offsets"] for c in other.insertion_log["canaries"]] != offsets
    assert other.insertion_log["sha256"] != dm.insertion_log["sha256"]


# -- persistence ---------------------------------------------------------------------------------------------
def test_log_file_is_saved_and_complete(tmp_path, dm):
    datamodule = small(log_dir=str(tmp_path))
    saved = json.loads((tmp_path / CANARY_FILENAME).read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(datamodule.insertion_log)) and saved["sha256"] == dm.insertion_log["sha256"]
    assert len(saved["canaries"]) == 10
    for canary in saved["canaries"]:
        assert {"id", "text", "level", "token_ids", "offsets", "blocks"} <= set(canary)
    # Beside a logging trainer's log_dir, as the image DataModule does; a second setup is a no-op.
    trainer_dir = tmp_path / "trainer_logs"
    datamodule = CanaryTextDataModule(**SMALL)
    datamodule.trainer = fake_trainer(log_dir=str(trainer_dir))
    datamodule.setup("fit")
    datamodule.setup("validate")
    assert json.loads((trainer_dir / CANARY_FILENAME).read_text(encoding="utf-8"))["sha256"] == saved["sha256"]


def test_state_dict_round_trip_and_mismatch_errors(tmp_path, dm):
    state = dm.state_dict()
    assert state["canary_insertion"]["sha256"] == dm.insertion_log["sha256"]
    assert CanaryTextDataModule(**SMALL).state_dict() == {}
    resumed = CanaryTextDataModule(**SMALL)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # before setup: checked in setup
    resumed.setup("fit")
    resumed.load_state_dict(state)  # after setup: checked at once
    other = CanaryTextDataModule(**{**SMALL, "seed": 1})
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"does not match.*offsets: \d+ of 10 canaries differ"):
        other.setup("fit")
    with pytest.raises(ValueError, match="tokenizer vocabulary"):
        small(vocab_size=330).load_state_dict(state)
    tampered = json.loads(json.dumps(state))
    tampered["canary_insertion"]["canaries"][3]["offsets"] = [0]
    with pytest.raises(ValueError, match="corrupt"):
        resumed.load_state_dict(tampered)
    # Resuming into a log folder written by a different insertion.
    small(log_dir=str(tmp_path))
    with pytest.raises(ValueError, match="does not match"):
        small(log_dir=str(tmp_path), seed=2)


# -- batches -------------------------------------------------------------------------------------------------
def test_blocks_batches_and_disjoint_splits(dm):
    assert dm.train_set.blocks.dtype == torch.long and dm.train_set.blocks.shape[1] == 48
    assert dm.training_token_count == dm.train_set.blocks.numel() == dm.insertion_log["training_token_count"]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "index"}
    assert batch["input_ids"].shape == (8, 48) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and bool((batch["attention_mask"] == 1).all())
    assert batch["index"].shape == (8,) and batch["index"].dtype == torch.long
    assert torch.equal(batch["input_ids"], dm.train_set.blocks[batch["index"]])
    for loader, size in ((dm.memorization_dataloader(), len(dm.train_set)), (dm.val_dataloader(), len(dm.val_set))):
        indices = torch.cat([b["index"] for b in loader])
        assert torch.equal(indices, torch.arange(size))
    shuffled = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert not torch.equal(shuffled, torch.arange(len(shuffled))) and torch.equal(
        shuffled.sort().values, indices.new_tensor(range(len(shuffled)))
    )
    assert not set(dm.train_documents) & set(dm.val_documents) and len(dm.val_documents) > 0
    assert dm.vocab_size == len(dm.tokenizer) and int(dm.train_set.blocks.max()) < dm.vocab_size


def test_evaluation_loader_shards_without_padding(dm):
    dm.trainer = fake_trainer(rank=1, world_size=2)
    try:
        loader = dm.evaluation_dataloader("train")
        assert isinstance(loader.sampler, UnpaddedDistributedSampler)
        assert torch.cat([b["index"] for b in loader]).tolist() == list(range(1, len(dm.train_set), 2))
        assert not isinstance(dm.evaluation_dataloader("val", shard=False).sampler, UnpaddedDistributedSampler)
    finally:
        dm.trainer = None
    with pytest.raises(ValueError, match="split='test'"):
        dm.evaluation_dataloader("test")
    with pytest.raises(RuntimeError, match="setup"):
        CanaryTextDataModule(**SMALL).train_dataloader()


def test_canary_examples_are_prompts_and_true_continuations(dm):
    examples = dm.canary_examples()
    canaries = dm.insertion_log["canaries"]
    assert examples["suffixes"].shape == (10, 12) and examples["suffixes"].dtype == torch.long
    assert examples["levels"].tolist() == [c["level"] for c in canaries]
    assert examples["ids"].tolist() == list(range(10)) and examples["texts"] == [c["text"] for c in canaries]
    for prefix, suffix, canary in zip(examples["prefixes"], examples["suffixes"], canaries):
        assert prefix[0] == dm.eos_token_id and len(prefix) == 9
        assert prefix[1:] + suffix.tolist() == canary["token_ids"][:20]
        assert canary["token_ids"] == dm.tokenizer(canary["text"], add_special_tokens=False)["input_ids"]
    assert dm.duplicate_levels == (0, 1, 4, 16, 64) and dm.pad_token_id == 1 and dm.eos_token_id == 0


def test_training_windows_avoid_canaries(dm):
    windows, offsets = dm.training_windows(50, 24, seed=1, return_offsets=True)
    assert windows.shape == (50, 24) and windows.dtype == torch.long
    assert len(set(offsets.tolist())) == 50 and torch.equal(offsets, offsets.sort().values)
    stream = torch.from_numpy(dm.train_stream)
    for window, start in zip(windows, offsets.tolist()):
        assert torch.equal(window, stream[start : start + 24])
        assert start // 48 == (start + 23) // 48  # inside one block
        for canary in dm.insertion_log["canaries"]:
            for copy in canary["offsets"]:
                assert start + 24 <= copy or start > copy + len(canary["token_ids"])
    assert not torch.equal(dm.training_windows(50, 24, seed=2), windows)
    with pytest.raises(ValueError, match="block_size"):
        dm.training_windows(1, 49)


# -- bad arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"duplicate_levels": (0, -1, 4)}, r"duplicate_levels=.*-1"),
        ({"duplicate_levels": ()}, "empty"),
        ({"duplicate_levels": (0, 4, 4)}, "repeats"),
        ({"prefix_length": 0}, "prefix_length=0"),
        ({"suffix_length": -2}, "suffix_length=-2"),
        ({"block_size": 1}, "block_size=1"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"corpus_fraction": 0.0}, "corpus_fraction=0.0"),
        ({"vocab_size": 100}, "vocab_size=100"),
        ({"canaries_per_level": 0}, "canaries_per_level=0"),
        ({"canaries": 3}, "canaries=3"),
    ],
)
def test_bad_arguments_fail_eagerly(overrides, message):
    with pytest.raises(ValueError, match=message):
        CanaryTextDataModule(**{**SMALL, **overrides})


def test_too_few_canaries_names_the_numbers():
    with pytest.raises(ValueError, match=r"has 279 canaries.*5 duplicate levels × canaries_per_level=60 need 300"):
        small(canaries_per_level=60)


def test_bad_sources_in_the_datamodule(tmp_path):
    with pytest.raises(ValueError, match="corpus='nonsense'"):
        small(corpus="nonsense")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        small(corpus=str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="tokenizer="):
        small(tokenizer=str(tmp_path / "missing" / "tokenizer.json"))


# -- sources -------------------------------------------------------------------------------------------------
def test_fortune_documents():
    documents = load_documents("fortune")
    assert len(documents) > 1000 and all(doc == doc.strip() and doc for doc in documents)
    assert not any("Redistribution and use in source" in doc for doc in documents)  # license file skipped
    quarter = load_documents("fortune", fraction=0.25, seed=0)
    assert len(quarter) == round(0.25 * len(documents)) and quarter == load_documents("fortune", fraction=0.25)
    assert quarter != load_documents("fortune", fraction=0.25, seed=1)
    assert len(load_documents("fortune", max_documents=7)) == 7


def test_text_jsonl_folder_and_hf_documents(tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("first document\nstill first\n\n\n  second document \n \nthird\n")
    assert load_documents(str(blank)) == ["first document\nstill first", "second document", "third"]
    percent = tmp_path / "sub" / "percent.txt"
    percent.parent.mkdir()
    percent.write_text("one\n\nstill one\n%\ntwo\n%\n")
    assert load_documents(str(percent)) == ["one\n\nstill one", "two"]
    assert load_documents(str(tmp_path)) == [
        "first document\nstill first",
        "second document",
        "third",
        "one\n\nstill one",
        "two",
    ]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"body": "alpha"}\n\n{"body": "beta", "x": 1}\n{"body": ""}\n')
    assert load_documents(str(jsonl), text_column="body") == ["alpha", "beta"]
    with pytest.raises(ValueError, match="text_column='text' is missing"):
        load_documents(str(jsonl))
    saved = tmp_path / "hf_dataset"
    datasets.Dataset.from_dict({"content": ["gamma", "delta", "  "], "n": [1, 2, 3]}).save_to_disk(str(saved))
    assert load_documents(f"hf:{saved}", text_column="content") == ["gamma", "delta"]
    with pytest.raises(ValueError, match="text_column='text' is not a column"):
        load_documents(f"hf:{saved}")
    with pytest.raises(ValueError, match="no non-empty documents"):
        (tmp_path / "empty.txt").write_text("\n\n")
        load_documents(str(tmp_path / "empty.txt"))


def test_bad_document_sources(tmp_path):
    with pytest.raises(ValueError, match=r"source='wikitext-nothing' is not supported; choose one of"):
        load_documents("wikitext-nothing")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_documents(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_documents(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match=r"fraction=1\.5"):
        load_documents("fortune", fraction=1.5)


def test_canary_sources(tmp_path, monkeypatch):
    quotes = load_canary_texts("quotely")
    assert len(quotes) > 200 and all(len(q) >= 70 for q in quotes) and len(set(quotes)) == len(quotes)
    assert all(q.startswith('"') for q in quotes) and sum(" — " in q for q in quotes) > 200
    assert all(len(q) <= 90 for q in load_canary_texts("quotely", min_chars=50, max_chars=90))
    fortune_quotes = load_canary_texts("fortune-quotes", min_chars=0)
    assert len(fortune_quotes) > 1000 and all("--" in q or "— " in q for q in fortune_quotes)
    path = tmp_path / "canaries.txt"
    path.write_text("\n".join([CANARY_LINES[0], "", "short", CANARY_LINES[1], CANARY_LINES[0]]))
    assert load_canary_texts(str(path), min_chars=20) == CANARY_LINES[:2]
    assert load_canary_texts([" x ", "x", "yy"], min_chars=1) == ["x", "yy"]
    with pytest.raises(ValueError, match="canaries='nothing-known' is not supported"):
        load_canary_texts("nothing-known")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_canary_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="holds no canary"):
        load_canary_texts(["tiny"], min_chars=70)
    # PyPI `quotes`: a clear ImportError without it, the sets' quotes attributed with it.
    monkeypatch.setitem(sys.modules, "quotes", None)
    with pytest.raises(ImportError, match="pip install quotes"):
        load_canary_texts("quotes")
    fake = SimpleNamespace(Quotes=lambda: SimpleNamespace(quotes={"ada": {"name": "Ada L.", "lines": [["A quote."]]}}))
    monkeypatch.setitem(sys.modules, "quotes", fake)
    assert load_canary_texts("quotes", min_chars=1) == ['"A quote." — Ada L.']


# -- tokenizers ----------------------------------------------------------------------------------------------
def test_trained_tokenizer_specials_round_trip_and_cache(tmp_path, monkeypatch):
    documents = load_documents("fortune", max_documents=300)
    tokenizer = build_tokenizer("train", documents, vocab_size=300, cache_dir=tmp_path)
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|padding|>"]) == [0, 1]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (0, 1, 300)
    sentence = "The quick brown fox — naïve café — jumps over 13 lazy dogs!\n\tTwice."
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sentence and 0 not in ids
    (cached,) = tmp_path.glob("*.json")
    stamp = cached.stat().st_mtime_ns
    monkeypatch.setattr(sources, "_train_bpe", lambda *a, **k: pytest.fail("the cached tokenizer was not reused"))
    again = build_tokenizer("train", documents, vocab_size=300, cache_dir=tmp_path)
    assert again.get_vocab() == tokenizer.get_vocab() and cached.stat().st_mtime_ns == stamp
    loaded = build_tokenizer(str(cached))
    assert loaded(sentence, add_special_tokens=False)["input_ids"] == ids and loaded.pad_token_id == 1
    folder = tmp_path / "saved"
    tokenizer.save_pretrained(str(folder))
    from_folder = build_tokenizer(str(folder))
    assert from_folder(sentence, add_special_tokens=False)["input_ids"] == ids and from_folder.eos_token_id == 0
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        build_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_tokenizer(str(tmp_path / "no_folder"))
    with pytest.raises(ValueError, match="vocab_size=10"):
        build_tokenizer("train", documents, vocab_size=10)


def test_datamodule_with_text_corpus_and_tokenizer_file(tmp_path, dm):
    path = tmp_path / "tokenizer.json"
    dm.tokenizer.backend_tokenizer.save(str(path))
    datamodule = small(tokenizer=str(path), canaries=CANARY_LINES, duplicate_levels=(0, 3), canaries_per_level=4)
    assert datamodule.tokenizer.get_vocab() == dm.tokenizer.get_vocab()
    assert sorted(len(c["offsets"]) for c in datamodule.insertion_log["canaries"]) == [0, 0, 0, 0, 3, 3, 3, 3]


# -- the never-trained oracle: the same stream without the planted copies of the memorized set -------------------
def stream_items(datamodule: CanaryTextDataModule) -> list[tuple[str, object]]:
    """The training stream as items in order: ``("canary", id)`` for each planted copy (its tokens and EOS, checked
    against the stream), ``("text", tokens)`` for the document tokens between copies."""
    stream = datamodule.train_stream
    copies = sorted(
        (start, canary["id"], canary["token_ids"])
        for canary in datamodule.insertion_log["canaries"]
        for start in canary["offsets"]
    )
    items, position = [], 0
    for start, canary_id, ids in copies:
        if start > position:
            items.append(("text", stream[position:start].tolist()))
        assert stream[start : start + len(ids) + 1].tolist() == [*ids, datamodule.eos_token_id]
        items.append(("canary", canary_id))
        position = start + len(ids) + 1
    items.append(("text", stream[position:].tolist()))
    return items


def without(items: list[tuple[str, object]], left_out: set[int]) -> list[tuple[str, object]]:
    """``items`` without the copies of ``left_out`` canaries, neighbouring text joined."""
    kept: list[tuple[str, object]] = []
    for kind, value in items:
        if kind == "canary" and value in left_out:
            continue
        if kind == "text" and kept and kept[-1][0] == "text":
            kept[-1] = ("text", kept[-1][1] + value)
        else:
            kept.append((kind, value))
    return kept


@pytest.fixture(scope="module")
def oracle() -> CanaryTextDataModule:
    return small(oracle_min_level=16)


def test_oracle_stream_is_the_full_stream_minus_exactly_the_planted_copies(dm, oracle):
    full_log, oracle_log = dm.insertion_log, oracle.insertion_log
    left_out = {c["id"] for c in full_log["canaries"] if c["level"] >= 16}
    assert len(left_out) == 4 and all(
        oracle.left_out(c["level"]) == (c["id"] in left_out) for c in full_log["canaries"]
    )
    # Item by item: the documents and the copies of levels 1 and 4 in the same order, the left-out copies gone.
    assert stream_items(oracle) == without(stream_items(dm), left_out)
    keep = np.ones(len(dm.train_stream), dtype=bool)
    for canary in full_log["canaries"]:
        if canary["id"] in left_out:
            for start in canary["offsets"]:
                keep[start : start + len(canary["token_ids"]) + 1] = False
    assert np.array_equal(dm.train_stream[keep], oracle.train_stream)
    assert len(dm.train_stream) - len(oracle.train_stream) == sum(
        c["level"] * (len(c["token_ids"]) + 1) for c in full_log["canaries"] if c["id"] in left_out
    )
    # Everything else identical: documents, validation stream, tokenizer, the canaries and their levels.
    assert oracle.train_documents == dm.train_documents and oracle.val_documents == dm.val_documents
    assert np.array_equal(oracle.val_stream, dm.val_stream) and torch.equal(oracle.val_set.blocks, dm.val_set.blocks)
    assert oracle_log["tokenizer_sha256"] == full_log["tokenizer_sha256"]
    fields = ("id", "text", "level", "source_index", "token_ids")
    assert [[c[f] for f in fields] for c in oracle_log["canaries"]] == [
        [c[f] for f in fields] for c in full_log["canaries"]
    ]
    for canary in oracle_log["canaries"]:
        found = occurrences(oracle.train_stream, [oracle.eos_token_id, *canary["token_ids"]]) + 1
        assert found.tolist() == canary["offsets"]
        if canary["id"] in left_out:
            assert (
                canary["offsets"] == canary["blocks"] == []
                and len(occurrences(oracle.train_stream, canary["token_ids"])) == 0
            )
        else:
            assert len(canary["offsets"]) == canary["level"]
            assert len(occurrences(oracle.train_set.blocks.flatten().numpy(), canary["token_ids"])) == canary["level"]
    examples, oracle_examples = dm.canary_examples(), oracle.canary_examples()
    assert oracle_examples["prefixes"] == examples["prefixes"] and oracle_examples["texts"] == examples["texts"]
    for key in ("suffixes", "levels", "ids"):
        assert torch.equal(oracle_examples[key], examples[key])
    assert oracle_log["oracle_min_level"] == 16 and full_log["oracle_min_level"] is None
    assert oracle_log["training_token_count"] < full_log["training_token_count"]
    assert oracle_log["sha256"] != full_log["sha256"]


def test_oracle_log_persistence_and_resume_checks(tmp_path, dm, oracle):
    # Logs of full streams keep their digest (written before oracle_min_level existed, or with it None).
    old = {key: value for key, value in dm.insertion_log.items() if key != "oracle_min_level"}
    assert _insertion_digest(old) == dm.insertion_log["sha256"]
    small(oracle_min_level=16, log_dir=str(tmp_path))
    saved = json.loads((tmp_path / CANARY_FILENAME).read_text(encoding="utf-8"))
    assert saved["sha256"] == oracle.insertion_log["sha256"] and saved["oracle_min_level"] == 16
    resumed = CanaryTextDataModule(**SMALL, oracle_min_level=16)
    resumed.load_state_dict(oracle.state_dict())
    resumed.setup("fit")
    with pytest.raises(ValueError, match=r"oracle_min_level: saved None, now 16"):
        oracle.load_state_dict(dm.state_dict())  # a full run's checkpoint resumed as the oracle
    with pytest.raises(ValueError, match=r"oracle_min_level: saved 16, now None.*oracle_min_level\) as the original"):
        dm.load_state_dict(oracle.state_dict())
    with pytest.raises(ValueError, match=r"oracle_min_level: saved 16, now 4"):
        small(oracle_min_level=4).load_state_dict(oracle.state_dict())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, r"oracle_min_level=0 must be an integer >= 1 \(None: the full stream\)"),
        (True, r"oracle_min_level=True must be an integer >= 1"),
        (1.5, r"oracle_min_level=1.5 must be an integer >= 1"),
        (65, r"oracle_min_level=65 leaves out no canary: the largest of duplicate_levels=\[0, 1, 4, 16, 64\] is 64"),
    ],
)
def test_bad_oracle_level_fails_eagerly(value, message):
    with pytest.raises(ValueError, match=message):
        CanaryTextDataModule(**{**SMALL, "oracle_min_level": value})


def test_oracle_protocol_config_is_the_protocol_config_with_the_oracle_stream(tmp_path, monkeypatch):
    """Training only, last.ckpt only, one run per seed into its own folder; nothing but the stream and the folder
    differs from the protocol's run config, and the left-out set is the module's memorized set."""
    from memcurve.cli import DEFAULT_SEED_OVERRIDES, _run_cli

    folder = Path(__file__).parents[1] / "configs" / "protocol"
    config = folder / "olmo2_tiny_canaries_oracle.yaml"
    settings = yaml.safe_load(config.read_text())
    base = yaml.safe_load((folder / "olmo2_tiny_canaries.yaml").read_text())
    assert (
        settings["data"]["init_args"].pop("oracle_min_level") == settings["model"]["init_args"]["memorized_min_level"]
    )
    assert settings["trainer"]["logger"]["init_args"].pop("name") == "olmo2_tiny_canaries_oracle"
    base["trainer"]["logger"]["init_args"].pop("name")
    assert settings == base
    monkeypatch.chdir(tmp_path)
    cli = _run_cli(
        "sweep", lambda parser: None, ["--config", str(config), *(o.format(seed=2) for o in DEFAULT_SEED_OVERRIDES)]
    )
    assert cli.config["seed_everything"] == 2 and cli.datamodule.seed == 2 and cli.datamodule.oracle_min_level == 16
    assert cli.config["trainer"]["logger"]["init_args"]["version"] == "seed2"
    assert cli.trainer.logger.log_dir.endswith("runs/protocol/olmo2_tiny_canaries_oracle/seed2")
    # The CLI override on the protocol config builds the same data module.
    override = _run_cli(
        "sweep",
        lambda parser: None,
        ["--config", str(folder / "olmo2_tiny_canaries.yaml"), "--data.init_args.oracle_min_level=16"],
    )
    assert override.datamodule.oracle_min_level == 16


# -- the perturbation suite (tests/test_perturbations.py) is off by default: the stream and the log are unchanged ---
BEFORE_THE_SUITE = {  # (insertion digest, sha256 of the whole log, of the training stream) the code produced for SMALL
    None: (
        "9ec1446bac682782f4f1814aa56e714e80edcdeaec4bd2c597f5ac8ea9744799",
        "8e8bfd13e24e18d5361c9f688ee994ad3dd10b5c7376d5f2a37cb14e1490aad5",
        "5f472ba8bf205b1cecc5316a615406cae999853570593ecdea9ecd59e5b3054b",
    ),
    16: (
        "10458b7229a1355bca6d6b15bfd672514019369ed482d51cea10608e9a9d8e36",
        "1cd847ab5639f3c5da523263f649f8ad91b704817d902c7e21bb49d2337e7357",
        "02940eb4f7f2d56caf28813013dc38d8451217d6de8050acc0c0ccf5b1eb9ad5",
    ),
}
VAL_STREAM_BEFORE_THE_SUITE = "0efe0f00a0f7a5bbf24f593e7ab5db5c4255ccfb10acc0ce553068af999dd2ac"


def test_without_perturbations_the_stream_and_the_log_are_those_of_before_the_suite(dm, oracle):
    import hashlib

    explicit = small(perturbations=None)
    for datamodule, oracle_level in ((dm, None), (oracle, 16), (explicit, None)):
        digest, log_sha, stream_sha = BEFORE_THE_SUITE[oracle_level]
        log = datamodule.insertion_log
        assert datamodule.perturbations is None and "perturbations" not in log
        assert log["sha256"] == _insertion_digest(log) == digest
        assert hashlib.sha256(json.dumps(log, sort_keys=True).encode()).hexdigest() == log_sha
        assert hashlib.sha256(datamodule.train_stream.tobytes()).hexdigest() == stream_sha
        assert hashlib.sha256(datamodule.val_stream.tobytes()).hexdigest() == VAL_STREAM_BEFORE_THE_SUITE
        assert datamodule.perturbation_examples() == {}
