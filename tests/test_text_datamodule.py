"""TextDataModule: token blocks of plain text for a pretrained causal LM saved in a folder (tiny OLMo-2 + a BPE
trained offline): blocks cover the text once and in order, masks, determinism, the split, eager errors, and a
K-FAC factor pass through ``trainer.validate`` on ``CausalLMModule(model=<folder>)``."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from memcurve.callbacks import KFACFactors
from memcurve.curvature import load_factors
from memcurve.data import TextDataModule, TokenBlockDataset, load_documents
from memcurve.data.text_sources import EOS_TOKEN, build_tokenizer
from memcurve.lightning_modules import CausalLMModule

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A stitch in time saves nine, or so the tailors say.",
    "Curvature tells which directions of the weights the data care about.",
    "Memorized examples hide in the flat directions of the loss.",
    "Every block holds a fixed number of tokens, the last one padded.",
    "Tokenizers split text into pieces that a model reads one by one.",
    "Pretrained language models recite famous quotes word for word.",
    "Small models built from a config run fast on a laptop CPU.",
]
BLOCK = 16


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny OLMo-2 and its tokenizer (no pad token: EOS pads) saved like a Hugging Face model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_olmo2")
    backend = build_tokenizer("train", SENTENCES * 4, vocab_size=300).backend_tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN)
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(
        "olmo2",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("texts")
    txt = folder / "text.txt"
    txt.write_text("\n\n".join(" ".join(SENTENCES[i : i + 2]) for i in range(0, len(SENTENCES), 2)) + "\n")
    jsonl = folder / "text.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s, "id": i}) + "\n" for i, s in enumerate(SENTENCES)))
    return {"txt": txt, "jsonl": jsonl}


def expected_stream(source: Path, tokenizer) -> list[int]:
    stream = []
    for document in load_documents(str(source)):
        stream += [*tokenizer(document, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return stream


def rows(dataset: TokenBlockDataset) -> tuple[torch.Tensor, torch.Tensor]:
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_blocks_hold_every_token_once_in_order(model_folder, texts, kind):
    dm = TextDataModule(str(texts[kind]), str(model_folder), block_size=BLOCK, batch_size=4)
    dm.setup("validate")
    tokenizer = dm.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the saved tokenizer has no pad token: EOS pads
    ids, mask = rows(dm.train_set)
    stream = expected_stream(texts[kind], tokenizer)
    count, rest = divmod(len(stream), BLOCK)
    assert ids.shape == mask.shape == (count + (rest >= 2), BLOCK)
    assert ids[mask.bool()].tolist() == (stream if rest != 1 else stream[:-1])
    assert mask[:count].eq(1).all()
    if rest >= 2:  # the last block: the remainder, then masked padding
        assert mask[-1].tolist() == [1] * rest + [0] * (BLOCK - rest)
        assert ids[-1, rest:].eq(tokenizer.pad_token_id).all()
    assert dm.val_set is dm.train_set  # val_fraction=0: val is the whole text
    batches = list(dm.val_dataloader())
    assert set(batches[0]) == {"input_ids", "attention_mask", "index"}
    assert batches[0]["input_ids"].shape == (4, BLOCK) and batches[0]["input_ids"].dtype == torch.long
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(ids)))
    assert [len(b["index"]) for b in dm.train_dataloader()] == [len(b["index"]) for b in batches]


def test_from_stream_pads_the_remainder_or_drops_it():
    padded = TokenBlockDataset.from_stream(np.arange(10), 4, pad_token_id=-1)
    assert padded.blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
    assert padded.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert padded.num_tokens == 10 and padded[2]["attention_mask"].tolist() == [1, 1, 0, 0]
    assert TokenBlockDataset.from_stream(np.arange(9), 4, pad_token_id=-1).blocks.shape == (2, 4)  # one token left
    dropped = TokenBlockDataset.from_stream(np.arange(10), 4)
    assert dropped.blocks.shape == (2, 4) and dropped.attention_mask is None and dropped[1]["attention_mask"].all()


def test_deterministic_split_and_block_subset(model_folder, texts):
    options = dict(block_size=8, val_fraction=0.25, max_blocks=5, seed=3)
    first, second = (TextDataModule(str(texts["jsonl"]), str(model_folder), **options) for _ in range(2))
    first.setup(), second.setup()
    for split in ("train_set", "val_set"):
        for mine, theirs in zip(rows(getattr(first, split)), rows(getattr(second, split))):
            assert torch.equal(mine, theirs)
    assert len(first.train_set) == 5 and len(first.val_set) <= 5
    # 2 of the 8 documents are held out; both splits keep the original order
    assert len(first.val_documents) == 2 and len(first.train_documents) == 6
    for part in (first.train_documents, first.val_documents):
        assert part == [s for s in SENTENCES if s in part]
    assert set(first.train_documents) | set(first.val_documents) == set(SENTENCES)
    other = TextDataModule(str(texts["jsonl"]), str(model_folder), **(options | {"seed": 4}))
    other.setup()
    assert other.val_documents != first.val_documents or not torch.equal(other.train_set.blocks, first.train_set.blocks)


@pytest.mark.parametrize(
    ("text", "kwargs", "error", "message"),
    [
        ("missing.txt", {}, FileNotFoundError, r"text='.*missing.txt': no such file or folder; give one of"),
        ("empty.txt", {}, ValueError, r"text='.*empty.txt' is an empty file"),
        ("data.csv", {}, ValueError, r"text='.*data.csv' is a .csv file; give one of"),
        ("hf:", {}, ValueError, r"text='hf:' needs a dataset name or path after 'hf:'"),
        ("text.txt", {"block_size": 1}, ValueError, r"block_size=1 must be an integer >= 2"),
        ("text.txt", {"val_fraction": 1.0}, ValueError, r"val_fraction=1.0 must be a number in \[0, 1\)"),
        ("text.txt", {"max_blocks": 0}, ValueError, r"max_blocks=0 must be a positive integer or None"),
        ("text.txt", {"tokenizer": "./no/such/model"}, FileNotFoundError, r"tokenizer='./no/such/model': no such"),
    ],
)
def test_bad_arguments_fail_eagerly(tmp_path, model_folder, text, kwargs, error, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "text.txt").write_text("some text\n")
    source = text if text.startswith("hf:") else str(tmp_path / text)
    kwargs = {"tokenizer": str(model_folder)} | kwargs
    with pytest.raises(error, match=message):
        TextDataModule(source, **kwargs)


def test_text_without_documents_fails_at_setup(tmp_path, model_folder):
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    dm = TextDataModule(str(tmp_path / "blank.txt"), str(model_folder))
    with pytest.raises(ValueError, match=r"text='.*blank.txt': source='.*' holds no non-empty documents"):
        dm.setup()


@pytest.mark.parametrize("dataloader_split", ["train", "val"])
def test_kfac_factors_of_a_model_folder_through_validate(tmp_path, model_folder, texts, dataloader_split):
    dm = TextDataModule(str(texts["txt"]), str(model_folder), block_size=BLOCK, batch_size=4)
    module = CausalLMModule(model=str(model_folder))
    callback = KFACFactors(layers=["model.model.layers.*.mlp.up_proj"], when="validate", output_dir=str(tmp_path))
    if dataloader_split == "val":
        callback.dataloader = "val"  # set after construction: the constructor's options are being reworked
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        accelerator="cpu",
        callbacks=[callback],
    )
    results = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert np.isfinite(results["val/perplexity"])
    (path,) = callback.saved_paths
    stored = load_factors(path, module)
    assert sorted(stored.layers) == ["model.model.layers.0.mlp.up_proj", "model.model.layers.1.mlp.up_proj"]
    # every token with a next token in its block is a sample (padding and each block's last position are not)
    _, mask = rows(dm.train_set)
    samples = int((mask[:, :-1] & mask[:, 1:]).sum())
    assert int(stored.layers["model.model.layers.0.mlp.up_proj"].count_A) == samples
