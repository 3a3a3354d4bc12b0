"""Verbatim memorization of causal language models: greedy suffix recall, its scores, perplexity, nDCG@k.

Protocol (paper: "Understanding memorization via loss curvature"; HUBBLE). A training sequence is split into
a prefix ``P`` (``|P| = 64``) and the suffix ``S`` that follows it (``|S| = 48``; 8 for quotes). The model
decodes ``|S|`` tokens greedily after ``P`` and the output is compared with ``S`` token by token:

* ``strict``: the whole suffix is reproduced exactly;
* ``distance``: token-level Levenshtein distance over ``|S|`` (0 identical, 1 maximally different; both
  sequences have ``|S|`` tokens, so this is the normalized distance); ``similarity = 1 - distance``;
* ``loose``: ``similarity >= 0.75``;
* ``exact_tokens``: how many leading suffix tokens are reproduced exactly (HUBBLE's exact-match length).

Batching. Prompts of different lengths are LEFT-padded (the generated tokens then line up at the right
end) with an attention mask and explicit ``position_ids = cumsum(mask) - 1``, so every real token sees the
positions it would see unpadded (GPT-2 would otherwise number the padding; rotary models would shift).
Batches are formed in length order to keep padding small; results come back in the input order.

Guard for nDCG@k. The paper's code ranks the edited model's next tokens against a top-10 reference that
can silently come from the edited model itself, which always gives 1.0. Here the reference is a
:class:`TopKReference`, built only by :meth:`TopKReference.from_model` from the UNEDITED model and carrying
a content hash of its weights; :func:`ndcg_against_reference` refuses anything else and never computes a
reference from the model it scores.

``rapidfuzz`` (the ``lm`` extra) is imported when scores are computed, so importing ``memcurve.metrics``
does not need it.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.text import Perplexity

__all__ = [
    "HeldOutPerplexity",
    "TopKReference",
    "VerbatimMemorization",
    "greedy_generate",
    "mine_memorized",
    "ndcg_against_reference",
    "ndcg_at_k",
    "shifted_prefix_recall",
    "suffix_log_likelihood",
    "token_log_probs",
    "verbatim_scores",
    "weights_fingerprint",
]

TokenSequences = Tensor | Sequence[Sequence[int] | Tensor]

SCORE_KEYS = ("strict", "loose", "distance", "similarity", "exact_tokens")


# --------------------------------------------------------------------------- validation and batching helpers
def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _check_token_id(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer token id")


def _check_threshold(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"loose_threshold={value!r} must be a number in [0, 1]")


def _as_token_lists(name: str, sequences: TokenSequences) -> list[list[int]]:
    """Token sequences as lists of non-negative ints; a 2-D integer tensor is read row by row."""
    if isinstance(sequences, Tensor):
        if sequences.dim() != 2 or sequences.dtype.is_floating_point or sequences.dtype.is_complex:
            raise ValueError(
                f"{name} must be an integer tensor [N, L] or a list of token-id lists; "
                f"got a {sequences.dtype} tensor of shape {tuple(sequences.shape)}"
            )
        rows = sequences.tolist()
    elif isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
        raise TypeError(f"{name} must be an integer tensor [N, L] or a list of token-id lists; got {sequences!r:.80}")
    else:
        rows = []
        for i, item in enumerate(sequences):
            if isinstance(item, Tensor):
                if item.dim() != 1:
                    raise ValueError(f"{name}[{i}] must be a 1-D tensor of token ids; got shape {tuple(item.shape)}")
                item = item.tolist()
            try:
                rows.append([operator.index(token) for token in item])
            except TypeError as error:
                raise ValueError(f"{name}[{i}] must be a sequence of integer token ids; got {item!r:.80}") from error
    if not rows:
        raise ValueError(f"{name} is empty; give at least one token sequence")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"{name}[{i}] is empty; every sequence needs at least one token")
        if min(row) < 0:
            raise ValueError(f"{name}[{i}] holds the negative token id {min(row)}; token ids must be >= 0")
    return rows


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) without gradients; the previous train/eval mode is restored, also after an error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _length_sorted_batches(sequences: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first), so left padding stays small."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, L]``, real tokens right-aligned."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, length - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def _position_ids(mask: Tensor) -> Tensor:
    """Positions of real tokens counted from each sequence's first real token (padding gets 0)."""
    return (mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def _forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    *,
    keep: int | None = None,
    past_key_values: Any = None,
    use_cache: bool = False,
) -> tuple[Tensor, Any]:
    """Logits (only the last ``keep`` positions when given) and the KV cache of a HF causal LM.

    The cache is the ``Cache`` object (``DynamicCache``) the model returns, passed back as it is, never a legacy
    tuple. Its keyword and output field are ``cache`` where the model's ``forward`` takes that (newer transformers,
    which deprecate the old name) and ``past_key_values`` otherwise, so neither version warns.
    """
    parameters = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": use_cache,
    }
    if past_key_values is not None:
        kwargs[cache_name] = past_key_values
    # logits_to_keep avoids the [B, L, V] logits of the whole prompt (V ~ 100k for OLMo-2)
    if keep is not None and "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = keep
    output = model(**kwargs)
    logits = output.logits
    if keep is not None and logits.shape[1] > keep:
        logits = logits[:, -keep:]
    return logits, (getattr(output, cache_name) if use_cache else None)


