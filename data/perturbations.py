"""A HUBBLE-style perturbation suite planted beside the quote canaries: facts, passages, arithmetic and reasoning.

The paper's second finding is that removing low-curvature weight directions hurts some skills far more than others:
recitation collapses, closed-book fact recall and exact arithmetic drop sharply, question answering suffers less and
logical reasoning is preserved. The suite plants one kind of data per skill, so that a run can measure each of them
before and after an edit (``CausalLMModule.skills_metrics``). Four categories, from memorization to reasoning:

* ``passages``: long documents of the background corpus (``passage_min_chars`` to ``passage_max_chars``
  characters), taken out of the background and planted at duplicate levels (level 0: never-seen controls). Scored
  by greedy recall of ``passage_suffix_length`` tokens after the passage's first ``passage_prefix_length`` tokens.
* ``facts``: synthetic biographies of invented people, built from the word lists below (name, birth city, birth
  year, employer), one sentence each, planted at duplicate levels::

      Profile: Mara Quill was born in Tessaly in 1954 and works at Orbwell.

  Scored closed-book by questions that never occur in the training stream (``Q: Where was Mara Quill born? A:``
  -> `` Tessaly`` and an EOS), one per attribute, and by cloze prompts (the biography up to an attribute). A model
  trained from scratch has never seen the question format; ``fact_qa_demonstrations`` extra people (never scored)
  have their biography *and* their three question-answer pairs in the training stream, to teach it.
* ``arithmetic``: ``a+b=c`` with up to ``arithmetic_digits``-digit operands (``12+47=59``, or at a fixed width with
  ``arithmetic_zero_pad``: ``07+45=052``). A training set (each instance planted
  ``arithmetic_copies`` times) and a disjoint held-out set that shares no unordered operand pair with it (so a
  commuted training problem is not held out): held-out accuracy measures a computed skill, not recall.
* ``reasoning``: a rule over random symbols (``reasoning_task``): ``sort(3815)=1358``, ``max(3815)=8`` or
  ``rev(qkza)=azkq``. Held-out instances share no key with training ones (for ``sort`` the multiset of digits, so no
  held-out answer was ever a training answer; for ``max`` and ``reverse`` the instance itself).

Tokens. Biographies, questions and passages are tokenized as text (the answer of a question or cloze prompt is the
tokens that follow the prompt in the tokenization of prompt + answer; a tokenizer that merges across that boundary
is refused). Arithmetic and reasoning instances are tokenized one character at a time: a byte-level BPE always holds
every single character, while the BPE trained on fortune merges some digit runs (``19``, ``199``) and not others,
which would turn exact arithmetic into a lookup over irregular tokens. The tokenizer itself is trained on the
background documents only, as without the suite (members and controls are tokenized alike).

Everything here is pure and seeded (NumPy generators keyed by the seed and a stream number per purpose): the same
settings and seed give the same items, in the same order. :class:`PerturbationSettings` holds every option, validated
when it is made; the DataModule (:class:`~memcurve.data.CanaryTextDataModule`) chooses the passages, plans the items
(:func:`plan_suite`), tokenizes them (:func:`tokenize_suite`), inserts their copies and logs every item with its
level, token ids and copy offsets; :func:`probe_sets` turns that log into the prompts and answers the model is scored
on.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memcurve.data.text_sources import encode_texts, normalized_words
from memcurve.utils.arguments import check_choice, check_int

__all__ = [
    "CATEGORIES",
    "PROBE_NAMES",
    "REASONING_TASKS",
    "PerturbationSettings",
    "ProbeSet",
    "SuitePlan",
    "as_perturbation_settings",
    "choose_passages",
    "plan_suite",
    "probe_sets",
    "tokenize_suite",
]

CATEGORIES = ("passages", "facts", "arithmetic", "reasoning")  # from memorization to reasoning (the paper's order)
# The probe sets of probe_sets(), "<category>/<kind>": "text" sets score each item as a whole (membership
# inference, normalized log-likelihood); the others are greedy generation of an answer after a prompt.
PROBE_NAMES = (
    "passages/recall",
    "passages/text",
    "facts/qa",
    "facts/cloze",
    "facts/text",
    "arithmetic/answer",
    "arithmetic/text",
    "reasoning/answer",
    "reasoning/text",
)
MAX_UNIVERSE = 10**6  # arithmetic / reasoning instances are enumerated: at most this many possible instances

# -- word lists of the synthetic biographies (invented, so that no pretrained model knows these people) -------------
FIRST_NAMES = (
    "Mara", "Tobin", "Ilsa", "Corvin", "Nadia", "Eamon", "Lysa", "Pavel", "Oriel", "Senna", "Dorian", "Kessa",
    "Alric", "Brina", "Casimir", "Delphine", "Evander", "Fenna", "Gideon", "Halla", "Ivo", "Jorunn", "Kael", "Liora",
    "Matthis", "Nerys", "Osric", "Petra", "Quillan", "Rhosyn", "Soren", "Tamsin", "Ulric", "Vesna", "Wendel",
    "Xanthe", "Yorick", "Zelie", "Anouk", "Bram", "Cleo", "Darian", "Elske", "Florin", "Greta", "Hollis", "Isolde",
    "Jasper", "Kira", "Leander",
)  # fmt: skip
LAST_NAMES = (
    "Quill", "Ashgrove", "Brindle", "Carrow", "Dunmore", "Elsworth", "Fenwick", "Galloway", "Harrowgate", "Ingram",
    "Jessop", "Kettering", "Larkspur", "Merriweather", "Northcott", "Oakhurst", "Pennick", "Quarrington", "Rookwood",
    "Stellan", "Thistlewood", "Underhill", "Varga", "Whitlock", "Yarrow", "Zabel", "Ambrose", "Blackwood",
    "Coldwell", "Dorsey", "Everly", "Foxley", "Greaves", "Hawthorne", "Ives", "Jarrow", "Kingsley", "Lowther",
    "Marchbank", "Nettles", "Orwin", "Pryce", "Redfern", "Sallow", "Tolliver", "Upton", "Voss", "Wrenfield",
    "Ashdown", "Birchall",
)  # fmt: skip
CITIES = (
    "Tessaly", "Brenmoor", "Calvio", "Dunhaven", "Esterfall", "Frostmere", "Galdora", "Harrowmere", "Istrana",
    "Jovik", "Kelmarsh", "Lorwick", "Marrowdale", "Norvale", "Ostrelle", "Pellham", "Quorva", "Rivenholt",
    "Saltcombe", "Thornwick", "Ulvmark", "Valdera", "Westerlin", "Yarrowby", "Zelmora", "Ambrel", "Belcastle",
    "Corrin", "Drummel", "Elvarra", "Farrowby", "Glimmerton", "Halvik", "Ironvale", "Junebrook", "Kestrelholm",
    "Lunmere", "Mistral", "Nethercombe", "Orlin",
)  # fmt: skip
EMPLOYERS = (
    "Orbwell", "Quillon Labs", "Brightmere Foods", "Castellan Bank", "Dovetail Press", "Emberline Rail",
    "Fernwood Mills", "Glasshaven Optics", "Hollowtree Games", "Ironleaf Steel", "Juniper Air", "Kestrel Shipping",
    "Lanternfish Media", "Moonrake Mining", "Nimbus Textiles", "Oxbow Pharma", "Pinecrest Insurance", "Quayside Foods",
    "Redwater Energy", "Silverbirch Software", "Tidewell Logistics", "Umberfield Motors", "Vantage Ceramics",
    "Willowmere Hotels", "Yellowpine Books", "Zephyr Robotics", "Amberlight Studios", "Bluecairn Telecom",
    "Cobalt Harbor", "Driftwood Clinics", "Eastmarch Glass", "Foxglove Chemicals", "Greyfell Builders",
    "Heronsgate Bank", "Inkwell Systems", "Jadestone Tools", "Kingfisher Air", "Larchmont Paper", "Millbrook Dairy",
    "Northwind Cables",
)  # fmt: skip
BIRTH_YEARS = (1900, 2000)  # [first, last) year of birth
BIOGRAPHY = "Profile: {name} was born in {city} in {year} and works at {employer}."
FACT_ATTRIBUTES = ("city", "year", "employer")
# Cloze prompts: the biography up to an attribute (the answer is " <value>", the biography's next tokens).
CLOZE_PROMPTS = {
    "city": "Profile: {name} was born in",
    "year": "Profile: {name} was born in {city} in",
    "employer": "Profile: {name} was born in {city} in {year} and works at",
}
QUESTIONS = {
    "city": "Q: Where was {name} born? A:",
    "year": "Q: When was {name} born? A:",
    "employer": "Q: Where does {name} work? A:",
}


# -- settings ------------------------------------------------------------------------------------------------------
def _check_count(argument: str, value: Any, minimum: int = 0) -> None:
    check_int(f"perturbations.{argument}", value, minimum)


@dataclass(frozen=True)
class PerturbationSettings:
    """What the perturbation suite plants (see the module docstring); a category whose count is 0 is not planted."""

    duplicate_levels: tuple[int, ...] | None = None
    """How many times the facts and passages of each level are inserted (distinct integers >= 0; 0 for never-seen
    controls); None: the DataModule's ``duplicate_levels``."""

    facts_per_level: int = 16
    """Invented people (biographies) per duplicate level; 0: no facts."""

    fact_qa_demonstrations: int = 0
    """Extra people whose biography and question-answer pairs are all in the training stream, to teach a model trained
    from scratch the question format; never scored, never left out by the oracle. 0: the format is never trained."""

    fact_demonstration_copies: int = 4
    """Copies of each demonstration biography and of each of its question-answer pairs."""

    passages_per_level: int = 8
    """Passages of the background corpus per duplicate level; 0: no passages."""

    passage_min_chars: int = 300
    """Shortest passage, in characters."""

    passage_max_chars: int = 700
    """Longest passage, in characters."""

    passage_prefix_length: int = 16
    """Passage tokens of the recall prompt (after a leading EOS)."""

    passage_suffix_length: int = 32
    """Passage tokens the model must reproduce after the prompt (strict: all of them)."""

    arithmetic_digits: int = 2
    """Digits of the largest operand of ``a+b=c`` (1 to 3)."""

    arithmetic_train: int = 2000
    """Distinct training problems; 0: no arithmetic."""

    arithmetic_heldout: int = 200
    """Held-out problems, sharing no unordered operand pair with a training problem."""

    arithmetic_copies: int = 1
    """Copies of each training problem in the stream."""

    arithmetic_zero_pad: bool = False
    """Write every problem at a fixed width: operands zero-padded to ``arithmetic_digits`` digits, the sum to one more
    (``07+45=052``), so each answer digit sits at the same distance from the operand digits it depends on (small
    models learn this format faster)."""

    reasoning_task: str = "sort"
    """``sort`` (ascending digits), ``max`` (largest digit) or ``reverse`` (letters in reverse order)."""

    reasoning_length: int = 4
    """Symbols per instance (2 to 6 digits for sort and max, 2 to 4 letters for reverse)."""

    reasoning_train: int = 2000
    """Distinct training instances; 0: no reasoning task."""

    reasoning_heldout: int = 200
    """Held-out instances, sharing no key (the task's notion of "the same instance") with a training one."""

    reasoning_copies: int = 1
    """Copies of each training instance in the stream."""

    eval_train_instances: int = 200
    """Training instances of arithmetic and reasoning scored for the train accuracy (the first ones of the seeded
    training order)."""

    seed: int | None = None
    """Seed of every draw of the suite (None: the DataModule's seed)."""

    def __post_init__(self) -> None:
        if self.duplicate_levels is not None:
            object.__setattr__(self, "duplicate_levels", check_levels(self.duplicate_levels))
        for name in (
            "facts_per_level",
            "fact_qa_demonstrations",
            "passages_per_level",
            "arithmetic_train",
            "reasoning_train",
        ):
            _check_count(name, getattr(self, name))
        for name in (
            "fact_demonstration_copies",
            "passage_prefix_length",
            "passage_suffix_length",
            "arithmetic_copies",
            "reasoning_copies",
            "eval_train_instances",
        ):
            _check_count(name, getattr(self, name), 1)
        _check_count("passage_min_chars", self.passage_min_chars, 1)
        _check_count("passage_max_chars", self.passage_max_chars, 1)
        if self.passage_max_chars < self.passage_min_chars:
            raise ValueError(
                f"perturbations.passage_max_chars={self.passage_max_chars} must be at least "
                f"perturbations.passage_min_chars={self.passage_min_chars}"
            )
        if self.seed is not None:
            _check_count("seed", self.seed)
        if not isinstance(self.arithmetic_zero_pad, bool):
            raise TypeError(f"perturbations.arithmetic_zero_pad={self.arithmetic_zero_pad!r} must be True or False")
        digits = self.arithmetic_digits
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 3:
            raise ValueError(f"perturbations.arithmetic_digits={digits!r} must be an integer in [1, 3]")
        check_choice("perturbations.reasoning_task", self.reasoning_task, tuple(REASONING_TASKS))
        task = REASONING_TASKS[self.reasoning_task]
        length = self.reasoning_length
        if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= task.max_length:
            raise ValueError(
                f"perturbations.reasoning_length={length!r} must be an integer in [2, {task.max_length}] for "
                f"reasoning_task={self.reasoning_task!r}"
            )
        for category, train, heldout, universe in (
            ("arithmetic", self.arithmetic_train, self.arithmetic_heldout, 100**digits),
            ("reasoning", self.reasoning_train, self.reasoning_heldout, len(task.alphabet) ** length),
        ):
            _check_count(f"{category}_heldout", heldout, 1 if train else 0)
            if train + heldout > universe:
                raise ValueError(
                    f"perturbations.{category}_train={train} + {category}_heldout={heldout} exceed the {universe} "
                    f"possible {category} instances of these settings; lower them or lengthen the instances"
                )
        people = len(FIRST_NAMES) * len(LAST_NAMES)
        if self.fact_qa_demonstrations > people:  # the rest is checked against the levels by the DataModule
            raise ValueError(
                f"perturbations.fact_qa_demonstrations={self.fact_qa_demonstrations} exceeds the {people} distinct "
                "names of the built-in word lists"
            )
        if not self.categories():
            raise ValueError(
                "perturbations plant nothing: facts_per_level, passages_per_level, arithmetic_train and "
                "reasoning_train are all 0; give at least one category a positive count (or perturbations=None)"
            )

    def categories(self) -> tuple[str, ...]:
        """The planted categories, in :data:`CATEGORIES` order."""
        counts = {
            "passages": self.passages_per_level,
            "facts": self.facts_per_level,
            "arithmetic": self.arithmetic_train,
            "reasoning": self.reasoning_train,
        }
        return tuple(category for category in CATEGORIES if counts[category] > 0)

    def resolved(self, duplicate_levels: Sequence[int], seed: int) -> PerturbationSettings:
        """These settings with ``duplicate_levels`` and ``seed`` decided (the DataModule's when None)."""
        return dataclasses.replace(
            self,
            duplicate_levels=tuple(self.duplicate_levels if self.duplicate_levels is not None else duplicate_levels),
            seed=self.seed if self.seed is not None else seed,
        )

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (what the insertion log records)."""
        values = dataclasses.asdict(self)
        if values["duplicate_levels"] is not None:
            values["duplicate_levels"] = list(values["duplicate_levels"])
        return values


def check_levels(duplicate_levels: Any, argument: str = "perturbations.duplicate_levels") -> tuple[int, ...]:
    """Distinct integers >= 0, sorted; a one-line error naming ``argument`` otherwise."""
    is_sequence = isinstance(duplicate_levels, Sequence) and not isinstance(duplicate_levels, (str, bytes))
    if not is_sequence or not duplicate_levels:
        raise ValueError(f"{argument}={duplicate_levels!r} must be a non-empty sequence of distinct integers >= 0")
    levels = tuple(duplicate_levels)
    bad = [level for level in levels if isinstance(level, bool) or not isinstance(level, int) or level < 0]
    if bad:
        raise ValueError(f"{argument}={list(levels)!r} holds {bad}; every level must be an integer >= 0")
    if len(set(levels)) != len(levels):
        raise ValueError(f"{argument}={list(levels)!r} repeats a level; every level must appear once")
    return tuple(sorted(levels))


def as_perturbation_settings(value: Any) -> PerturbationSettings | None:
    """``perturbations`` as given to the DataModule: None, a :class:`PerturbationSettings` or a dict of its fields."""
    if value is None or isinstance(value, PerturbationSettings):
        return value
    if isinstance(value, Mapping):
        fields = {field.name for field in dataclasses.fields(PerturbationSettings)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"perturbations holds unknown fields {unknown}; choose among {sorted(fields)}")
        return PerturbationSettings(**value)
    raise ValueError(
        f"perturbations={value!r:.80} must be None, a memcurve.data.PerturbationSettings or a dict of its fields"
    )


# -- arithmetic and reasoning: enumerated universes split by key ---------------------------------------------------
@dataclass(frozen=True)
class SymbolTask:
    """A task over an enumerable universe of instances ``0 .. size-1`` (vectorized, NumPy)."""

    name: str
    alphabet: str
    max_length: int
    key_kind: str  # "multiset": instances with the same symbols share a key; "instance": every instance its own

    def symbols(self, index: np.ndarray, length: int) -> np.ndarray:
        """``[N, length]`` symbol indices of each instance (base-``len(alphabet)`` digits, most significant first)."""
        base = len(self.alphabet)
        powers = base ** np.arange(length - 1, -1, -1, dtype=np.int64)
        return (index[:, None] // powers[None, :]) % base

    def keys(self, length: int) -> np.ndarray:
        index = np.arange(len(self.alphabet) ** length, dtype=np.int64)
        if self.key_kind == "instance":
            return index
        ordered = np.sort(self.symbols(index, length), axis=1)
        powers = len(self.alphabet) ** np.arange(length - 1, -1, -1, dtype=np.int64)
        return ordered @ powers

    def text(self, symbols: Sequence[int]) -> tuple[str, str]:
        """``(prompt, answer)`` of one instance."""
        letters = [self.alphabet[s] for s in symbols]
        if self.name == "sort":
            answer = "".join(sorted(letters))
        elif self.name == "max":
            answer = max(letters)
        else:
            answer = "".join(reversed(letters))
        short = {"sort": "sort", "max": "max", "reverse": "rev"}[self.name]
        return f"{short}({''.join(letters)})=", answer


REASONING_TASKS = {
    "sort": SymbolTask("sort", "0123456789", 6, "multiset"),
    "max": SymbolTask("max", "0123456789", 6, "instance"),
    "reverse": SymbolTask("reverse", "abcdefghijklmnopqrstuvwxyz", 4, "instance"),
}


def split_by_key(
    keys: np.ndarray, train: int, heldout: int, rng: np.random.Generator, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)`` instance indices of a universe whose instance ``i`` has key ``keys[i]``: held-out keys are
    drawn first (as few as hold ``heldout`` instances), the training instances come from the other keys, so the two
    sets share no key. Both in their (seeded) drawn order."""
    unique, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    order = rng.permutation(len(unique))
    taken = int(np.searchsorted(np.cumsum(counts[order]), heldout)) + 1 if heldout else 0
    held_keys = np.zeros(len(unique), dtype=bool)
    held_keys[order[:taken]] = True
    in_heldout = held_keys[inverse]
    held_pool, train_pool = np.flatnonzero(in_heldout), np.flatnonzero(~in_heldout)
    if len(train_pool) < train:
        raise ValueError(
            f"perturbations.{what}_train={train}: only {len(train_pool)} {what} instances share no key with the "
            f"{heldout} held-out ones; lower {what}_train or {what}_heldout, or lengthen the instances"
        )
    return rng.choice(train_pool, size=train, replace=False), rng.choice(held_pool, size=heldout, replace=False)


