"""Verbatim-memorization metrics on tiny causal LMs built from config (CPU, offline, random weights)."""

from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
from sklearn.metrics import ndcg_score
from torchmetrics.functional.text import perplexity as torchmetrics_perplexity

from memcurve.metrics import (
    HeldOutPerplexity,
    TopKReference,
    VerbatimMemorization,
    greedy_generate,
    mine_memorized,
    ndcg_against_reference,
    ndcg_at_k,
    shifted_prefix_recall,
    suffix_log_likelihood,
    verbatim_scores,
    weights_fingerprint,
)

transformers = pytest.importorskip("transformers")

VOCAB = 64
PAD = 0


def tiny_olmo() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Olmo2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.2,  # larger than default so that generations depend on the context
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.Olmo2ForCausalLM(config)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(2)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=64,
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config)


MODELS = {"olmo2": tiny_olmo, "llama": tiny_llama, "gpt2": tiny_gpt2}


def random_prefixes(lengths, seed=0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@torch.no_grad()
def unpadded_greedy(model, prefix: list[int], steps: int) -> list[int]:
    """The definition: one sequence, no padding, no cache, a full forward per step, argmax."""
    ids = torch.tensor([prefix])
    for _ in range(steps):
        next_token = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_token.view(1, 1)], dim=1)
    return ids[0, len(prefix) :].tolist()


# --------------------------------------------------------------------------- scores
def test_hand_examples_levenshtein_exact_tokens_and_thresholds():
    generated = torch.tensor([[1, 2, 4, 4], [5, 6, 7, 8], [2, 3, 4, 9], [9, 9, 9, 9]])
    targets = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4], [1, 2, 3, 4]])
    scores = verbatim_scores(generated, targets)
    # one substitution / 4; exact; one deletion + one insertion (a shift: Hamming would say 4); all different
    assert scores["distance"].tolist() == [0.25, 0.0, 0.5, 1.0]
    assert scores["similarity"].tolist() == [0.75, 1.0, 0.5, 0.0]
    assert scores["strict"].tolist() == [False, True, False, False]
    assert scores["loose"].tolist() == [True, True, False, False]  # 0.75 is loose: the threshold is inclusive
    assert scores["exact_tokens"].tolist() == [2, 4, 0, 0]
    assert scores["strict"].dtype == torch.bool and scores["exact_tokens"].dtype == torch.int64


def test_loose_threshold_boundary_on_eight_tokens():
    targets = torch.arange(10, 18).repeat(3, 1)
    generated = targets.clone()
    generated[0, [3, 6]] = 0  # 2 of 8 wrong: similarity 0.75
    generated[1, [0, 3, 6]] = 0  # 3 of 8 wrong: 0.625
    generated[2, 7] = 0  # only the last token wrong
    scores = verbatim_scores(generated, targets)
    assert scores["loose"].tolist() == [True, False, True]
    assert scores["exact_tokens"].tolist() == [3, 0, 7]
    assert verbatim_scores(generated, targets, loose_threshold=0.6)["loose"].tolist() == [True, True, True]
    assert verbatim_scores(generated, targets, loose_threshold=1.0)["loose"].tolist() == [False, False, False]


def test_verbatim_scores_validation():
    with pytest.raises(ValueError, match=r"generated has shape \(2, 4\) but targets has \(2, 5\)"):
        verbatim_scores(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="generated must be an integer tensor"):
        verbatim_scores(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="suffix_length=0 must be a positive integer"):
        verbatim_scores(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"loose_threshold=1.5 must be a number in \[0, 1\]"):
        verbatim_scores(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), 1.5)


def random_recall_batch(generator, size, length=6):
    targets = torch.randint(0, 5, (size, length), generator=generator)
    generated = torch.where(torch.rand(size, length, generator=generator) < 0.2, (targets + 1) % 5, targets)
    groups = torch.tensor([0, 1, 4, 16])[torch.randint(0, 4, (size,), generator=generator)]
    return generated, targets, groups