# --------------------------------------------------------------------------- greedy decoding
def _greedy_batch(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy argmax over the full vocabulary, KV-cached, exactly ``max_new_tokens`` steps (EOS is a token)."""
    batch = input_ids.shape[0]
    positions = _position_ids(attention_mask)
    logits, cache = _forward(model, input_ids, attention_mask, positions, keep=1, use_cache=True)
    tokens = input_ids.new_empty(batch, max_new_tokens)
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(dim=-1)
        tokens[:, step] = next_token
        if step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = _forward(
            model, next_token[:, None], attention_mask, positions, keep=1, past_key_values=cache, use_cache=True
        )
    return tokens


def greedy_generate(
    model: nn.Module,
    prefixes: TokenSequences,
    max_new_tokens: int,
    *,
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Greedy continuations ``[N, max_new_tokens]`` (int64, CPU) of token-id prefixes, batched and KV-cached.

    Exactly ``max_new_tokens`` tokens per prefix: decoding never stops at EOS and never suppresses it (argmax
    over the whole vocabulary), because recall is scored position by position against a fixed-length suffix.
    This is a hand-written loop rather than ``model.generate``: ``generate`` merges the model's own
    ``generation_config.eos_token_id`` into a config passed with ``eos_token_id=None`` and stops at EOS.
    ``prefixes`` is a list of token-id lists (any lengths) or an integer tensor ``[N, L]``; ``pad_token_id``
    only fills the masked padding. Inputs go to ``device`` (default: the model's); the model is not moved.
    Runs without gradients in eval mode and restores the model's previous mode.
    """
    _check_positive_int("max_new_tokens", max_new_tokens)
    _check_positive_int("batch_size", batch_size)
    _check_token_id("pad_token_id", pad_token_id)
    sequences = _as_token_lists("prefixes", prefixes)
    device = _model_device(model, device)
    generated = torch.empty(len(sequences), max_new_tokens, dtype=torch.long)
    with _inference(model):
        for index in _length_sorted_batches(sequences, batch_size):
            ids, mask = _left_pad([sequences[i] for i in index], pad_token_id, device)
            generated[index] = _greedy_batch(model, ids, mask, max_new_tokens).cpu()
    return generated


# --------------------------------------------------------------------------- per-example scores
def _check_generated_and_targets(generated: Tensor, targets: Tensor) -> None:
    for name, tensor in (("generated", generated), ("targets", targets)):
        if not isinstance(tensor, Tensor) or tensor.dim() != 2 or tensor.dtype.is_floating_point:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be an integer tensor [N, suffix_length]; got {shape}")
    if generated.shape != targets.shape:
        raise ValueError(
            f"generated has shape {tuple(generated.shape)} but targets has {tuple(targets.shape)}; "
            "they must match ([N, suffix_length])"
        )
    if targets.shape[1] < 1:
        raise ValueError(f"suffix_length={targets.shape[1]} must be a positive integer")


def verbatim_scores(generated: Tensor, targets: Tensor, loose_threshold: float = 0.75) -> dict[str, Tensor]:
    """Per-example recall scores of greedy continuations ``generated`` against the true suffixes ``targets``.

    Both ``[N, S]``. Returns ``strict`` (bool, exact match), ``distance`` (float64, token Levenshtein distance
    over ``S``, the paper's normalisation), ``similarity`` (``1 - distance``), ``loose`` (bool, ``similarity >=
    loose_threshold``, compared in edit counts so 36/48 is exactly 0.75) and ``exact_tokens`` (int64, number
    of leading suffix tokens matched exactly, HUBBLE's exact-match length).
    """
    _check_generated_and_targets(generated, targets)
    _check_threshold(loose_threshold)
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cpdist

    generated = generated.detach().long().cpu()
    targets = targets.detach().long().cpu()
    count, length = targets.shape
    if count:
        edits = torch.as_tensor(cpdist(generated.tolist(), targets.tolist(), scorer=Levenshtein.distance))
        edits = edits.to(torch.int64).reshape(count)
    else:
        edits = torch.zeros(0, dtype=torch.int64)
    distance = edits.double() / length
    exact_tokens = (generated == targets).long().cumprod(dim=1).sum(dim=1)
    return {
        "strict": exact_tokens == length,
        "loose": (length - edits).double() >= loose_threshold * length,
        "distance": distance,
        "similarity": 1.0 - distance,
        "exact_tokens": exact_tokens,
    }


def _summary(sums: Tensor, count: Tensor) -> dict[str, float]:
    """Means of the summed scores (NaN over no example: 0 would read as "nothing memorized")."""
    n = int(count)
    means = (sums / n).tolist() if n else [math.nan] * len(SCORE_KEYS)
    strict, loose, distance, similarity, exact_tokens = means
    return {
        "strict": strict,
        "loose": loose,
        "avg_levenshtein": distance,
        "avg_similarity": similarity,
        "exact_tokens": exact_tokens,
        "count": float(n),
    }


class VerbatimMemorization(Metric):
    """Streaming :func:`verbatim_scores`, overall and per group (e.g. canary duplicate level 0/1/4/16/64).

    ``compute()`` returns floats: ``strict``, ``loose``, ``avg_levenshtein`` (mean normalized distance, the
    paper's convention), ``avg_similarity``, ``exact_tokens`` (mean), ``count``, and ``g<value>/<same keys>``
    for every group that has examples. States are fixed-size sums (one row per entry of ``group_values``)
    reduced with ``sum``, so sharded evaluation without padding gives the single-process numbers.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, group_values: Sequence[int] | None = None, loose_threshold: float = 0.75, **kwargs: Any):
        super().__init__(**kwargs)
        _check_threshold(loose_threshold)
        values = [] if group_values is None else list(group_values)
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"group_values={values!r} must hold integers; {value!r} is not one")
        if len(set(values)) != len(values):
            raise ValueError(f"group_values={values!r} holds duplicates; list each group once")
        self.loose_threshold = float(loose_threshold)
        self.group_values = tuple(values)
        self.add_state("sums", default=torch.zeros(len(SCORE_KEYS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if self.group_values:
            shape = (len(self.group_values), len(SCORE_KEYS))
            self.add_state("group_sums", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                "group_count", default=torch.zeros(len(self.group_values), dtype=torch.long), dist_reduce_fx="sum"
            )

    def _group_slots(self, groups: Tensor, count: int) -> Tensor:
        if not self.group_values:
            raise ValueError("groups were given but this metric was built without group_values; list the group ids")
        if not isinstance(groups, Tensor) or groups.shape != (count,) or groups.dtype.is_floating_point:
            shape = tuple(groups.shape) if isinstance(groups, Tensor) else type(groups).__name__
            raise ValueError(
                f"groups must be an integer tensor [N] with N={count} (one group per example); got {shape}"
            )
        groups = groups.detach().long().cpu()
        match = groups[:, None] == torch.tensor(self.group_values, dtype=torch.long)[None, :]
        known = match.any(dim=1)
        if not bool(known.all()):
            unknown = sorted(set(groups[~known].tolist()))
            raise ValueError(f"groups holds {unknown}, which are not in group_values={list(self.group_values)}")
        return match.long().argmax(dim=1)

    def update(self, generated: Tensor, targets: Tensor, groups: Tensor | None = None) -> None:
        scores = verbatim_scores(generated, targets, self.loose_threshold)
        rows = torch.stack([scores[key].to(torch.float64) for key in SCORE_KEYS], dim=1)
        count = rows.shape[0]
        if groups is None and self.group_values:
            raise ValueError(
                f"groups=None but this metric tracks group_values={list(self.group_values)}; "
                "pass each example's group so the per-group counts add up to the total"
            )
        slots = None if groups is None else self._group_slots(groups, count)
        rows = rows.to(self.sums.device)
        self.sums += rows.sum(dim=0)
        self.count += count
        if slots is not None:
            slots = slots.to(self.group_sums.device)
            self.group_sums.index_add_(0, slots, rows)
            self.group_count.index_add_(0, slots, torch.ones_like(slots))

    def compute(self) -> dict[str, float]:
        result = _summary(self.sums, self.count)
        for i, value in enumerate(self.group_values):
            if int(self.group_count[i]) > 0:
                for key, number in _summary(self.group_sums[i], self.group_count[i]).items():
                    result[f"g{value}/{key}"] = number
        return result


# --------------------------------------------------------------------------- likelihoods
def token_log_probs(
    model: nn.Module,
    prefixes: TokenSequences,
    suffixes: TokenSequences,
    *,
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """``log p(suffix_t | prefix, suffix_<t)`` of every suffix token: one float64 CPU tensor ``[len(suffix)]`` per
    item, in input order, by teacher forcing on ``prefix + suffix`` (left-padded batches of similar length; only the
    logits of the last ``max |suffix| + 1`` positions are materialised). Eval mode without gradients; the model's
    mode is restored. Prefixes need at least one token (the first suffix token is predicted from it)."""
    _check_positive_int("batch_size", batch_size)
    _check_token_id("pad_token_id", pad_token_id)
    prefix_lists = _as_token_lists("prefixes", prefixes)
    suffix_lists = _as_token_lists("suffixes", suffixes)
    if len(prefix_lists) != len(suffix_lists):
        raise ValueError(f"got {len(prefix_lists)} prefixes but {len(suffix_lists)} suffixes; give one suffix each")
    full = [p + s for p, s in zip(prefix_lists, suffix_lists)]
    device = _model_device(model, device)
    result: list[Tensor | None] = [None] * len(full)
    with _inference(model):
        for index in _length_sorted_batches(full, batch_size):
            ids, mask = _left_pad([full[i] for i in index], pad_token_id, device)
            span = max(len(suffix_lists[i]) for i in index)
            logits, _ = _forward(model, ids, mask, _position_ids(mask), keep=span + 1)
            logits = logits[:, :-1]  # position t predicts token t + 1: these predict the last `span` tokens
            dtype = torch.promote_types(logits.dtype, torch.float32)
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).to(dtype), ids[:, -span:].reshape(-1), reduction="none"
            ).reshape(len(index), span)
            rows = (-nll).double().cpu()
            for row, i in enumerate(index):
                result[i] = rows[row, span - len(suffix_lists[i]) :].clone()
    return result  # type: ignore[return-value]


def suffix_log_likelihood(
    model: nn.Module,
    prefixes: TokenSequences,
    suffixes: TokenSequences,
    *,
    pad_token_id: int,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Mean per-token log-probability ``[N]`` (float64) of each true suffix given its prefix (HUBBLE's
    normalized log-likelihood): the per-item mean of :func:`token_log_probs` (batched, left-padded teacher forcing;
    suffixes may differ in length, each is averaged over its own tokens)."""
    log_probs = token_log_probs(
        model, prefixes, suffixes, pad_token_id=pad_token_id, batch_size=batch_size, device=device
    )
    return torch.tensor([float(values.mean()) for values in log_probs], dtype=torch.float64)


class HeldOutPerplexity(Perplexity):
    """Token-weighted perplexity of a causal LM on held-out text: ``exp(Σ NLL / Σ predicted tokens)`` over
    ALL batches seen — not the mean of per-batch perplexities, which would overweight short batches.

    ``update(logits [B, T, V], input_ids [B, T], attention_mask [B, T] | None)`` does the causal shift itself:
    position ``t`` predicts token ``t + 1``, the last position is dropped, and a prediction counts only when
    both tokens are real (``mask[t] & mask[t + 1]``), so padding — left or right — is excluded and a
    left-padded sequence's first token (predicted from padding) is not scored. Keeps torchmetrics'
    ``Perplexity`` states and ``compute`` but reads NLL from ``cross_entropy`` (log-softmax) instead of
    ``log(softmax)``, which underflows to ``inf`` for very unlikely tokens, and sums in float64 with an int64
    token count (a float32 count stops being exact after 2**24 tokens). States are summed across processes.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(ignore_index=None, **kwargs)
        self.add_state("total_log_probs", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> None:  # type: ignore[override]
        if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"logits must be a float tensor [batch, seq_len, vocab]; got {shape}")
        if not isinstance(input_ids, Tensor) or tuple(input_ids.shape) != tuple(logits.shape[:2]):
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(
                f"input_ids must have shape {tuple(logits.shape[:2])} (logits' [batch, seq_len]); got {shape}"
            )
        if attention_mask is None:
            valid = torch.ones(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.bool, device=input_ids.device)
        else:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"attention_mask must have shape {tuple(input_ids.shape)} like input_ids; "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(device=input_ids.device, dtype=torch.bool)
            valid = mask[:, :-1] & mask[:, 1:]
        dtype = torch.promote_types(logits.dtype, torch.float32)
        nll = F.cross_entropy(
            logits[:, :-1][valid].to(dtype), input_ids[:, 1:][valid].long().to(logits.device), reduction="sum"
        )
        self.total_log_probs += nll.to(torch.float64)
        self.count += valid.sum().to(self.count.device)


# --------------------------------------------------------------------------- nDCG@k against an unedited reference
def ndcg_at_k(scores: Tensor, reference_topk: Tensor) -> Tensor:
    """nDCG@k ``[...]`` (float64) of the ranking ``scores [..., V]`` against a reference top-k ``[..., k]``.

    Relevance is graded by reference rank (rank 1 → k, rank 2 → k-1, …, rank k → 1, other tokens 0); DCG sums
    ``relevance / log2(rank + 1)`` over the top-k of ``scores`` (descending; ties in the order ``torch.topk``
    returns) with linear gains (as ``sklearn.metrics.ndcg_score``) and is divided by the reference's own DCG.
    1 for the reference's ordering, 0 when no reference token is in the top-k. Vectorized over positions.
    """
    if not isinstance(scores, Tensor) or scores.dim() < 1 or not scores.is_floating_point():
        raise ValueError("scores must be a float tensor [..., vocab]")
    if not isinstance(reference_topk, Tensor) or reference_topk.dim() < 1 or reference_topk.is_floating_point():
        raise ValueError("reference_topk must be an integer tensor [..., k]")
    if reference_topk.shape[:-1] != scores.shape[:-1]:
        raise ValueError(
            f"reference_topk has shape {tuple(reference_topk.shape)} and scores {tuple(scores.shape)}; "
            "they must agree on every dimension but the last ([..., k] vs [..., vocab])"
        )
    k, vocab = reference_topk.shape[-1], scores.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} (reference_topk's last dimension) must be in [1, vocab={vocab}]")
    reference_topk = reference_topk.to(device=scores.device, dtype=torch.long)
    if reference_topk.numel() and (int(reference_topk.min()) < 0 or int(reference_topk.max()) >= vocab):
        raise ValueError(f"reference_topk holds token ids outside [0, {vocab}) (the vocabulary of scores)")
    ordered = reference_topk.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("reference_topk repeats a token id within a position; a top-k list has k distinct ids")
    ranked = scores.topk(k, dim=-1).indices  # [..., k], descending
    gains = torch.arange(k, 0, -1, dtype=torch.float64, device=scores.device)  # reference rank r → k - r + 1
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=scores.device))
    match = ranked[..., :, None] == reference_topk[..., None, :]  # [..., k ranked, k reference]
    relevance = (match.to(torch.float64) * gains).sum(dim=-1)
    return (relevance * discount).sum(dim=-1) / (gains * discount).sum()


def weights_fingerprint(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> str:
    """Content hash (blake2b-256 hex) of a model's weights: every tensor of its ``state_dict()`` (parameters
    and persistent buffers) — or of a given state dict — in sorted-name order, over name, dtype, shape and
    raw bytes. Unlike ``memcurve.curvature.model_fingerprint`` (names and shapes) it changes with any edit.

    Cost: every byte is read once (copied to the host for GPU tensors) and hashed at roughly 1 GB/s on one
    core — milliseconds for test models, a few seconds for a 1B-parameter model in float32.
    """
    if isinstance(model_or_state_dict, nn.Module):
        tensors = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        tensors = model_or_state_dict
    else:
        raise TypeError(f"weights_fingerprint needs an nn.Module or a state dict, not {type(model_or_state_dict)}")
    digest = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _unpack_batch(batch: Any, index: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` from a dict (``input_ids``/``attention_mask``), a tuple or a tensor."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"batches[{index}] has no 'input_ids' (keys: {list(batch)})")
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    elif isinstance(batch, Tensor):
        ids, mask = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        ids, mask = batch[0], (batch[1] if len(batch) == 2 else None)
    else:
        raise ValueError(
            f"batches[{index}] must be input_ids [B, T], (input_ids, attention_mask) or a dict with those keys; "
            f"got {type(batch).__name__}"
        )
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise ValueError(f"batches[{index}]: input_ids must be an integer tensor [B, T]")
    if mask is None:
        mask = torch.ones_like(ids)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"batches[{index}]: attention_mask must have the shape {tuple(ids.shape)} of input_ids; got {shape}"
        )
    return ids.long(), mask.long()


def _batch_digest(ids: Tensor, mask: Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (ids, mask):
        digest.update(tensor.detach().cpu().long().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _position_logits(model: nn.Module, ids: Tensor, mask: Tensor, device: torch.device) -> Tensor:
    """Next-token logits ``[n, V]`` at the batch's real positions (row-major order)."""
    ids, mask = ids.to(device), mask.to(device)
    logits, _ = _forward(model, ids, mask, _position_ids(mask))
    return logits[mask.bool()]