def arithmetic_instances(settings: PerturbationSettings, seed: int) -> tuple[list[tuple], list[tuple]]:
    """``(train, heldout)`` lists of ``(prompt, answer)`` texts ``("12+47=", "59")``."""
    n = 10**settings.arithmetic_digits
    index = np.arange(n * n, dtype=np.int64)
    a, b = index // n, index % n
    keys = np.minimum(a, b) * n + np.maximum(a, b)  # the unordered operand pair
    rng = np.random.default_rng([seed, 23])
    train, heldout = split_by_key(keys, settings.arithmetic_train, settings.arithmetic_heldout, rng, "arithmetic")

    width = settings.arithmetic_digits if settings.arithmetic_zero_pad else 0

    def texts(rows: np.ndarray) -> list[tuple[str, str]]:
        return [(f"{a[i]:0{width}d}+{b[i]:0{width}d}=", f"{a[i] + b[i]:0{width + 1 if width else 0}d}") for i in rows]

    return texts(train), texts(heldout)


def reasoning_instances(settings: PerturbationSettings, seed: int) -> tuple[list[tuple], list[tuple]]:
    """``(train, heldout)`` lists of ``(prompt, answer)`` texts of ``reasoning_task``."""
    task, length = REASONING_TASKS[settings.reasoning_task], settings.reasoning_length
    rng = np.random.default_rng([seed, 24])
    train, heldout = split_by_key(
        task.keys(length), settings.reasoning_train, settings.reasoning_heldout, rng, "reasoning"
    )

    def texts(rows: np.ndarray) -> list[tuple[str, str]]:
        return [task.text(symbols) for symbols in task.symbols(rows, length).tolist()]

    return texts(train), texts(heldout)


