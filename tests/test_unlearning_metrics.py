"""Unlearning metrics: per-item likelihood statistics of a tiny OLMo-2, Min-K% Prob, membership AUROC against
sklearn, forget quality against scipy's KS test, MUSE's privacy leakage, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from memcurve.metrics import (
    ForgetQuality,
    forget_quality,
    membership_auroc,
    membership_aurocs,
    min_k_percent,
    privacy_leakage,
    sequence_scores,
    suffix_log_likelihood,
    token_log_probs,
)

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

VOCAB, PAD = 64, 0
RTOL = 1e-12  # float64 sums of the same float32 values in another order
AUROC_TOL = 1e-6  # torchmetrics builds the ROC curve in float32


@pytest.fixture(scope="module")
def olmo() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Olmo2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.Olmo2ForCausalLM(config)


def random_items(count: int = 7, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    prefix_lengths = torch.randint(1, 9, (count,), generator=generator).tolist()
    suffix_lengths = torch.randint(1, 12, (count,), generator=generator).tolist()
    prefixes = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in prefix_lengths]
    suffixes = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in suffix_lengths]
    return prefixes, suffixes


def unpadded_log_probs(model: torch.nn.Module, prefix: list[int], suffix: list[int]) -> torch.Tensor:
    ids = torch.tensor([prefix + suffix])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    log_probs = logits.log_softmax(-1)[len(prefix) - 1 : -1]
    return log_probs.gather(1, torch.tensor(suffix)[:, None]).squeeze(1)


def min_k_reference(values: list[float], k: float) -> float:
    count = max(1, math.floor(k * len(values)))
    return float(np.mean(np.sort(np.asarray(values, dtype=np.float64))[:count]))


# -- per-item statistics ---------------------------------------------------------------------------------------
def test_token_log_probs_equal_unpadded_teacher_forcing_and_suffix_log_likelihood(olmo):
    prefixes, suffixes = random_items()
    batched = token_log_probs(olmo, prefixes, suffixes, pad_token_id=PAD, batch_size=3)
    one_by_one = token_log_probs(olmo, prefixes, suffixes, pad_token_id=PAD, batch_size=1)
    for values, single, prefix, suffix in zip(batched, one_by_one, prefixes, suffixes):
        assert values.dtype == torch.float64 and values.shape == (len(suffix),)
        torch.testing.assert_close(values, unpadded_log_probs(olmo, prefix, suffix), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values, single, rtol=1e-4, atol=1e-5)
    means = torch.stack([values.mean() for values in batched])
    reference = suffix_log_likelihood(olmo, prefixes, suffixes, pad_token_id=PAD, batch_size=3)
    torch.testing.assert_close(means, reference, rtol=RTOL, atol=RTOL)
    olmo.train()  # the model's mode is restored
    token_log_probs(olmo, prefixes[:2], suffixes[:2], pad_token_id=PAD)
    assert olmo.training
    olmo.eval()


def test_sequence_scores_relations(olmo):
    prefixes, suffixes = random_items(seed=1)
    scores = sequence_scores(olmo, prefixes, suffixes, pad_token_id=PAD, k=0.3, batch_size=4)
    log_probs = token_log_probs(olmo, prefixes, suffixes, pad_token_id=PAD, batch_size=4)
    assert set(scores) == {"loss", "log_likelihood", "normalized_log_likelihood", "min_k", "tokens"}
    assert scores["tokens"].tolist() == [len(s) for s in suffixes]
    torch.testing.assert_close(scores["log_likelihood"], torch.stack([v.sum() for v in log_probs]))
    torch.testing.assert_close(scores["normalized_log_likelihood"], scores["log_likelihood"] / scores["tokens"])
    torch.testing.assert_close(scores["loss"], -scores["normalized_log_likelihood"])
    expected = torch.tensor([min_k_reference(v.tolist(), 0.3) for v in log_probs], dtype=torch.float64)
    torch.testing.assert_close(scores["min_k"], expected)
    assert bool((scores["min_k"] <= scores["normalized_log_likelihood"] + 1e-12).all())


@pytest.mark.parametrize("k", [0.05, 0.2, 0.4, 0.5, 1.0])
def test_min_k_percent_matches_a_sorted_reference_with_ties(k):
    generator = np.random.default_rng(0)
    items = [generator.normal(size=n) for n in (1, 2, 3, 5, 10, 17)]
    items += [np.array([-1.0, -1.0, -1.0, -2.0, -2.0, 0.0]), np.zeros(4)]  # ties
    result = min_k_percent([torch.from_numpy(v) for v in items], k)
    assert result.dtype == torch.float64
    assert result.tolist() == pytest.approx([min_k_reference(v.tolist(), k) for v in items], rel=0, abs=1e-15)
    if k == 1.0:
        assert result.tolist() == pytest.approx([float(np.mean(v)) for v in items], abs=1e-15)


# -- membership AUROC ------------------------------------------------------------------------------------------
def sklearn_auroc(members, nonmembers) -> float:
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return float(roc_auc_score(labels, np.r_[members, nonmembers]))


@pytest.mark.parametrize("seed", range(4))
def test_membership_auroc_matches_sklearn_on_random_data(seed):
    generator = np.random.default_rng(seed)
    members = generator.normal(0.5, 1.0, size=int(generator.integers(1, 40)))
    nonmembers = generator.normal(0.0, 1.0, size=int(generator.integers(1, 40)))
    assert membership_auroc(members, nonmembers) == pytest.approx(sklearn_auroc(members, nonmembers), abs=AUROC_TOL)
    assert membership_auroc(torch.from_numpy(members).float(), list(nonmembers)) == pytest.approx(
        sklearn_auroc(members.astype(np.float32), nonmembers), abs=AUROC_TOL
    )


@pytest.mark.parametrize("seed", range(4))
def test_membership_auroc_matches_sklearn_on_tied_data(seed):
    generator = np.random.default_rng(10 + seed)
    members = generator.integers(0, 4, size=23).astype(float)
    nonmembers = generator.integers(-1, 3, size=31).astype(float)
    assert membership_auroc(members, nonmembers) == pytest.approx(sklearn_auroc(members, nonmembers), abs=AUROC_TOL)


def test_membership_auroc_hand_cases_and_large_scores():
    assert membership_auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert membership_auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert membership_auroc([5.0, 5.0], [5.0]) == 0.5  # all tied
    assert membership_auroc([1.0, 2.0], [2.0, 0.0]) == pytest.approx(0.625)  # (1 + 0.5 + 1 + 0) / 4
    # Far outside [0, 1]: a sigmoid would round these to 1.0 and tie them; the ranks keep them apart.
    members, nonmembers = [60.0, 70.0, 80.0], [40.0, 50.0, 65.0]
    assert membership_auroc(members, nonmembers) == pytest.approx(sklearn_auroc(members, nonmembers), abs=AUROC_TOL)
    assert membership_auroc([-1e6], [-2e6]) == 1.0


def test_membership_aurocs_read_loss_and_min_k():
    member = {"loss": torch.tensor([0.1, 0.2, 0.3]), "min_k": torch.tensor([-0.5, -0.4, -0.9])}
    nonmember = {"loss": torch.tensor([1.0, 0.15]), "min_k": torch.tensor([-2.0, -0.45])}
    result = membership_aurocs(member, nonmember)
    assert result["loss"] == pytest.approx(sklearn_auroc([-0.1, -0.2, -0.3], [-1.0, -0.15]), abs=AUROC_TOL)
    assert result["min_k"] == pytest.approx(sklearn_auroc([-0.5, -0.4, -0.9], [-2.0, -0.45]), abs=AUROC_TOL)
    with pytest.raises(ValueError, match=r"nonmember lacks \['min_k'\]"):
        membership_aurocs(member, {"loss": torch.zeros(2)})


# -- forget quality and privacy leakage ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_forget_quality_matches_scipy_on_random_and_tied_data(seed):
    generator = np.random.default_rng(seed)
    method, oracle = generator.normal(0.3, 1.0, size=25), generator.normal(0.0, 1.0, size=30)
    for a, b in ((method, oracle), (np.round(method), np.round(oracle))):  # random, then heavily tied
        result = forget_quality(a, b)
        reference = ks_2samp(a, b)
        assert isinstance(result, ForgetQuality)
        assert result.statistic == pytest.approx(float(reference.statistic), abs=1e-15)
        assert result.pvalue == pytest.approx(float(reference.pvalue), rel=1e-12)
    same = forget_quality(torch.arange(5.0), torch.arange(5.0))
    assert same == (0.0, 1.0)


def test_privacy_leakage_is_muses_definition():
    generator = np.random.default_rng(0)
    forget_method, holdout = generator.normal(1.0, 1.0, 40), generator.normal(0.0, 1.0, 50)  # likelihood scores
    forget_oracle = generator.normal(0.1, 1.0, 40)
    # MUSE's code: labels 0 = forget, 1 = holdout, score = -(Min-k NLL) = the likelihood score; AUC via the ROC curve.
    labels = np.r_[np.zeros(40), np.ones(50)]
    muse_method = roc_auc_score(labels, np.r_[forget_method, holdout])
    muse_oracle = roc_auc_score(labels, np.r_[forget_oracle, holdout])
    expected = (muse_method - muse_oracle) / muse_oracle
    leak = privacy_leakage(membership_auroc(forget_method, holdout), membership_auroc(forget_oracle, holdout))
    assert leak == pytest.approx(expected, abs=10 * AUROC_TOL)
    assert leak < 0  # the method's forget items are still more likely than the oracle's: under-unlearning
    assert privacy_leakage(0.5, 0.5) == 0.0
    assert privacy_leakage(1.0, 0.5) == -1.0  # a model that recites everything
    assert privacy_leakage(0.25, 0.5) == 0.5  # over-unlearning


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: membership_auroc([], [1.0]), "member_scores is empty"),
        (lambda: membership_auroc([1.0], [float("nan"), 2.0]), r"nonmember_scores holds 1 non-finite values"),
        (lambda: membership_auroc([[1.0]], [1.0]), r"member_scores must be 1-D"),
        (lambda: membership_auroc([True], [1.0]), "member_scores must hold real numbers"),
        (lambda: membership_auroc(["a"], [1.0]), "member_scores must be a 1-D sequence of numbers"),
        (lambda: forget_quality([1.0, float("nan")], [1.0]), "method_values holds 1 non-finite"),
        (lambda: forget_quality([1.0], []), "oracle_values is empty"),
        (lambda: forget_quality([1.0], [float("inf")]), "oracle_values holds 1 non-finite"),
        (lambda: privacy_leakage(0.7, 1.0), r"oracle_auroc=1.0: .* PrivLeak is undefined"),
        (lambda: privacy_leakage(1.2, 0.5), r"method_auroc=1.2 must be an AUROC"),
        (lambda: privacy_leakage(0.5, float("nan")), r"oracle_auroc=nan must be an AUROC"),
        (lambda: min_k_percent([torch.zeros(3)], k=0), r"k=0 must be a number in \(0, 1\]"),
        (lambda: min_k_percent([torch.zeros(3)], k=1.5), r"k=1.5 must be"),
        (lambda: min_k_percent([torch.zeros(0)]), r"log_probs\[0\] must be a non-empty 1-D tensor"),
        (lambda: min_k_percent([]), "log_probs is empty"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sequence_errors(olmo):
    with pytest.raises(ValueError, match="got 2 prefixes but 1 suffixes"):
        token_log_probs(olmo, [[3], [4]], [[5]], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"prefixes\[0\] is empty"):
        sequence_scores(olmo, [[]], [[5]], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"k=2 must be"):
        sequence_scores(olmo, [[3]], [[5]], pad_token_id=PAD, k=2)
    with pytest.raises(TypeError, match="log_probs must be a list"):
        min_k_percent(torch.zeros(2, 3))