_FROM_MODEL = object()  # only TopKReference.from_model holds it: no reference can be assembled by hand


@dataclass(frozen=True, eq=False)  # tensors inside: identity, not elementwise ==
class TopKReference:
    """Cached next-token top-k of the UNEDITED model on fixed batches, for :func:`ndcg_against_reference`.

    Built only by :meth:`from_model`; direct construction raises. ``topk_ids[b]`` is ``[n_b, k]`` (top-k token
    ids, descending, at the real positions of batch ``b`` in row-major order), ``position_masks[b]`` the
    boolean ``[B, T]`` of those positions, ``input_digests[b]`` a hash of the batch's ids and mask (scoring
    other data is refused) and ``weights_fingerprint`` the reference model's :func:`weights_fingerprint`.
    """

    k: int
    weights_fingerprint: str
    topk_ids: tuple[Tensor, ...]
    position_masks: tuple[Tensor, ...]
    input_digests: tuple[str, ...]
    _origin: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._origin is not _FROM_MODEL:
            raise ValueError(
                "TopKReference is built only by TopKReference.from_model(unedited_model, batches, k=...), "
                "so that it always holds the reference model's own top-k and weights fingerprint"
            )

    @property
    def num_positions(self) -> int:
        """Number of scored positions over all batches."""
        return sum(int(ids.shape[0]) for ids in self.topk_ids)

    @property
    def batch_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(B, T)`` of every batch, in order."""
        return tuple((int(m.shape[0]), int(m.shape[1])) for m in self.position_masks)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        batches: Iterable[Any],
        k: int = 10,
        fingerprint: str | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> TopKReference:
        """Top-k of ``model`` (the unedited reference) at every real position of ``batches``.

        ``batches``: ``input_ids [B, T]``, ``(input_ids, attention_mask)`` or dicts with those keys; keep them
        (same order) to score edited models. ``fingerprint``, when given, is the expected
        :func:`weights_fingerprint` of the unedited model (e.g. recorded when its checkpoint was saved):
        a model with other weights is refused, which catches building the reference from an edited model.
        """
        _check_positive_int("k", k)
        actual = weights_fingerprint(model)
        if fingerprint is not None and fingerprint != actual:
            raise ValueError(
                f"fingerprint={fingerprint!r} does not match the model's weights_fingerprint {actual!r}: "
                "the reference must be built from the unedited model whose fingerprint was recorded"
            )
        device = _model_device(model, device)
        topk_ids, masks, digests = [], [], []
        with _inference(model):
            for index, batch in enumerate(batches):
                ids, mask = _unpack_batch(batch, index)
                logits = _position_logits(model, ids, mask, device)
                if k > logits.shape[-1]:
                    raise ValueError(f"k={k} exceeds the vocabulary size {logits.shape[-1]}")
                topk_ids.append(logits.topk(k, dim=-1).indices.cpu())
                masks.append(mask.bool().cpu())
                digests.append(_batch_digest(ids, mask))
        if not topk_ids:
            raise ValueError("batches is empty; the reference needs at least one batch")
        if sum(int(t.shape[0]) for t in topk_ids) == 0:
            raise ValueError("batches have no real position (every attention_mask entry is 0)")
        return cls(k, actual, tuple(topk_ids), tuple(masks), tuple(digests), _FROM_MODEL)


def ndcg_against_reference(
    model: nn.Module,
    reference: TopKReference,
    batches: Iterable[Any],
    *,
    device: torch.device | str | None = None,
) -> float:
    """Mean nDCG@k of ``model``'s next-token ranking against the unedited model's cached top-k, over every
    real position of ``batches`` (the batches the reference was built from, same order, same content).

    The reference is never computed from ``model`` — that is the paper code's bug (the edited model as its
    own reference always scores 1.0): ``reference=None`` or anything but a :class:`TopKReference` is refused.
    When ``model``'s :func:`weights_fingerprint` equals the reference's it is the reference model and the
    result is exactly 1.0 (after checking the batches, without a forward pass).
    """
    if reference is None:
        raise ValueError(
            "reference=None: build the reference once from the UNEDITED model with "
            "TopKReference.from_model(unedited_model, batches); it is never computed from the model being "
            "scored, which would compare the model with itself and always give 1.0"
        )
    if not isinstance(reference, TopKReference):  # ValueError by contract, like reference=None
        raise ValueError(  # noqa: TRY004
            f"reference must be a TopKReference built by TopKReference.from_model from the unedited model, "
            f"not a {type(reference).__name__}"
        )
    same_weights = weights_fingerprint(model) == reference.weights_fingerprint
    device = _model_device(model, device)
    shapes = reference.batch_shapes
    total = torch.zeros((), dtype=torch.float64)
    seen = 0
    with _inference(model):
        for index, batch in enumerate(batches):
            ids, mask = _unpack_batch(batch, index)
            if index >= len(shapes):
                raise ValueError(f"got more batches than the {len(shapes)} the reference was built from")
            if tuple(ids.shape) != shapes[index]:
                raise ValueError(
                    f"batches[{index}] has shape {tuple(ids.shape)} but the reference was built from a batch of "
                    f"shape {shapes[index]}; score the batches the reference was built from, in the same order"
                )
            if _batch_digest(ids, mask) != reference.input_digests[index]:
                raise ValueError(
                    f"batches[{index}] holds other tokens or another attention_mask than the batch the reference "
                    "was built from; score the same batches, in the same order"
                )
            seen += 1
            if same_weights:
                continue
            logits = _position_logits(model, ids, mask, device)
            total += ndcg_at_k(logits, reference.topk_ids[index].to(logits.device)).sum().cpu()
    if seen != len(shapes):
        raise ValueError(f"got {seen} batches but the reference was built from {len(shapes)}")
    if same_weights:
        return 1.0
    return float(total / reference.num_positions)


# --------------------------------------------------------------------------- mining and stress tests
def mine_memorized(
    model: nn.Module,
    sequences: TokenSequences,
    prefix_length: int,
    suffix_length: int,
    *,
    pad_token_id: int,
    loose_threshold: float = 0.75,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Which training sequences ``model`` recalls verbatim: prefix = first ``prefix_length`` tokens, suffix =
    the next ``suffix_length`` (longer sequences are cut). Returns :func:`verbatim_scores` per sequence
    (``strict`` and ``loose`` boolean masks, ``distance``, ``similarity``, ``exact_tokens``) and ``generated``.
    """
    _check_positive_int("prefix_length", prefix_length)
    _check_positive_int("suffix_length", suffix_length)
    rows = _as_token_lists("sequences", sequences)
    needed = prefix_length + suffix_length
    short = [i for i, row in enumerate(rows) if len(row) < needed]
    if short:
        first = short[0]
        raise ValueError(
            f"prefix_length={prefix_length} + suffix_length={suffix_length} exceeds the sequence length "
            f"{len(rows[first])} of sequences[{first}] ({len(short)} of {len(rows)} sequences are shorter "
            f"than {needed} tokens)"
        )
    targets = torch.tensor([row[prefix_length:needed] for row in rows], dtype=torch.long)
    generated = greedy_generate(
        model,
        [row[:prefix_length] for row in rows],
        suffix_length,
        pad_token_id=pad_token_id,
        batch_size=batch_size,
        device=device,
    )
    return {**verbatim_scores(generated, targets, loose_threshold), "generated": generated}