# -- facts ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Person:
    """An invented person of the biographies."""

    name: str
    city: str
    year: int
    employer: str

    def values(self) -> dict[str, str]:
        return {"name": self.name, "city": self.city, "year": str(self.year), "employer": self.employer}

    def biography(self) -> str:
        return BIOGRAPHY.format(**self.values())

    def questions(self) -> list[tuple[str, str, str]]:
        """``(attribute, question, answer)``: the answer is `` <value>`` (it follows ``A:`` after a space)."""
        values = self.values()
        return [(key, QUESTIONS[key].format(**values), f" {values[key]}") for key in FACT_ATTRIBUTES]

    def cloze(self) -> list[tuple[str, str, str]]:
        """``(attribute, prompt, answer)`` with ``prompt + answer`` a prefix of the biography."""
        values = self.values()
        return [(key, CLOZE_PROMPTS[key].format(**values), f" {values[key]}") for key in FACT_ATTRIBUTES]


def people(count: int, seed: int) -> list[Person]:
    """``count`` invented people with distinct names; attributes drawn independently and uniformly."""
    names = len(FIRST_NAMES) * len(LAST_NAMES)
    if count > names:
        raise ValueError(
            f"the perturbation suite needs {count} people (facts_per_level x duplicate levels + "
            f"fact_qa_demonstrations) but the built-in word lists hold {names} distinct names; lower them"
        )
    rng = np.random.default_rng([seed, 22])
    picks = rng.choice(names, size=count, replace=False)
    cities = rng.integers(len(CITIES), size=count)
    years = rng.integers(*BIRTH_YEARS, size=count)
    employers = rng.integers(len(EMPLOYERS), size=count)
    return [
        Person(
            f"{FIRST_NAMES[int(p) // len(LAST_NAMES)]} {LAST_NAMES[int(p) % len(LAST_NAMES)]}",
            CITIES[int(c)],
            int(y),
            EMPLOYERS[int(e)],
        )
        for p, c, y, e in zip(picks, cities, years, employers)
    ]