def test_metric_accumulates_batch_by_batch_like_one_shot_with_groups():
    generator = torch.Generator().manual_seed(0)
    batches = [random_recall_batch(generator, size) for size in (7, 1, 12)]
    streaming = VerbatimMemorization(group_values=[0, 1, 4, 16, 64])
    for batch in batches:
        streaming.update(*batch)
    generated, targets, groups = (torch.cat(parts) for parts in zip(*batches))
    one_shot = VerbatimMemorization(group_values=[0, 1, 4, 16, 64])
    one_shot.update(generated, targets, groups)
    result, expected = streaming.compute(), one_shot.compute()
    assert result.keys() == expected.keys()
    for key in result:
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key

    scores = verbatim_scores(generated, targets)
    assert result["count"] == 20.0
    assert result["strict"] == pytest.approx(scores["strict"].double().mean().item())
    assert result["avg_levenshtein"] == pytest.approx(scores["distance"].mean().item())
    assert result["avg_similarity"] == pytest.approx(1.0 - result["avg_levenshtein"])
    assert result["exact_tokens"] == pytest.approx(scores["exact_tokens"].double().mean().item())
    for level in (0, 1, 4, 16):
        rows = groups == level
        assert result[f"g{level}/count"] == float(rows.sum())
        assert result[f"g{level}/loose"] == pytest.approx(scores["loose"][rows].double().mean().item())
        assert result[f"g{level}/avg_levenshtein"] == pytest.approx(scores["distance"][rows].mean().item())
    assert "g64/strict" not in result  # no example at level 64: no per-group entry
    total = sum(result[f"g{level}/count"] for level in (0, 1, 4, 16))
    assert total == result["count"]


def test_metric_per_group_hand_example_and_group_errors():
    metric = VerbatimMemorization(group_values=[1, 64])
    metric.update(
        torch.tensor([[1, 2], [1, 9], [3, 4]]), torch.tensor([[1, 2], [1, 2], [3, 4]]), torch.tensor([1, 1, 64])
    )
    result = metric.compute()
    assert result["g1/strict"] == 0.5 and result["g1/exact_tokens"] == 1.5 and result["g64/strict"] == 1.0
    assert result["strict"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"groups holds \[4\], which are not in group_values=\[1, 64\]"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="groups=None but this metric tracks group_values"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="built without group_values"):
        VerbatimMemorization().update(
            torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long), torch.tensor([0])
        )
    with pytest.raises(ValueError, match="holds duplicates"):
        VerbatimMemorization(group_values=[1, 1])
    empty = VerbatimMemorization().compute()
    assert math.isnan(empty["strict"]) and empty["count"] == 0.0


# --------------------------------------------------------------------------- greedy decoding
@pytest.mark.parametrize("name", sorted(MODELS))
def test_left_padded_batches_equal_unpadded_greedy(name):
    model = MODELS[name]()
    model.train()  # greedy_generate must switch to eval and back
    prefixes = random_prefixes([3, 9, 5, 1, 7, 12, 4], seed=1)
    generated = greedy_generate(model, prefixes, 6, pad_token_id=PAD, batch_size=4)
    assert model.training
    model.eval()
    expected = [unpadded_greedy(model, prefix, 6) for prefix in prefixes]
    assert generated.shape == (7, 6) and generated.dtype == torch.long
    assert generated.tolist() == expected
    assert len(set(generated.flatten().tolist())) > 3  # the context matters: not one repeated token
    # the padding token's value is irrelevant: it is masked
    assert greedy_generate(model, prefixes, 6, pad_token_id=VOCAB - 1, batch_size=3).tolist() == expected


def _mentions_legacy_cache(message: str) -> bool:
    message = message.lower()
    return "past_key_values" in message or "legacy cache" in message or "cache_params" in message


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_generation_uses_the_current_cache_api(name, caplog):
    """No deprecation of ``past_key_values`` / legacy tuple caches, as a Python warning or a transformers log."""
    model = MODELS[name]().eval()
    prefixes = random_prefixes([3, 9, 5, 1, 7], seed=5)
    # transformers logs some deprecations once per process (`warning_once`, an lru_cache): forget earlier ones
    warning_once = getattr(logging.Logger, "warning_once", None)
    if hasattr(warning_once, "cache_clear"):
        warning_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        generated = greedy_generate(model, prefixes, 5, pad_token_id=PAD, batch_size=2)
    assert generated.shape == (5, 5)
    messages = [str(w.message) for w in caught] + [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if _mentions_legacy_cache(m)]


