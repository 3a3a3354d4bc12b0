"""The perturbation suite (memcurve.data.perturbations) planted by CanaryTextDataModule, and the skills it measures
(CausalLMModule.skills_metrics): seeded generators, what the training stream holds and never holds, the log and its
resume checks, the oracle, bad settings, and the metrics against a hand computation on a model whose answers are
known."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from memcurve.data import CanaryTextDataModule, PerturbationSettings
from memcurve.data.canary_text_datamodule import CANARY_FILENAME, _insertion_digest
from memcurve.data.perturbations import (
    CITIES,
    REASONING_TASKS,
    arithmetic_instances,
    choose_passages,
    people,
    plan_suite,
    reasoning_instances,
)
from memcurve.lightning_modules import CausalLMModule

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "corpus_fraction": 0.03,
    "vocab_size": 320,
    "canaries_per_level": 2,
    "block_size": 48,
    "val_fraction": 0.1,
    "batch_size": 8,
    "eval_batch_size": 16,
}
SUITE = PerturbationSettings(
    facts_per_level=2,
    fact_qa_demonstrations=3,
    passages_per_level=2,
    passage_min_chars=200,
    passage_max_chars=600,
    passage_prefix_length=8,
    passage_suffix_length=16,
    arithmetic_train=60,
    arithmetic_heldout=12,
    reasoning_train=50,
    reasoning_heldout=10,
    eval_train_instances=6,
)
TINY_MODEL = {
    "model_type": "olmo2",
    "vocab_size": 320,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 128,
}


def small(suite: PerturbationSettings | dict | None = SUITE, **overrides) -> CanaryTextDataModule:
    datamodule = CanaryTextDataModule(**{**SMALL, **overrides}, perturbations=suite)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="module")
def dm() -> CanaryTextDataModule:
    return small()


def occurrences(stream: np.ndarray, pattern: list[int]) -> np.ndarray:
    """Start positions of ``pattern`` in ``stream`` (candidates filtered token by token)."""
    pattern = np.asarray(pattern)
    if len(stream) < len(pattern):
        return np.zeros(0, dtype=np.int64)
    found = np.flatnonzero(stream[: len(stream) - len(pattern) + 1] == pattern[0])
    for k in range(1, len(pattern)):
        found = found[stream[found + k] == pattern[k]]
    return found


def items(datamodule: CanaryTextDataModule, category: str | None = None, role: str | None = None) -> list[dict]:
    return [
        item
        for item in datamodule.insertion_log["perturbations"]["items"]
        if (category is None or item["category"] == category) and (role is None or item["role"] == role)
    ]


# -- generators ----------------------------------------------------------------------------------------------------
def test_generators_are_seeded_deterministic_and_correct():
    settings = SUITE.resolved((0, 1, 4), seed=3)
    assert plan_suite(settings, []) == plan_suite(settings, [])
    assert plan_suite(settings, []) != plan_suite(dataclasses.replace(settings, seed=4), [])
    crowd = people(200, seed=3)
    assert crowd == people(200, seed=3) and crowd != people(200, seed=4)
    assert len({person.name for person in crowd}) == 200 and all(person.city in CITIES for person in crowd)
    assert all(1900 <= person.year < 2000 for person in crowd)
    person = crowd[0]
    assert person.biography().startswith(f"Profile: {person.name} was born in {person.city} in {person.year}")
    for (_, prompt, answer), (_, cloze, cloze_answer) in zip(person.questions(), person.cloze()):
        assert prompt.startswith("Q: ") and prompt.endswith(" A:") and answer.startswith(" ")
        assert person.biography().startswith(cloze + cloze_answer)

    train, heldout = arithmetic_instances(settings, 3)
    assert (train, heldout) == arithmetic_instances(settings, 3) and train != arithmetic_instances(settings, 4)[0]
    assert len(train) == 60 and len(heldout) == 12 and len(set(train)) == 60
    pair = lambda prompt: frozenset(prompt.rstrip("=").split("+"))  # noqa: E731 (the unordered operand pair)
    for prompt, answer in train + heldout:
        a, b = prompt.rstrip("=").split("+")
        assert int(a) + int(b) == int(answer) and int(a) < 100 and int(b) < 100
    assert not {pair(p) for p, _ in train} & {pair(p) for p, _ in heldout}  # commuted problems are not held out
    padded = arithmetic_instances(dataclasses.replace(settings, arithmetic_zero_pad=True), 3)
    for (prompt, answer), (plain_prompt, plain_answer) in zip(padded[0] + padded[1], train + heldout):
        assert len(prompt) == 6 and len(answer) == 3  # "07+45=" -> "052": the same problems at a fixed width
        assert [int(x) for x in prompt[:-1].split("+")] == [int(x) for x in plain_prompt[:-1].split("+")]
        assert int(answer) == int(plain_answer)

    for task, length in (("sort", 4), ("max", 3), ("reverse", 3)):
        options = dataclasses.replace(settings, reasoning_task=task, reasoning_length=length)
        train, heldout = reasoning_instances(options, 3)
        assert (train, heldout) == reasoning_instances(options, 3) and len(train) == 50 and len(heldout) == 10
        for prompt, answer in train + heldout:
            symbols = prompt[prompt.index("(") + 1 : prompt.index(")")]
            assert len(symbols) == length and set(symbols) <= set(REASONING_TASKS[task].alphabet)
            want = {"sort": "".join(sorted(symbols)), "max": max(symbols), "reverse": symbols[::-1]}[task]
            assert answer == want
        key = (lambda p: "".join(sorted(p))) if task == "sort" else (lambda p: p)
        assert not {key(p) for p, _ in train} & {key(p) for p, _ in heldout}


def test_passages_are_taken_out_of_the_background():
    documents = [f"document {i} " + "word " * (20 + 30 * (i % 3)) for i in range(30)]
    documents.append(documents[4] + " and a repeated ending")  # holds passage 4's first words if 4 is chosen
    settings = dataclasses.replace(SUITE, passage_min_chars=100, passage_max_chars=200).resolved((0, 2), 0)
    passages, background = choose_passages(documents, settings, 0)
    assert passages == choose_passages(documents, settings, 0)[0] and len(passages) == 4
    assert [level for _, level in passages] == [0, 0, 2, 2]
    assert all(100 <= len(text) <= 200 for text, _ in passages)
    texts = {text for text, _ in passages}
    assert not texts & set(background) and len(background) + len(texts) <= len(documents)
    for text in texts:
        assert not any(document.startswith(text[:40]) for document in background)
    with pytest.raises(ValueError, match=r"passages_per_level=2 x 2 duplicate levels need 4 passages.*has 0"):
        choose_passages(documents, dataclasses.replace(settings, passage_min_chars=1000, passage_max_chars=2000), 0)


# -- the training stream -------------------------------------------------------------------------------------------
def test_every_planted_item_appears_exactly_its_level_times(dm):
    eos, stream = dm.eos_token_id, dm.train_stream
    trained = dm.train_set.blocks.flatten().numpy()
    planted = 0
    for item in items(dm):
        ids = item["token_ids"]
        found = occurrences(stream, [eos, *ids, eos]) + 1
        assert found.tolist() == item["offsets"], item["text"]
        assert len(item["offsets"]) == item["level"] == len(item["blocks"])
        assert len(occurrences(trained, [eos, *ids, eos])) == item["level"]  # none in the dropped remainder
        assert item["blocks"] == [start // dm.block_size for start in item["offsets"]]
        planted += item["level"]
    counts = {(c, r): len(items(dm, c, r)) for c, r in {(i["category"], i["role"]) for i in items(dm)}}
    assert counts == {
        ("passages", "control"): 2, ("passages", "member"): 8, ("facts", "control"): 2, ("facts", "member"): 8,
        ("facts", "demo"): 3, ("facts", "demo_qa"): 9, ("arithmetic", "train"): 60, ("arithmetic", "heldout"): 12,
        ("reasoning", "train"): 50, ("reasoning", "heldout"): 10,
    }  # fmt: skip
    assert planted == 2 * (1 + 4 + 16 + 64) * 2 + 12 * 4 + 60 + 50
    # The canaries are planted as without the suite (their own draws, their own checks).
    for canary in dm.insertion_log["canaries"]:
        assert (occurrences(stream, [eos, *canary["token_ids"]]) + 1).tolist() == canary["offsets"]
        assert len(canary["offsets"]) == canary["level"]


def test_held_out_instances_controls_and_fact_questions_never_occur_in_training(dm):
    eos, stream = dm.eos_token_id, dm.train_stream
    documents = "\n".join(dm.train_documents + dm.val_documents)
    for category in ("arithmetic", "reasoning"):
        for item in items(dm, category, "heldout"):
            prompt = item["token_ids"][: item["prompt_length"]]
            assert len(occurrences(stream, [eos, *item["token_ids"], eos])) == 0
            assert len(occurrences(stream, [eos, *prompt])) == 0  # the evaluated question itself was never seen
            assert item["text"] not in documents and item["offsets"] == []
        assert len(occurrences(stream, [eos, *items(dm, category, "train")[0]["token_ids"], eos])) == 1
    for item in items(dm, "facts", "control") + items(dm, "passages", "control"):
        assert len(occurrences(stream, item["token_ids"])) == 0 and item["text"] not in documents
    for item in items(dm, "facts", "member") + items(dm, "facts", "control"):
        name = item["text"].split(" was born")[0].removeprefix("Profile: ")
        assert name not in documents
        for probe in item["probes"]:
            if probe["kind"] == "qa":
                assert len(occurrences(stream, probe["prompt_ids"])) == 0, probe["prompt"]
            else:  # a cloze prompt is the start of the trained biography
                assert item["token_ids"][: len(probe["prompt_ids"]) + len(probe["answer_ids"])] == (
                    probe["prompt_ids"] + probe["answer_ids"]
                )
    # The question format is trained only on the demonstration people.
    demo_names = {i["text"].split(" was born")[0].removeprefix("Profile: ") for i in items(dm, "facts", "demo")}
    assert all(any(name in qa["text"] for name in demo_names) for qa in items(dm, "facts", "demo_qa"))


def test_tokens_of_the_items(dm):
    tokenizer = dm.tokenizer
    for item in items(dm, "arithmetic") + items(dm, "reasoning"):
        assert len(item["token_ids"]) == len(item["text"])  # one token per character
        assert tokenizer.decode(item["token_ids"]) == item["text"]
        assert tokenizer.decode(item["token_ids"][: item["prompt_length"]]) == item["text"].split("=")[0] + "="
    for item in items(dm, "facts", "member") + items(dm, "passages"):
        assert item["token_ids"] == tokenizer(item["text"], add_special_tokens=False)["input_ids"]
    for item in items(dm, "facts", "member"):
        for probe in item["probes"]:
            assert tokenizer.decode(probe["answer_ids"]).startswith(" ")
            assert probe["prompt_ids"] == tokenizer(probe["prompt"], add_special_tokens=False)["input_ids"]


def test_probe_sets_are_the_logged_prompts_and_answers(dm):
    examples = dm.perturbation_examples()
    eos = dm.eos_token_id
    assert set(examples) == {
        "passages/recall", "passages/text", "facts/qa", "facts/cloze", "facts/text", "arithmetic/answer",
        "arithmetic/text", "reasoning/answer", "reasoning/text",
    }  # fmt: skip
    assert examples["facts/qa"].levels.tolist() == [0] * 6 + [1] * 6 + [4] * 6 + [16] * 6 + [64] * 6
    assert all(answer[-1] == eos for answer in examples["facts/qa"].answers)
    recall = examples["passages/recall"]
    assert all(len(p) == 9 and p[0] == eos for p in recall.prompts) and {len(a) for a in recall.answers} == {16}
    arithmetic = examples["arithmetic/answer"]
    assert arithmetic.levels.tolist() == [1] * 6 + [0] * 12  # the first eval_train_instances, every held-out one
    for prompt, answer, item_id in zip(arithmetic.prompts, arithmetic.answers, arithmetic.item_ids.tolist()):
        item = dm.insertion_log["perturbations"]["items"][item_id]
        assert prompt == [eos, *item["token_ids"][: item["prompt_length"]]]
        assert answer == [*item["token_ids"][item["prompt_length"] :], eos]
    assert examples["arithmetic/text"].item_ids.tolist() == arithmetic.item_ids.tolist()
    assert small(None).perturbation_examples() == {}


# -- the oracle ----------------------------------------------------------------------------------------------------
def test_oracle_leaves_out_the_memorized_levels_of_every_memorization_category(dm):
    oracle = small(oracle_min_level=16)
    eos = dm.eos_token_id
    left_out = [item for item in items(dm) if item["role"] == "member" and item["level"] >= 16]
    assert {item["category"] for item in left_out} == {"facts", "passages"} and len(left_out) == 8
    keep = np.ones(len(dm.train_stream), dtype=bool)
    for entry in left_out + [c for c in dm.insertion_log["canaries"] if c["level"] >= 16]:
        for start in entry["offsets"]:
            keep[start : start + len(entry["token_ids"]) + 1] = False
    assert np.array_equal(dm.train_stream[keep], oracle.train_stream)  # the full stream minus exactly those copies
    for full, item in zip(items(dm), items(oracle)):
        assert {k: v for k, v in full.items() if k not in ("offsets", "blocks")} == {
            k: v for k, v in item.items() if k not in ("offsets", "blocks")
        }
        if full in left_out:
            assert item["offsets"] == [] and len(occurrences(oracle.train_stream, item["token_ids"])) == 0
        else:  # lower levels, skills and demonstrations stay
            assert len(item["offsets"]) == item["level"]
            assert (occurrences(oracle.train_stream, [eos, *item["token_ids"], eos]) + 1).tolist() == item["offsets"]
    assert oracle.insertion_log["sha256"] != dm.insertion_log["sha256"]
    examples, oracle_examples = dm.perturbation_examples(), oracle.perturbation_examples()
    assert all(oracle_examples[k].prompts == examples[k].prompts for k in examples)


# -- the log and resuming ------------------------------------------------------------------------------------------
def test_log_is_saved_verified_and_resume_with_other_settings_is_refused(tmp_path, dm):
    datamodule = small(log_dir=str(tmp_path))
    saved = json.loads((tmp_path / CANARY_FILENAME).read_text(encoding="utf-8"))
    assert saved["sha256"] == dm.insertion_log["sha256"] == _insertion_digest(saved)
    suite = saved["perturbations"]
    assert suite["settings"] == {**SUITE.as_dict(), "duplicate_levels": [0, 1, 4, 16, 64], "seed": 0}
    assert len(suite["items"]) == len(items(dm)) and suite["documents_removed"]["passages"] >= 10
    assert small(log_dir=str(tmp_path)).insertion_log["sha256"] == saved["sha256"]  # resuming into the folder
    state = datamodule.state_dict()
    resumed = CanaryTextDataModule(**SMALL, perturbations=SUITE)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.setup("fit")

    changed = CanaryTextDataModule(**SMALL, perturbations=dataclasses.replace(SUITE, arithmetic_train=61))
    changed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"perturbations\.arithmetic_train: saved 60, now 61") as error:
        changed.setup("fit")
    assert "\n" not in str(error.value)  # one line
    with pytest.raises(ValueError, match=r"perturbations\.reasoning_task: saved 'sort', now 'max'"):
        small(dataclasses.replace(SUITE, reasoning_task="max")).load_state_dict(state)
    with pytest.raises(ValueError, match=r"perturbations: saved a suite, now None"):
        small(None).load_state_dict(state)
    with pytest.raises(ValueError, match=r"perturbations: saved None, now a suite"):
        datamodule.load_state_dict(small(None).state_dict())
    with pytest.raises(ValueError, match="does not match"):
        small(dataclasses.replace(SUITE, facts_per_level=1), log_dir=str(tmp_path))
    tampered = json.loads(json.dumps(state))
    tampered["canary_insertion"]["perturbations"]["items"][5]["offsets"] = [3]
    with pytest.raises(ValueError, match="corrupt"):
        datamodule.load_state_dict(tampered)


def test_settings_given_as_a_dict_build_the_same_suite(dm):
    again = small(SUITE.as_dict())
    assert again.perturbations == dm.perturbations and again.insertion_log["sha256"] == dm.insertion_log["sha256"]
    assert np.array_equal(again.train_stream, dm.train_stream)
    other = small(dataclasses.replace(SUITE, seed=5))
    assert other.insertion_log["sha256"] != dm.insertion_log["sha256"]
    _, offsets = dm.training_windows(40, 16, seed=1, return_offsets=True)
    for start in offsets.tolist():  # background windows touch no planted copy
        for item in items(dm):
            for copy in item["offsets"]:
                assert start + 16 <= copy or start > copy + len(item["token_ids"])


# -- bad settings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arithmetic_digits": 4}, r"perturbations\.arithmetic_digits=4 must be an integer in \[1, 3\]"),
        (
            {"reasoning_task": "add"},
            r"perturbations\.reasoning_task='add' is not supported; choose one of \('sort', 'max', 'reverse'\)",
        ),
        (
            {"reasoning_task": "reverse", "reasoning_length": 5},
            r"perturbations\.reasoning_length=5 must be an integer in \[2, 4\] for reasoning_task='reverse'",
        ),
        ({"facts_per_level": -1}, r"perturbations\.facts_per_level=-1 must be an integer >= 0"),
        ({"arithmetic_copies": 0}, r"perturbations\.arithmetic_copies=0 must be an integer >= 1"),
        ({"arithmetic_heldout": 0}, r"perturbations\.arithmetic_heldout=0 must be an integer >= 1"),
        ({"passage_max_chars": 100}, r"passage_max_chars=100 must be at least perturbations\.passage_min_chars=300"),
        (
            {"arithmetic_digits": 1, "arithmetic_train": 95},
            r"arithmetic_train=95 \+ arithmetic_heldout=200 exceed the 100 possible arithmetic instances",
        ),
        ({"duplicate_levels": (0, -4)}, r"perturbations\.duplicate_levels=\[0, -4\] holds \[-4\]"),
        ({"duplicate_levels": (1, 1)}, r"perturbations\.duplicate_levels=\[1, 1\] repeats a level"),
        (
            {"facts_per_level": 0, "passages_per_level": 0, "arithmetic_train": 0, "reasoning_train": 0},
            "perturbations plant nothing",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_argument(changes, message):
    with pytest.raises(ValueError, match=message):
        PerturbationSettings(**changes)


def test_bad_suite_arguments_of_the_datamodule():
    with pytest.raises(ValueError, match=r"perturbations holds unknown fields \['facts'\]; choose among"):
        CanaryTextDataModule(**SMALL, perturbations={"facts": 3})
    with pytest.raises(ValueError, match=r"perturbations=3 must be None, a memcurve\.data\.PerturbationSettings"):
        CanaryTextDataModule(**SMALL, perturbations=3)
    with pytest.raises(ValueError, match=r"block_size=48 is shorter than EOS \+ perturbations\.passage_prefix_length"):
        CanaryTextDataModule(**SMALL, perturbations=PerturbationSettings())
    with pytest.raises(ValueError, match=r"needs 2502 people.*hold 2500 distinct names"):
        small(dataclasses.replace(SUITE, facts_per_level=500, fact_qa_demonstrations=2))
    with pytest.raises(ValueError, match=r"perturbations\.reasoning_train=9990: only \d+ reasoning instances share"):
        small(dataclasses.replace(SUITE, reasoning_train=9990, reasoning_heldout=10))  # within 10^4, but keys run out


# -- skills_metrics ------------------------------------------------------------------------------------------------
class AnswerTable(nn.Module):
    """A stand-in causal LM that knows some answers: after a known context (the unpadded tokens so far) it puts logit
    10 on the next token of the table, elsewhere all logits are 0 (uniform; greedy then picks token 0, EOS)."""

    def __init__(self, table: dict[tuple[int, ...], int], vocab_size: int) -> None:
        super().__init__()
        self.table, self.vocab_size = table, vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False, **_):
        batch, length = input_ids.shape
        mask = attention_mask[:, -length:] if attention_mask is not None else torch.ones_like(input_ids)
        history = past_key_values or [[] for _ in range(batch)]
        logits = torch.zeros(batch, length, self.vocab_size)
        for row in range(batch):
            for t in range(length):
                if mask[row, t]:
                    history[row] = [*history[row], int(input_ids[row, t])]
                token = self.table.get(tuple(history[row]))
                if token is not None:
                    logits[row, t, token] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=history if use_cache else None)


def teach(table: dict, prompt: list[int], answer: list[int]) -> None:
    for j, token in enumerate(answer):
        table[(*prompt, *answer[:j])] = token


def test_skills_metrics_equal_a_hand_computation_on_a_model_with_known_answers(dm):
    eos = dm.eos_token_id
    log_items = dm.insertion_log["perturbations"]["items"]
    table: dict[tuple[int, ...], int] = {}
    expected: dict[str, float] = {}
    # Arithmetic: every other held-out problem exactly, one more without its closing EOS (wrong); two training ones.
    heldout = [i for i in log_items if i["category"] == "arithmetic" and i["role"] == "heldout"]
    train = [i for i in log_items if i["category"] == "arithmetic" and i["role"] == "train"][:6]  # the scored ones
    for n, item in enumerate(heldout):
        prompt, answer = [eos, *item["token_ids"][: item["prompt_length"]]], item["token_ids"][item["prompt_length"] :]
        if n % 2 == 0:
            teach(table, prompt, [*answer, eos])
        elif n == 1:
            teach(table, prompt, [*answer, answer[0]])
    for item in train[:2]:
        teach(
            table,
            [eos, *item["token_ids"][: item["prompt_length"]]],
            [*item["token_ids"][item["prompt_length"] :], eos],
        )
    expected["skill/arithmetic/heldout"] = math.ceil(len(heldout) / 2) / len(heldout)
    expected["skill/arithmetic/train"] = 2 / 6
    # Reasoning: nothing known.
    expected["skill/reasoning/heldout"] = expected["skill/reasoning/train"] = 0.0
    # Facts: every question of the level-64 people, the city of the level-16 ones; the cloze prompts of level 4.
    for item in log_items:
        if item["category"] != "facts" or item["role"] not in ("member", "control"):
            continue
        for probe in item["probes"]:
            prompt = [eos, *probe["prompt_ids"]]
            if probe["kind"] == "qa" and (
                item["level"] == 64 or (item["level"] == 16 and probe["attribute"] == "city")
            ):
                teach(table, prompt, [*probe["answer_ids"], eos])
            if probe["kind"] == "cloze" and item["level"] == 4:
                teach(table, prompt, probe["answer_ids"])
    for level in (0, 1, 4, 16, 64):
        expected[f"skill/facts/dup{level}/qa"] = {64: 1.0, 16: 1 / 3}.get(level, 0.0)
        expected[f"skill/facts/dup{level}/cloze"] = 1.0 if level == 4 else 0.0
    # Passages: both of level 16 exactly; one of level 1 but its last token (strict 0, loose 15/16 >= 0.75).
    passages = [i for i in log_items if i["category"] == "passages"]
    for item in passages:
        ids = item["token_ids"]
        if item["level"] == 16:
            teach(table, [eos, *ids[:8]], ids[8:24])
    first_level_one = next(i for i in passages if i["level"] == 1)["token_ids"]
    teach(table, [eos, *first_level_one[:8]], [*first_level_one[8:23], first_level_one[8]])
    for level in (0, 1, 4, 16, 64):
        expected[f"skill/passages/dup{level}/strict"] = 1.0 if level == 16 else 0.0
        expected[f"skill/passages/dup{level}/loose"] = {16: 1.0, 1: 0.5}.get(level, 0.0)

    module = CausalLMModule(TINY_MODEL, generation_batch_size=7)
    module.model = AnswerTable(table, dm.vocab_size)
    got = module.skills_metrics(dm, membership=False)
    assert got == pytest.approx(expected) and set(got) == set(expected)


def test_skills_metrics_keys_ranges_and_membership_inference_against_sklearn(dm, tmp_path):
    from sklearn.metrics import roc_auc_score

    from memcurve.metrics.unlearning import sequence_scores

    torch.manual_seed(0)
    module = CausalLMModule(TINY_MODEL, ndcg_max_batches=1)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="skills"),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    logged = {key for key in trainer.callback_metrics if key.startswith("skill/")}
    assert {"skill/arithmetic/heldout", "skill/reasoning/train", "skill/facts/dup64/qa"} <= logged
    assert "skill/passages/dup16/strict" in logged and not any(
        k.startswith("mia/facts") for k in trainer.callback_metrics
    )
    module.eval()
    metrics = module.evaluation_metrics(dm)
    skills = {key: value for key, value in metrics.items() if key.startswith("skill/")}
    assert set(skills) == logged and all(0.0 <= value <= 1.0 for value in skills.values())
    assert {"mem/strict", "mia/mem/auroc_mink", "val/perplexity"} <= set(metrics)  # the rest stays
    examples = dm.perturbation_examples()
    for category in ("passages", "facts", "arithmetic", "reasoning"):
        probe = examples[f"{category}/text"]
        scores = sequence_scores(module.model, probe.prompts, probe.answers, pad_token_id=dm.pad_token_id, k=0.4)
        levels = probe.levels
        for level in sorted(set(levels.tolist())):
            mask = levels == level
            nll = float(scores["normalized_log_likelihood"][mask].mean())
            assert metrics[f"mia/{category}/dup{level}/nll"] == pytest.approx(nll)
            if level == 0:
                assert f"mia/{category}/dup0/auroc_loss" not in metrics
                continue
            rows = mask | (levels == 0)
            member = mask[rows].numpy()
            assert metrics[f"mia/{category}/dup{level}/auroc_loss"] == pytest.approx(
                roc_auc_score(member, -scores["loss"][rows]), abs=1e-6
            )
            assert metrics[f"mia/{category}/dup{level}/auroc_mink"] == pytest.approx(
                roc_auc_score(member, scores["min_k"][rows]), abs=1e-6
            )
    assert {"mia/arithmetic/dup1/auroc_loss", "mia/passages/dup64/auroc_mink"} <= set(metrics)
    assert module.skills_metrics(small(None)) == {}


@pytest.mark.slow
def test_the_tiny_skills_config_runs_end_to_end(tmp_path, monkeypatch):
    """``memcurve fit`` on configs/olmo2_tiny_skills.yaml for a few steps (that it runs, not that it learns), then
    ``memcurve validate`` from its checkpoint (the saved suite checked against the rebuilt one), the skills and
    membership inference of every category, and a changed suite refused."""
    from pathlib import Path

    import yaml

    from memcurve.cli import run

    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "olmo2_tiny_skills.yaml").read_text())
    config["trainer"] |= {"max_epochs": 1, "limit_train_batches": 8, "limit_val_batches": 2}
    config["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "skills.yaml"
    path.write_text(yaml.safe_dump(config))
    run(["fit", "--config", str(path)])
    run_dir = tmp_path / "runs" / "olmo2_tiny_skills" / "version_0"
    log = json.loads((run_dir / CANARY_FILENAME).read_text())
    assert {item["category"] for item in log["perturbations"]["items"]} == {
        "passages", "facts", "arithmetic", "reasoning"
    }  # fmt: skip
    checkpoint = str(run_dir / "checkpoints" / "last.ckpt")
    run(["validate", "--config", str(run_dir / "config.yaml"), "--ckpt_path", checkpoint])
    datamodule = CanaryTextDataModule(**config["data"]["init_args"])
    module = CausalLMModule.load_from_checkpoint(checkpoint)
    metrics = module.skills_metrics(datamodule)
    assert {"skill/arithmetic/heldout", "skill/facts/dup64/qa", "mia/passages/dup64/auroc_loss"} <= set(metrics)
    with pytest.raises(ValueError, match=r"perturbations\.reasoning_train: saved 3000, now 2999"):
        run(
            ["validate", "--config", str(run_dir / "config.yaml"), "--ckpt_path", checkpoint,
             "--data.init_args.perturbations.reasoning_train=2999"]
        )  # fmt: skip