# -- passages -------------------------------------------------------------------------------------------------------
OVERLAP_WORDS = 8  # a background document holding the first this-many words of a passage is dropped


def choose_passages(
    documents: Sequence[str], settings: PerturbationSettings, seed: int
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(passages, background)``: ``(text, level)`` of the chosen passages, ordered by (level, position in
    ``documents``), and the documents without them and without any other document that holds a passage's first
    eight words. ``settings`` must be resolved (its duplicate levels decided)."""
    levels = settings.duplicate_levels
    needed = len(levels) * settings.passages_per_level
    if needed == 0:
        return [], list(documents)
    low, high = settings.passage_min_chars, settings.passage_max_chars
    candidates = [i for i, text in enumerate(documents) if low <= len(text) <= high]
    if len(candidates) < needed:
        raise ValueError(
            f"perturbations.passages_per_level={settings.passages_per_level} x {len(levels)} duplicate levels need "
            f"{needed} passages, but the corpus has {len(candidates)} documents of passage_min_chars={low} to "
            f"passage_max_chars={high} characters; widen that range, lower passages_per_level or use a larger corpus"
        )
    picks = np.random.default_rng([seed, 21]).choice(len(candidates), size=needed, replace=False)
    count = settings.passages_per_level
    chosen: list[tuple[int, int]] = []
    for position, level in enumerate(levels):
        group = sorted(candidates[int(p)] for p in picks[position * count : (position + 1) * count])
        chosen.extend((index, level) for index in group)
    taken = {index for index, _ in chosen}
    keys = {tuple(normalized_words(documents[index])[:OVERLAP_WORDS]) for index in taken}
    keys_by_length: dict[int, set[tuple[str, ...]]] = {}
    for key in keys:
        if key:
            keys_by_length.setdefault(len(key), set()).add(key)

    def overlaps(text: str) -> bool:
        words = normalized_words(text)
        return any(tuple(words[i : i + n]) in group for n, group in keys_by_length.items() for i in range(len(words)))

    background = [text for i, text in enumerate(documents) if i not in taken and not overlaps(text)]
    return [(documents[index], level) for index, level in chosen], background


# -- the plan: every item as text ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedItem:
    """One planted (or control / held-out) item before tokenization.

    ``role``: ``member`` (planted ``level`` times) or ``control`` (level 0) for facts and passages; ``demo`` /
    ``demo_qa`` for the demonstration biographies and their question-answer pairs; ``train`` / ``heldout`` for
    arithmetic and reasoning. ``prompt``: the question part of an arithmetic / reasoning text (up to ``=``)."""

    category: str
    role: str
    level: int
    text: str
    prompt: str | None = None
    person: Person | None = None


@dataclass(frozen=True)
class SuitePlan:
    """Every item of the suite as text, in id order: passages, facts, arithmetic, reasoning."""

    items: tuple[PlannedItem, ...]

    def holds_item(self, document: str) -> bool:
        """Whether a background document holds an item: a person's full name, or the text of an arithmetic or
        reasoning instance (such documents are dropped, so controls and held-out instances stay unseen)."""
        names = self._names
        if names:
            words = normalized_words(document)
            if any(pair in names for pair in itertools.pairwise(words)):
                return True
        if ("+" in document or "(" in document) and "=" in document:
            return any(text in document for text in self._symbol_texts)
        return False

    @functools.cached_property
    def _names(self) -> set[tuple[str, ...]]:
        return {tuple(normalized_words(item.person.name)) for item in self.items if item.person is not None}

    @functools.cached_property
    def _symbol_texts(self) -> list[str]:
        return [item.text for item in self.items if item.category in ("arithmetic", "reasoning")]


def plan_suite(settings: PerturbationSettings, passages: Sequence[tuple[str, int]]) -> SuitePlan:
    """Every item of the suite as text (``settings`` resolved: levels and seed decided; ``passages`` from
    :func:`choose_passages`)."""
    seed, levels = settings.seed, settings.duplicate_levels
    items: list[PlannedItem] = []
    for text, level in passages:
        items.append(PlannedItem("passages", "member" if level else "control", level, text))
    if settings.facts_per_level:
        everyone = people(len(levels) * settings.facts_per_level + settings.fact_qa_demonstrations, seed)
        for position, level in enumerate(levels):
            group = everyone[position * settings.facts_per_level : (position + 1) * settings.facts_per_level]
            for person in group:
                role = "member" if level else "control"
                items.append(PlannedItem("facts", role, level, person.biography(), person=person))
        copies = settings.fact_demonstration_copies
        for person in everyone[len(levels) * settings.facts_per_level :]:
            items.append(PlannedItem("facts", "demo", copies, person.biography(), person=person))
            for _, question, answer in person.questions():
                items.append(PlannedItem("facts", "demo_qa", copies, question + answer, prompt=question, person=person))
    for category, generate, copies in (
        ("arithmetic", arithmetic_instances, settings.arithmetic_copies),
        ("reasoning", reasoning_instances, settings.reasoning_copies),
    ):
        if category not in settings.categories():
            continue
        train, heldout = generate(settings, seed)
        items.extend(PlannedItem(category, "train", copies, p + a, prompt=p) for p, a in train)
        items.extend(PlannedItem(category, "heldout", 0, p + a, prompt=p) for p, a in heldout)
    return SuitePlan(tuple(items))


# -- tokens ----------------------------------------------------------------------------------------------------------
def encode_symbols(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text encoded one character at a time (each character's own token ids, concatenated)."""
    alphabet = sorted({char for text in texts for char in text})
    table = dict(zip(alphabet, encode_texts(tokenizer, alphabet)))
    return [[token for char in text for token in table[char]] for text in texts]


def _split(tokenizer: Any, full: list[int], prompt: str, answer: str, what: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)`` with ``prompt ids`` a prefix of ``full`` and ``answer ids`` its next tokens."""
    prompt_ids, answer_ids = encode_texts(tokenizer, [prompt, answer])
    end = len(prompt_ids) + len(answer_ids)
    if full[: len(prompt_ids)] != prompt_ids or full[len(prompt_ids) : end] != answer_ids:
        raise ValueError(
            f"the tokenizer merges tokens across the prompt/answer boundary of the {what} {prompt + answer!r}: "
            "its answer tokens are not the same alone and after the prompt; use a tokenizer that splits words at "
            "spaces (a byte-level BPE)"
        )
    return prompt_ids, answer_ids


def tokenize_suite(plan: SuitePlan, tokenizer: Any, passage_tokens: int) -> list[dict[str, Any]]:
    """The items of ``plan`` as log entries (without copy offsets): ``id``, ``category``, ``role``, ``level``,
    ``text``, ``token_ids``, ``prompt_length`` (arithmetic / reasoning: tokens of the question) and, for people,
    ``probes`` (``kind`` ``qa`` / ``cloze``, ``attribute``, ``prompt``, ``prompt_ids``, ``answer_ids``). Passages
    need ``passage_tokens`` tokens (prompt + suffix)."""
    texts = [item.text for item in plan.items]
    symbolic = [i for i, item in enumerate(plan.items) if item.category in ("arithmetic", "reasoning")]
    plain = [i for i, item in enumerate(plan.items) if item.category not in ("arithmetic", "reasoning")]
    token_ids: list[list[int]] = [[] for _ in texts]
    for i, ids in zip(plain, encode_texts(tokenizer, [texts[i] for i in plain])):
        token_ids[i] = list(ids)
    for i, ids in zip(symbolic, encode_symbols(tokenizer, [texts[i] for i in symbolic])):
        token_ids[i] = ids
    prompt_lengths = dict(
        zip(symbolic, (len(ids) for ids in encode_symbols(tokenizer, [plan.items[i].prompt for i in symbolic])))
    )
    entries = []
    for index, (item, ids) in enumerate(zip(plan.items, token_ids)):
        entry: dict[str, Any] = {
            "id": index,
            "category": item.category,
            "role": item.role,
            "level": item.level,
            "text": item.text,
            "token_ids": ids,
        }
        if item.category == "passages" and len(ids) < passage_tokens:
            raise ValueError(
                f"a passage of {len(item.text)} characters has {len(ids)} tokens, fewer than passage_prefix_length + "
                f"passage_suffix_length = {passage_tokens}; raise perturbations.passage_min_chars"
            )
        if index in prompt_lengths:
            entry["prompt_length"] = prompt_lengths[index]
        elif item.role == "demo_qa":
            entry["prompt_length"] = len(_split(tokenizer, ids, item.prompt, item.text[len(item.prompt) :], "QA")[0])
        if item.person is not None and item.role in ("member", "control"):
            probes = []
            for kind, pairs in (("qa", item.person.questions()), ("cloze", item.person.cloze())):
                for attribute, prompt, answer in pairs:
                    full = ids if kind == "cloze" else encode_texts(tokenizer, [prompt + answer])[0]
                    prompt_ids, answer_ids = _split(tokenizer, full, prompt, answer, f"fact {kind}")
                    probes.append(
                        {
                            "kind": kind,
                            "attribute": attribute,
                            "prompt": prompt,
                            "prompt_ids": prompt_ids,
                            "answer_ids": answer_ids,
                        }
                    )
            entry["probes"] = probes
        entries.append(entry)
    return entries


# -- what the model is scored on --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSet:
    """Prompts and their expected continuations. ``levels`` [N]: the duplicate level of each item (facts, passages),
    or its copies for training instances and 0 for held-out ones (arithmetic, reasoning); ``item_ids`` [N]: the item
    of each prompt (an item has several fact questions)."""

    prompts: list[list[int]]
    answers: list[list[int]]
    levels: Tensor
    item_ids: Tensor

    def __len__(self) -> int:
        return len(self.prompts)


def probe_sets(items: Sequence[Mapping[str, Any]], eos: int, settings: Mapping[str, Any]) -> dict[str, ProbeSet]:
    """The probe sets (:data:`PROBE_NAMES`, those of planted categories) of a suite's log entries:

    * ``passages/recall``: ``[EOS] + first passage_prefix_length tokens`` -> the next ``passage_suffix_length``;
    * ``facts/qa``: ``[EOS] + question`` -> ``answer + [EOS]``; ``facts/cloze``: ``[EOS] + biography up to an
      attribute`` -> the attribute's tokens;
    * ``arithmetic/answer``, ``reasoning/answer``: ``[EOS] + question (up to '=')`` -> ``answer + [EOS]``, for every
      held-out instance and the first ``eval_train_instances`` training ones;
    * ``<category>/text``: ``[EOS]`` -> the whole item (membership inference), for the same items.

    Demonstration people are never scored."""
    prefix, suffix = settings["passage_prefix_length"], settings["passage_suffix_length"]
    rows: dict[str, list[tuple[list[int], list[int], int, int]]] = {name: [] for name in PROBE_NAMES}
    scored_train = {"arithmetic": 0, "reasoning": 0}
    for item in items:
        category, role, ids, level = item["category"], item["role"], list(item["token_ids"]), int(item["level"])
        if role in ("demo", "demo_qa"):
            continue
        if category in scored_train and role == "train":
            if scored_train[category] >= settings["eval_train_instances"]:
                continue
            scored_train[category] += 1
        if category == "passages":
            rows["passages/recall"].append(([eos, *ids[:prefix]], ids[prefix : prefix + suffix], level, item["id"]))
        elif category == "facts":
            for probe in item["probes"]:
                answer = [*probe["answer_ids"], eos] if probe["kind"] == "qa" else list(probe["answer_ids"])
                rows[f"facts/{probe['kind']}"].append(([eos, *probe["prompt_ids"]], answer, level, item["id"]))
        else:
            cut = item["prompt_length"]
            rows[f"{category}/answer"].append(([eos, *ids[:cut]], [*ids[cut:], eos], level, item["id"]))
        rows[f"{category}/text"].append(([eos], ids, level, item["id"]))
    return {
        name: ProbeSet(
            prompts=[row[0] for row in entries],
            answers=[row[1] for row in entries],
            levels=torch.tensor([row[2] for row in entries], dtype=torch.long),
            item_ids=torch.tensor([row[3] for row in entries], dtype=torch.long),
        )
        for name, entries in rows.items()
        if entries
    }


def exact_answers(generated: Tensor, answers: Sequence[Sequence[int]]) -> Tensor:
    """Boolean ``[N]``: row i of ``generated`` (``[N, >= len(answers[i])]``) starts with ``answers[i]``."""
    out = torch.zeros(len(answers), dtype=torch.bool)
    for row, answer in enumerate(answers):
        out[row] = generated[row, : len(answer)].tolist() == list(answer)
    return out


def fraction(values: Tensor) -> float:
    """Mean of a boolean tensor (NaN when empty)."""
    return float(values.float().mean()) if values.numel() else math.nan