def shifted_prefix_recall(
    model: nn.Module,
    prefixes: TokenSequences,
    suffixes: TokenSequences,
    shifts: Sequence[int] = (0, 1, 2, 4),
    *,
    pad_token_id: int,
    loose_threshold: float = 0.75,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[int, dict[str, float]]:
    """Recall when the prompt window starts ``k`` tokens later (the first ``k`` prefix tokens dropped, the
    suffix unchanged), for each ``k`` in ``shifts``: ``{k: {"strict", "loose", "avg_similarity"}}``.

    Memorization that survives only the exact training window is brittle; recall that survives shifts is not.
    """
    prefix_lists = _as_token_lists("prefixes", prefixes)
    suffix_lists = _as_token_lists("suffixes", suffixes)
    if len(prefix_lists) != len(suffix_lists):
        raise ValueError(f"got {len(prefix_lists)} prefixes but {len(suffix_lists)} suffixes; give one suffix each")
    lengths = sorted({len(s) for s in suffix_lists})
    if len(lengths) != 1:
        raise ValueError(f"suffixes must all have the same length to be scored token by token; got lengths {lengths}")
    shifts = list(shifts)
    if not shifts:
        raise ValueError("shifts is empty; give at least one shift (0 is the unshifted prefix)")
    for shift in shifts:
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"shifts={shifts!r} must hold non-negative integers; {shift!r} is not one")
    shortest = min(len(p) for p in prefix_lists)
    too_large = [shift for shift in shifts if shift >= shortest]
    if too_large:
        raise ValueError(
            f"shift={too_large[0]} must be smaller than the shortest prefix length {shortest}: the shift drops "
            "that many leading prefix tokens and must leave at least one"
        )
    targets = torch.tensor(suffix_lists, dtype=torch.long)
    result: dict[int, dict[str, float]] = {}
    for shift in dict.fromkeys(shifts):
        generated = greedy_generate(
            model,
            [p[shift:] for p in prefix_lists],
            lengths[0],
            pad_token_id=pad_token_id,
            batch_size=batch_size,
            device=device,
        )
        scores = verbatim_scores(generated, targets, loose_threshold)
        result[shift] = {
            "strict": scores["strict"].double().mean().item(),
            "loose": scores["loose"].double().mean().item(),
            "avg_similarity": scores["similarity"].mean().item(),
        }
    return result