def test_tensor_prefixes_and_eval_mode_kept():
    model = tiny_olmo().eval()
    prefixes = torch.tensor(random_prefixes([5, 5, 5], seed=3))
    generated = greedy_generate(model, prefixes, 4, pad_token_id=PAD)
    assert not model.training
    assert generated.tolist() == [unpadded_greedy(model, row, 4) for row in prefixes.tolist()]


def test_generation_does_not_stop_at_eos():
    model = tiny_olmo().eval()
    prefixes = random_prefixes([4, 6, 2], seed=4)
    first = greedy_generate(model, prefixes[:1], 1, pad_token_id=PAD)[0, 0].item()
    model.config.eos_token_id = first  # the argmax token is now EOS, for the config and generate() alike
    model.generation_config.eos_token_id = first
    generated = greedy_generate(model, prefixes, 10, pad_token_id=PAD)
    assert generated.shape == (3, 10)
    assert generated[0, 0].item() == first  # EOS is emitted (not suppressed) and decoding goes on
    assert generated.tolist() == [unpadded_greedy(model, prefix, 10) for prefix in prefixes]


def test_greedy_generate_validation():
    model = tiny_olmo()
    with pytest.raises(ValueError, match="prefixes is empty"):
        greedy_generate(model, [], 4, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"prefixes\[1\] is empty"):
        greedy_generate(model, [[3, 4], []], 4, pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be a positive integer"):
        greedy_generate(model, [[3, 4]], 0, pad_token_id=PAD)
    with pytest.raises(ValueError, match="batch_size=0 must be a positive integer"):
        greedy_generate(model, [[3, 4]], 2, pad_token_id=PAD, batch_size=0)
    with pytest.raises(ValueError, match="pad_token_id=-1"):
        greedy_generate(model, [[3, 4]], 2, pad_token_id=-1)
    with pytest.raises(ValueError, match=r"prefixes\[0\] must be a sequence of integer token ids"):
        greedy_generate(model, [[3.5, 4]], 2, pad_token_id=PAD)


# --------------------------------------------------------------------------- likelihoods
@pytest.mark.parametrize("name", ["olmo2", "gpt2"])
def test_suffix_log_likelihood_matches_unpadded_teacher_forcing(name):
    model = MODELS[name]().eval()
    prefixes = random_prefixes([4, 9, 2, 6], seed=5)
    suffixes = random_prefixes([3, 3, 5, 1], seed=6)  # lengths may differ: each is averaged over its own tokens
    result = suffix_log_likelihood(model, prefixes, suffixes, pad_token_id=PAD, batch_size=3)
    expected = []
    with torch.no_grad():
        for prefix, suffix in zip(prefixes, suffixes):
            logits = model(input_ids=torch.tensor([prefix + suffix])).logits[0]
            log_probs = logits[len(prefix) - 1 : len(prefix) + len(suffix) - 1].log_softmax(dim=-1)
            expected.append(log_probs[torch.arange(len(suffix)), torch.tensor(suffix)].mean().item())
    assert result.shape == (4,)
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="got 4 prefixes but 3 suffixes"):
        suffix_log_likelihood(model, prefixes, suffixes[:3], pad_token_id=PAD)


