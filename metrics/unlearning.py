"""Unlearning metrics: per-item likelihood statistics of a causal LM, membership-inference AUROC, TOFU's forget
quality and MUSE's privacy leakage.

Per-item statistics (:func:`sequence_scores`). Each item is a token sequence ``suffix`` scored after its context
``prefix`` by teacher forcing (batched and left-padded exactly as :func:`~memcurve.metrics.suffix_log_likelihood`,
whose value is ``normalized_log_likelihood`` here). With ``log p_t`` the log-probability of the item's t-th token:

* ``loss``: mean negative log-likelihood ``−(1/n) Σ log p_t``;
* ``log_likelihood``: ``Σ log p_t``; ``normalized_log_likelihood``: ``(1/n) Σ log p_t`` (= −loss, HUBBLE's);
* ``min_k``: Min-K% Prob (Shi et al., 2024, "Detecting pretraining data from large language models"): the mean
  ``log p_t`` over the ``max(1, ⌊k·n⌋)`` least likely tokens (at least one token, as OpenUnlearning; Shi et al.'s
  and MUSE's code take ``⌊k·n⌋``, which is empty for short items). Shi et al. default to k = 0.2; MUSE's privacy
  leakage uses k = 0.4;
* ``tokens``: ``n``.

Membership inference (:func:`membership_auroc`). The AUROC of telling members from non-members by a score that is
*higher for members* (``-loss``, ``normalized_log_likelihood``, ``min_k``): 1 separates perfectly, 0.5 is chance,
tied scores count one half (torchmetrics' binary AUROC; ``sklearn.metrics.roc_auc_score`` up to torchmetrics'
float32 ROC curve, ~1e-7). The scores are replaced by their dense ranks scaled into [0, 1] before torchmetrics sees
them: it applies a sigmoid to predictions outside [0, 1], which would merge distinct large scores (a float64 sigmoid
rounds 40 and 50 to 1.0) into false ties.

Forget quality (:func:`forget_quality`; TOFU, Maini et al., 2024). The two-sample Kolmogorov–Smirnov test
(``scipy.stats.ks_2samp``, two-sided) between the per-item statistic of the edited model on the forget set and that
of the oracle — a model trained on the same stream without the forget set — on the same items. TOFU reports the
p-value: high means the edit is indistinguishable from never having trained on the items. TOFU computes it over the
truth ratio, which needs paraphrased and perturbed answers per item; memcurve's canaries (attributed quotes) have
none, so the truth ratio is not built and the statistic is the caller's choice (per-item loss or min-k).

Privacy leakage (:func:`privacy_leakage`; MUSE, Shi et al., 2025). MUSE defines
``PrivLeak = (AUC(f_unlearn) − AUC(f_retrain)) / AUC(f_retrain)`` with MUSE's AUC of the Min-40% score *ranking the
holdout (non-member) items as more likely than the forget items* — ``1 − a`` for the membership AUROC ``a`` above
(its code: ``roc_curve`` with label 0 = forget, 1 = holdout, score = −Min-k NLL). In membership AUROCs, therefore,
``PrivLeak = (a_oracle − a_method) / (1 − a_oracle)``: 0 when the edit is as private as the oracle, negative when the
forget items are still more recognisable than for the oracle (under-unlearning; the unedited target is near −1),
positive when they became *less* likely than never-seen items (over-unlearning). Returned as a fraction (MUSE's
tables print ×100).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc

from memcurve.metrics.verbatim import TokenSequences, token_log_probs

__all__ = [
    "ForgetQuality",
    "forget_quality",
    "membership_auroc",
    "membership_aurocs",
    "min_k_percent",
    "privacy_leakage",
    "sequence_scores",
]

# Membership scores (higher = more member-like) of membership_aurocs: name -> how to read it from sequence_scores.
MEMBERSHIP_SCORES = {"loss": lambda s: -s["loss"], "min_k": lambda s: s["min_k"]}


def _check_k(k: Any) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k <= 1.0:
        raise ValueError(f"k={k!r} must be a number in (0, 1]: the fraction of least likely tokens Min-K% averages")
    return float(k)


# --------------------------------------------------------------------------- per-item statistics
def min_k_percent(log_probs: Sequence[Tensor], k: float = 0.2) -> Tensor:
    """Min-K% Prob per item (float64 ``[N]``): the mean of the ``max(1, ⌊k·n⌋)`` smallest of each item's ``n`` token
    log-probabilities (see the module docstring). ``k`` in (0, 1]; k = 1 is the mean log-probability."""
    k = _check_k(k)
    if isinstance(log_probs, Tensor) or isinstance(log_probs, (str, bytes)) or not isinstance(log_probs, Sequence):
        raise TypeError("log_probs must be a list of 1-D tensors, one per item (token_log_probs' output)")
    if not log_probs:
        raise ValueError("log_probs is empty; give at least one item")
    out = torch.empty(len(log_probs), dtype=torch.float64)
    for i, values in enumerate(log_probs):
        if not isinstance(values, Tensor) or values.dim() != 1 or values.numel() == 0:
            raise ValueError(f"log_probs[{i}] must be a non-empty 1-D tensor of token log-probabilities")
        count = max(1, math.floor(k * values.numel()))
        out[i] = values.double().sort().values[:count].mean()
    return out


def sequence_scores(
    model: nn.Module,
    prefixes: TokenSequences,
    suffixes: TokenSequences,
    *,
    pad_token_id: int,
    k: float = 0.2,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Per-item statistics of each ``suffix`` after its ``prefix`` (float64 ``[N]``; ``tokens`` int64): ``loss``,
    ``log_likelihood``, ``normalized_log_likelihood``, ``min_k`` (Min-K% Prob with ``k``) and ``tokens``; see the
    module docstring."""
    k = _check_k(k)
    log_probs = token_log_probs(
        model, prefixes, suffixes, pad_token_id=pad_token_id, batch_size=batch_size, device=device
    )
    tokens = torch.tensor([len(values) for values in log_probs], dtype=torch.long)
    total = torch.stack([values.sum() for values in log_probs])
    mean = total / tokens
    return {
        "loss": -mean,
        "log_likelihood": total,
        "normalized_log_likelihood": mean,
        "min_k": min_k_percent(log_probs, k),
        "tokens": tokens,
    }


