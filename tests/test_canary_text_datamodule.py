"""CanaryTextDataModule and its text sources: insertion counts, controls, determinism, persistence, bad input."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from memcurve.data import CanaryTextDataModule
from memcurve.data import text_sources as sources
from memcurve.data.canary_text_datamodule import CANARY_FILENAME
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