def test_perplexity_is_token_weighted_and_excludes_padding():
    generator = torch.Generator().manual_seed(0)
    vocab = 11
    # batch 1: right padding, 2 x 6; batch 2: left padding, 3 x 4 — different numbers of predicted tokens
    ids1 = torch.randint(0, vocab, (2, 6), generator=generator)
    mask1 = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    ids2 = torch.randint(0, vocab, (3, 4), generator=generator)
    mask2 = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    logits1 = torch.randn(2, 6, vocab, generator=generator)
    logits2 = torch.randn(3, 4, vocab, generator=generator)
    for logits, mask in ((logits1, mask1), (logits2, mask2)):
        logits[mask == 0] = 1e4  # garbage at padding must not leak in

    nll, count, per_batch = 0.0, 0, []
    for logits, ids, mask in ((logits1, ids1, mask1), (logits2, ids2, mask2)):
        batch_nll, batch_count = 0.0, 0
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                if mask[b, t] and mask[b, t + 1]:  # predict token t + 1 from position t, both real
                    batch_nll -= logits[b, t].log_softmax(-1)[ids[b, t + 1]].item()
                    batch_count += 1
        nll, count = nll + batch_nll, count + batch_count
        per_batch.append(math.exp(batch_nll / batch_count))
    assert count == 5 + 2 + 1 + 3 + 2  # 7 + 6: the batches weigh differently

    metric = HeldOutPerplexity()
    metric.update(logits1, ids1, mask1)
    metric.update(logits2, ids2, mask2)
    value = metric.compute().item()
    assert value == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert value != pytest.approx(sum(per_batch) / 2, rel=1e-3)  # not the mean of per-batch perplexities
    assert int(metric.count) == count

    # the same number from torchmetrics' functional perplexity on the real (position, next token) pairs
    preds, targets = [], []
    for logits, ids, mask in ((logits1, ids1, mask1), (logits2, ids2, mask2)):
        valid = mask[:, :-1].bool() & mask[:, 1:].bool()
        preds.append(logits[:, :-1][valid])
        targets.append(ids[:, 1:][valid])
    reference = torchmetrics_perplexity(torch.cat(preds)[None], torch.cat(targets)[None])
    assert value == pytest.approx(reference.item(), rel=1e-5)

    unmasked = HeldOutPerplexity()
    unmasked.update(logits2[1:2], ids2[1:2])  # no mask: every position but the last
    assert int(unmasked.count) == 3
    with pytest.raises(ValueError, match=r"input_ids must have shape \(2, 6\)"):
        metric.update(logits1, ids2)


# --------------------------------------------------------------------------- nDCG@k
def relevance_vector(reference_topk: torch.Tensor, vocab: int) -> torch.Tensor:
    k = reference_topk.shape[-1]
    relevance = torch.zeros(*reference_topk.shape[:-1], vocab)
    return relevance.scatter_(-1, reference_topk, torch.arange(k, 0, -1, dtype=torch.float32).expand_as(reference_topk))


def test_ndcg_matches_sklearn_on_random_data():
    generator = torch.Generator().manual_seed(0)
    vocab = 50
    scores = torch.randn(64, vocab, generator=generator, dtype=torch.float64)
    # a reference correlated with the scores, so nDCG spreads over (0, 1)
    reference = (scores + 0.7 * torch.randn(64, vocab, generator=generator, dtype=torch.float64)).topk(10).indices
    ours = ndcg_at_k(scores, reference)
    y_true = relevance_vector(reference, vocab).numpy()
    expected = [ndcg_score(y_true[i : i + 1], scores[i : i + 1].numpy(), k=10) for i in range(64)]
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert 0.0 < ours.min() < ours.max() < 1.0
    # leading dimensions are vectorized: [2, 32, V] gives the same numbers
    torch.testing.assert_close(ndcg_at_k(scores.view(2, 32, vocab), reference.view(2, 32, 10)), ours.view(2, 32))