# --------------------------------------------------------------------------- membership inference
def _values(argument: str, values: Any) -> Tensor:
    """A non-empty 1-D float64 CPU tensor of finite numbers, or a one-line error naming ``argument``."""
    try:
        tensor = torch.as_tensor(values.detach().cpu() if isinstance(values, Tensor) else np.asarray(values))
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{argument} must be a 1-D sequence of numbers; got {values!r:.80}") from error
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{argument} must hold real numbers; got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"{argument} must be 1-D (one value per item); got shape {tuple(tensor.shape)}")
    if tensor.numel() == 0:
        raise ValueError(f"{argument} is empty; give at least one value")
    tensor = tensor.to(torch.float64)
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ValueError(
            f"{argument} holds {int(bad.sum())} non-finite values (NaN or inf; first at index {first}: "
            f"{float(tensor[first])}); every item needs a finite value"
        )
    return tensor


def membership_auroc(member_scores: Any, nonmember_scores: Any) -> float:
    """AUROC of separating members from non-members by a score that is higher for members (ties count one half);
    0.5 is chance. torchmetrics' binary AUROC on the scores' dense ranks (see the module docstring)."""
    members = _values("member_scores", member_scores)
    nonmembers = _values("nonmember_scores", nonmember_scores)
    scores = torch.cat([members, nonmembers])
    _, ranks = torch.unique(scores, sorted=True, return_inverse=True)
    top = int(ranks.max())
    preds = ranks.double() / top if top > 0 else torch.full_like(scores, 0.5)
    target = torch.cat([torch.ones(len(members), dtype=torch.long), torch.zeros(len(nonmembers), dtype=torch.long)])
    return float(binary_auroc(preds, target))


def membership_aurocs(member: dict[str, Tensor], nonmember: dict[str, Tensor]) -> dict[str, float]:
    """Loss-based and Min-K% membership AUROCs from two :func:`sequence_scores` results: ``{"loss": AUROC(−loss),
    "min_k": AUROC(min_k)}``."""
    for argument, scores in (("member", member), ("nonmember", nonmember)):
        missing = [key for key in ("loss", "min_k") if key not in scores]
        if missing:
            raise ValueError(f"{argument} lacks {missing}; pass sequence_scores(...) results")
    return {name: membership_auroc(read(member), read(nonmember)) for name, read in MEMBERSHIP_SCORES.items()}


# --------------------------------------------------------------------------- distance to the oracle
class ForgetQuality(NamedTuple):
    """TOFU's forget quality: the two-sample KS statistic and its p-value (reported as the forget quality)."""

    statistic: float
    pvalue: float


def forget_quality(method_values: Any, oracle_values: Any) -> ForgetQuality:
    """Two-sided two-sample Kolmogorov–Smirnov test (``scipy.stats.ks_2samp``) between the per-item statistic of the
    edited model (``method_values``) and the oracle's (``oracle_values``) on the same items; see the module
    docstring. NaN, inf and empty inputs are refused."""
    method = _values("method_values", method_values).numpy()
    oracle = _values("oracle_values", oracle_values).numpy()
    from scipy.stats import ks_2samp  # scipy comes with scikit-learn; imported here to keep `import memcurve` light

    result = ks_2samp(method, oracle)
    return ForgetQuality(float(result.statistic), float(result.pvalue))


def _check_auroc(argument: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{argument}={value!r} must be an AUROC, a number in [0, 1]")
    return float(value)


def privacy_leakage(method_auroc: float, oracle_auroc: float) -> float:
    """MUSE's PrivLeak from two membership AUROCs (:func:`membership_auroc` on the forget items vs held-out items):
    ``(oracle_auroc − method_auroc) / (1 − oracle_auroc)`` — MUSE's ``(AUC_unlearn − AUC_retrain) / AUC_retrain`` in
    MUSE's orientation (``AUC = 1 − membership AUROC``). 0: as private as the oracle; < 0: under-unlearning; > 0:
    over-unlearning. A fraction (×100 for MUSE's tables)."""
    method = _check_auroc("method_auroc", method_auroc)
    oracle = _check_auroc("oracle_auroc", oracle_auroc)
    if oracle == 1.0:
        raise ValueError(
            "oracle_auroc=1.0: the never-trained oracle separates the forget items from the held-out items perfectly, "
            "so MUSE's AUC of the oracle is 0 and PrivLeak is undefined; check the items (are they really unseen?)"
        )
    return (oracle - method) / (1.0 - oracle)