def test_ndcg_hand_made_rankings():
    vocab = 8
    reference = torch.tensor([[5, 2, 7]])  # k = 3: relevance 3, 2, 1
    identical = torch.zeros(1, vocab)
    identical[0, [5, 2, 7]] = torch.tensor([3.0, 2.0, 1.0])
    assert ndcg_at_k(identical, reference).item() == 1.0

    reversed_top = torch.zeros(1, vocab)
    reversed_top[0, [7, 2, 5]] = torch.tensor([3.0, 2.0, 1.0])
    # DCG  = 1/log2(2) + 2/log2(3) + 3/log2(4) = 1 + 1.2618595 + 1.5 = 3.7618595
    # IDCG = 3/log2(2) + 2/log2(3) + 1/log2(4) = 3 + 1.2618595 + 0.5 = 4.7618595
    assert ndcg_at_k(reversed_top, reference).item() == pytest.approx(3.7618595 / 4.7618595, abs=1e-7)
    assert ndcg_at_k(reversed_top, reference).item() == pytest.approx(0.789998, abs=1e-6)

    disjoint = torch.zeros(1, vocab)
    disjoint[0, [0, 1, 3]] = torch.tensor([3.0, 2.0, 1.0])
    assert ndcg_at_k(disjoint, reference).item() == 0.0


def test_ndcg_validation():
    with pytest.raises(ValueError, match="they must agree on every dimension but the last"):
        ndcg_at_k(torch.randn(4, 20), torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"k=30 \(reference_topk's last dimension\) must be in \[1, vocab=20\]"):
        ndcg_at_k(torch.randn(4, 20), torch.zeros(4, 30, dtype=torch.long))
    with pytest.raises(ValueError, match="repeats a token id"):
        ndcg_at_k(torch.randn(1, 20), torch.tensor([[1, 2, 1]]))
    with pytest.raises(ValueError, match="outside"):
        ndcg_at_k(torch.randn(1, 20), torch.tensor([[1, 2, 20]]))


def nd_batches():
    generator = torch.Generator().manual_seed(7)
    ids1 = torch.randint(3, VOCAB, (3, 8), generator=generator)
    mask1 = torch.ones(3, 8, dtype=torch.long)
    mask1[1, :3] = 0  # left padding
    ids2 = torch.randint(3, VOCAB, (2, 5), generator=generator)
    return [(ids1, mask1), {"input_ids": ids2, "attention_mask": torch.ones(2, 5, dtype=torch.long)}]


def test_reference_guard_prevents_self_reference_bug():
    model_a = tiny_olmo()
    batches = nd_batches()
    reference_a = TopKReference.from_model(model_a, batches, k=10)
    assert reference_a.weights_fingerprint == weights_fingerprint(model_a) == weights_fingerprint(model_a.state_dict())
    assert reference_a.num_positions == 3 * 8 - 3 + 2 * 5 and reference_a.batch_shapes == ((3, 8), (2, 5))
    assert ndcg_against_reference(model_a, reference_a, batches) == 1.0

    # the shortcut is what a forward pass gives: model A ranks exactly as its own reference
    with torch.no_grad():
        ids, mask = batches[0]
        logits = model_a(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    assert ndcg_at_k(logits[mask.bool()], reference_a.topk_ids[0]).min().item() == 1.0

    model_b = copy.deepcopy(model_a)  # "edited": perturbed MLP weights
    with torch.no_grad():
        for name, parameter in model_b.named_parameters():
            if ".mlp." in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    assert weights_fingerprint(model_b) != reference_a.weights_fingerprint
    edited = ndcg_against_reference(model_b, reference_a, batches)
    assert 0.0 < edited < 1.0
    # the paper's bug: a reference computed from the edited model itself reports a perfect 1.0
    naive = ndcg_against_reference(model_b, TopKReference.from_model(model_b, batches, k=10), batches)
    assert naive == 1.0 and edited < naive

    with pytest.raises(ValueError, match="reference=None"):
        ndcg_against_reference(model_b, None, batches)
    with pytest.raises(ValueError, match="reference must be a TopKReference"):
        ndcg_against_reference(model_b, reference_a.topk_ids, batches)
    with pytest.raises(ValueError, match=r"built only by TopKReference\.from_model"):
        TopKReference(10, weights_fingerprint(model_a), reference_a.topk_ids, reference_a.position_masks, ("",) * 2)
    with pytest.raises(ValueError, match=r"fingerprint=.* does not match the model's weights_fingerprint"):
        TopKReference.from_model(model_b, batches, fingerprint=reference_a.weights_fingerprint)


def test_reference_refuses_other_batches():
    model = tiny_olmo()
    batches = nd_batches()
    reference = TopKReference.from_model(model, batches, k=5)
    ids, mask = batches[0]
    with pytest.raises(
        ValueError, match=r"batches\[0\] has shape \(3, 7\) but the reference was built from .*\(3, 8\)"
    ):
        ndcg_against_reference(model, reference, [(ids[:, :7], mask[:, :7]), batches[1]])
    with pytest.raises(ValueError, match=r"batches\[0\] holds other tokens"):
        ndcg_against_reference(model, reference, [((ids + 1) % VOCAB, mask), batches[1]])
    with pytest.raises(ValueError, match="got 1 batches but the reference was built from 2"):
        ndcg_against_reference(model, reference, batches[:1])
    with pytest.raises(ValueError, match="k=100 exceeds the vocabulary size 64"):
        TopKReference.from_model(model, batches, k=100)


def test_weights_fingerprint_follows_content():
    model = tiny_olmo()
    before = weights_fingerprint(model)
    assert before == weights_fingerprint(copy.deepcopy(model))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert weights_fingerprint(model) != before


# --------------------------------------------------------------------------- mining and shifted prefixes
def test_mine_memorized_on_constructed_sequences():
    model = tiny_olmo().eval()
    prefixes = random_prefixes([6] * 4, seed=8)
    recalled = greedy_generate(model, prefixes, 5, pad_token_id=PAD).tolist()
    one_wrong = [*recalled[1][:4], (recalled[1][4] + 1) % VOCAB]  # 4 of 5: loose, not strict
    all_wrong = [(token + 1) % VOCAB for token in recalled[2]]
    sequences = [
        prefixes[0] + recalled[0],
        prefixes[1] + one_wrong,
        prefixes[2] + all_wrong,
        prefixes[3] + recalled[3] + [7, 7, 7],  # tokens after prefix + suffix are ignored
    ]
    mined = mine_memorized(model, sequences, 6, 5, pad_token_id=PAD, batch_size=2)
    assert mined["strict"].tolist() == [True, False, False, True]
    assert mined["loose"].tolist() == [True, True, False, True]
    assert mined["exact_tokens"].tolist() == [5, 4, 0, 5]
    assert mined["generated"].tolist() == recalled
    with pytest.raises(ValueError, match=r"prefix_length=6 \+ suffix_length=5 exceeds the sequence length 10"):
        mine_memorized(model, [*sequences, prefixes[0] + recalled[0][:4]], 6, 5, pad_token_id=PAD)
    with pytest.raises(ValueError, match="suffix_length=0 must be a positive integer"):
        mine_memorized(model, sequences, 6, 0, pad_token_id=PAD)


def test_shifted_prefix_recall():
    model = tiny_olmo().eval()
    prefixes = random_prefixes([8, 10, 9], seed=9)
    suffixes = greedy_generate(model, prefixes, 4, pad_token_id=PAD)
    result = shifted_prefix_recall(model, prefixes, suffixes, pad_token_id=PAD)
    assert list(result) == [0, 1, 2, 4]
    for values in result.values():
        assert set(values) == {"strict", "loose", "avg_similarity"}
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert result[0] == {"strict": 1.0, "loose": 1.0, "avg_similarity": 1.0}
    shifted = greedy_generate(model, [p[2:] for p in prefixes], 4, pad_token_id=PAD)
    expected = verbatim_scores(shifted, suffixes)["strict"].double().mean().item()
    assert result[2]["strict"] == expected
    with pytest.raises(ValueError, match="shift=8 must be smaller than the shortest prefix length 8"):
        shifted_prefix_recall(model, prefixes, suffixes, shifts=(0, 8), pad_token_id=PAD)
    with pytest.raises(ValueError, match="suffixes must all have the same length"):
        shifted_prefix_recall(model, prefixes, [[1, 2], [1, 2], [1]], pad_token_id=PAD)
