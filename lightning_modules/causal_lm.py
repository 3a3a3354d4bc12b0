"""CausalLMModule: any Hugging Face causal LM (OLMo-2 first; Llama- and GPT-2-style too) as a LightningModule.

It trains with the next-token loss (padding masked), validates with loss and token-weighted perplexity, and
measures verbatim memorization of the planted canaries of a :class:`~memcurve.data.CanaryTextDataModule`
(greedy suffix from a prefix: strict / loose recall, Levenshtein, exact-match tokens, per duplicate level), and,
when the DataModule plants a perturbation suite, what the model knows of each skill (``skills_metrics``: passage
recall, closed-book fact QA, held-out arithmetic and reasoning, membership inference per category and level).
The K-FAC, probe and pruning callbacks reach its MLP projections by name patterns relative to this module,
e.g. ``model.model.layers.*.mlp.gate_proj`` (OLMo-2, Llama) — the HF model is the attribute ``model``.

The model is given as a hub id or local folder (``AutoModelForCausalLM.from_pretrained``), or as a config
dict with ``model_type`` (``AutoConfig.for_model``; a tiny OLMo-2 trained from scratch for the embedded demo).

nDCG@k measures how well an edited model keeps the UNEDITED model's top-k next tokens on held-out text. The
reference top-k is computed once from the unedited weights and cached with their content hash: the pruning
callbacks pass the original checkpoint's weights as ``reference_state_dict``; without it the weights seen at
the first evaluation are the reference, and later (edited) weights never replace it — so an edited model is
never its own reference (which would report 1.0). ``reset_reference()`` forgets it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from memcurve.adapters import FisherAdapter, ProbeAdapter
from memcurve.data.perturbations import exact_answers, fraction
from memcurve.lightning_modules.noisy_label_classifier import warmup_cosine_factor
from memcurve.metrics.unlearning import forget_quality, membership_aurocs, privacy_leakage, sequence_scores
from memcurve.metrics.verbatim import (
    HeldOutPerplexity,
    TopKReference,
    VerbatimMemorization,
    greedy_generate,
    mine_memorized,
    ndcg_against_reference,
    shifted_prefix_recall,
    suffix_log_likelihood,
    verbatim_scores,
    weights_fingerprint,
)
from memcurve.utils.arguments import check_choice, check_positive_int
from memcurve.utils.distributed import rank_and_world
from memcurve.utils.sampling import unpadded_shard_sampler
from memcurve.utils.sharding import fully_shard_blocks, parameters_sharded

__all__ = ["CanaryProbeAdapter", "CausalLMFisherAdapter", "CausalLMModule", "build_causal_lm"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORIZED_SETS = ("levels", "mined")
MIA_MIN_K = 0.4  # Min-K% of the membership scores: MUSE's choice for its privacy leakage
# Columns of the before/after pruning table: (metric key, short header).
REPORT_METRICS = (
    ("mem/strict", "strict"),
    ("mem/loose", "loose"),
    ("mem/avg_levenshtein", "avg Lev"),
    ("control/strict", "ctrl strict"),
    ("val/perplexity", "ppl"),
    ("val/ndcg@10", "nDCG@10"),
    ("mia/mem/auroc_mink", "MIA AUROC"),
    ("oracle/forget_quality", "forget quality"),
    ("oracle/privleak", "PrivLeak"),
)


def build_causal_lm(
    model: str | Mapping[str, Any],
    dtype: str = "float32",
    revision: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A ``transformers`` causal LM from a hub id, a local folder, or a config dict with ``model_type``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_choice("dtype", dtype, tuple(DTYPES))
    if isinstance(model, Mapping):
        settings = dict(model)
        model_type = settings.pop("model_type", None)
        if not model_type:
            raise ValueError(f"model={dict(model)!r}: a config dict needs 'model_type' (e.g. 'olmo2', 'llama', 'gpt2')")
        try:
            config = AutoConfig.for_model(model_type, **settings)
        except ValueError as error:
            raise ValueError(f"model: model_type={model_type!r} is not a transformers model type ({error})") from error
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    if not isinstance(model, str) or not model:
        raise TypeError(f"model={model!r} must be a hub id, a local folder or a config dict with 'model_type'")
    local = Path(model).expanduser()
    if model.startswith((".", "/", "~")) and not local.exists():
        raise FileNotFoundError(f"model={model!r}: no such local folder")
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(local) if local.exists() else model,
            dtype=DTYPES[dtype],
            revision=revision,
            gguf_file=gguf_file,
            trust_remote_code=trust_remote_code,
        )
    except OSError as error:
        raise OSError(
            f"model={model!r} is neither a local model folder nor a hub id that can be loaded here "
            f"(offline machines need a local path): {error}"
        ) from error


# -- adapters: how the K-FAC pass and the band probe read LM batches ---------------------------------------
@dataclass
class CausalLMFisherAdapter(FisherAdapter):
    """Next-token prediction: logits ``[B, T, V]``; position t predicts token t+1, so the last position of each
    sequence carries no loss (``KFACFactors(drop_last_position=True)`` drops it from A and G too). Sampled
    Fisher targets are drawn from the model's own next-token distribution at every position."""

    drop_last_position: ClassVar[bool] = True
    input_key: str = "input_ids"
    mask_key: str = "attention_mask"
    index_key: str | None = "index"

    def _mask(self, batch: Any) -> Tensor:
        ids = batch[self.input_key]
        mask = batch.get(self.mask_key) if isinstance(batch, Mapping) else None
        return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        return model(batch[self.input_key], self._mask(batch).long())

    def labels(self, batch: Any) -> Tensor:
        ids = batch[self.input_key]
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:].masked_fill(~self._mask(batch)[:, 1:], -100)
        return labels

    def example_index(self, batch: Any) -> Tensor | None:
        if self.index_key is None or not isinstance(batch, Mapping) or self.index_key not in batch:
            return None
        return batch[self.index_key]

    def position_mask(self, batch: Any) -> Tensor | None:
        return self._mask(batch)

    def loss_mask(self, batch: Any) -> Tensor | None:
        mask = self._mask(batch)
        has_next = torch.zeros_like(mask)
        has_next[:, :-1] = mask[:, :-1] & mask[:, 1:]
        return has_next


class _SequenceDataset(Dataset):
    """Right-padded token sequences with a per-example group value (e.g. the canary's duplicate level)."""

    def __init__(self, sequences: Sequence[Sequence[int]], values: Tensor, pad_token_id: int) -> None:
        length = max(len(s) for s in sequences)
        self.input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
        self.attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            self.input_ids[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
            self.attention_mask[row, : len(sequence)] = 1
        self.values = values

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "value": self.values[i],
            "row": i,
        }


@dataclass
class CanaryProbeAdapter(ProbeAdapter):
    """Band probe groups for canary LMs: ``memorized`` canaries, never-seen ``control`` canaries (level 0, not
    memorized) — each fed as prefix + suffix, padding masked — and held-out ``val`` blocks.

    Memorized means duplicate level >= ``memorized_min_level``, or, with a ``module`` (a
    :class:`CausalLMModule`), whatever its ``memorized_canaries`` says (e.g. mined from the unedited model)."""

    groups: ClassVar[tuple[str, ...]] = ("memorized", "control", "val")
    contrast: ClassVar[tuple[str, str] | None] = ("memorized", "control")
    memorized_min_level: int = 16
    batch_size: int = 32
    module: Any = None
    _memorized: Tensor | None = None

    def passes(self, trainer: pl.Trainer, groups: Sequence[str]) -> list[tuple[str, DataLoader]]:
        datamodule = trainer.datamodule
        if datamodule is None or not callable(getattr(datamodule, "canary_examples", None)):
            raise ValueError(
                "CanaryProbeAdapter needs a datamodule with canary_examples() (memcurve.data.CanaryTextDataModule)"
            )
        out = []
        if "memorized" in groups or "control" in groups:
            dataset = canary_dataset(datamodule)
            if self.module is not None:
                self._memorized = self.module.memorized_canaries(datamodule).cpu()
            else:
                self._memorized = dataset.values >= self.memorized_min_level
            sampler = unpadded_shard_sampler(dataset, trainer)
            out.append(("canaries", DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)))
        if "val" in groups:
            out.append(("val", datamodule.evaluation_dataloader("val", shard=True)))
        return out

    def forward(self, model: nn.Module, batch: Any) -> None:
        model(batch["input_ids"], batch["attention_mask"])

    def batch_groups(self, pass_name: str, batch: Any) -> dict[str, Tensor]:
        if pass_name == "val":
            return {"val": torch.ones(len(batch["input_ids"]), dtype=torch.bool)}
        memorized = self._memorized.to(batch["row"].device)[batch["row"]]
        return {"memorized": memorized, "control": (batch["value"] == 0) & ~memorized}

    def position_mask(self, batch: Any) -> Tensor | None:
        return batch["attention_mask"].bool()


def membership_by_group(
    prefix: str, scores: Mapping[str, Tensor], groups: Sequence[tuple[str, Tensor]], controls: Tensor
) -> dict[str, float]:
    """Membership inference of item groups (HUBBLE): for each ``(name, mask)`` with items, the loss and Min-K%
    AUROCs of the masked items against the ``controls`` (``{prefix}{name}/auroc_loss|auroc_mink``; not for the
    controls themselves, nor without any) and their mean normalized log-likelihood (``{prefix}{name}/nll``), from
    :func:`~memcurve.metrics.sequence_scores` ``scores`` of every item."""
    out: dict[str, float] = {}
    for name, mask in groups:
        if not mask.any():
            continue
        if controls.any() and not torch.equal(mask, controls):
            members = {key: value[mask] for key, value in scores.items()}
            others = {key: value[controls] for key, value in scores.items()}
            for kind, value in membership_aurocs(members, others).items():
                out[f"{prefix}{name}/auroc_{'mink' if kind == 'min_k' else kind}"] = value
        out[f"{prefix}{name}/nll"] = float(scores["normalized_log_likelihood"][mask].mean())
    return out


def _has_suite(datamodule: Any) -> bool:
    """Whether the DataModule plants a perturbation suite (``CanaryTextDataModule(perturbations=...)``)."""
    return getattr(datamodule, "perturbations", None) is not None and callable(
        getattr(datamodule, "perturbation_examples", None)
    )


def canary_dataset(datamodule: Any) -> _SequenceDataset:
    """Each canary as ``prefix + suffix`` (the prompt and its true continuation), valued by its duplicate level."""
    examples = datamodule.canary_examples()
    sequences = [list(p) + s.tolist() for p, s in zip(examples["prefixes"], examples["suffixes"])]
    return _SequenceDataset(sequences, examples["levels"], datamodule.pad_token_id)


class _FunctionalModel(nn.Module):
    """``model`` evaluated with other weights (``torch.func.functional_call``), without copying the model.

    Its ``state_dict()`` and ``parameters()`` are those weights, so metric code that fingerprints or locates
    "the model" sees the reference weights, not the live ones."""

    def __init__(self, model: nn.Module, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.inner = [model]  # a list: not registered as a submodule
        self.weights = dict(weights)

        # Callers that read the forward signature (which cache keyword it takes) must see the model's own one.
        @functools.wraps(model.forward)
        def forward(**kwargs: Any) -> Any:
            # The weights hold every tied name (GPT-2's wte / lm_head) with equal values: replace each one as given.
            return torch.func.functional_call(self.inner[0], self.weights, (), kwargs, strict=False, tie_weights=False)

        self.forward = forward

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        return dict(self.weights)

    def parameters(self, recurse: bool = True):
        return iter(self.weights.values())

    def train(self, mode: bool = True) -> _FunctionalModel:
        self.inner[0].train(mode)
        return super().train(mode)


class CausalLMModule(pl.LightningModule):
    """A Hugging Face causal LM, trained and evaluated for verbatim memorization of planted canaries.

    Args:
        model: hub id (``allenai/OLMo-2-0425-1B``), local folder, or config dict with ``model_type`` (e.g.
            ``{model_type: olmo2, hidden_size: 192, ...}``) to build an untrained model.
        dtype: parameter dtype, ``float32``, ``bfloat16`` or ``float16``.
        revision / gguf_file / trust_remote_code: passed to ``from_pretrained``.
        lr / weight_decay / betas: AdamW.
        warmup_fraction: linear warm-up over this fraction of the steps, then cosine decay to
            ``min_lr_ratio`` × lr (a one-cycle schedule).
        memorized_min_level: canaries inserted at least this often form the memorized set (``mem/``).
        memorized_set: ``levels`` (planted canaries of level >= memorized_min_level) or ``mined`` (the canaries
            the unedited reference model recites exactly — for pretrained models evaluated on famous quotes).
        loose_threshold: Levenshtein similarity for loose recall (paper: 0.75).
        generation_batch_size: prompts per batched greedy generation.
        ndcg_k: k of nDCG@k against the unedited model's top-k next tokens.
        ndcg_max_batches: validation batches used for nDCG (the reference is cached).
        recall_every_n_epochs: measure canary recall at the end of every n-th validation (0: never).
        prefix_shifts: the evaluation also scores the memorized canaries with the first k prompt tokens dropped
            (``shift/k<k>/strict``, ``.../loose``), for each k here (default [1, 2, 4]; the prompt's EOS is token
            0): does recall need the exact training window?
        oracle_checkpoint: a checkpoint of the never-trained oracle of this run (the same stream without the
            memorized set: ``CanaryTextDataModule(oracle_min_level=memorized_min_level)``); the evaluation then
            reports the distance to it (``oracle/...``, see :meth:`membership_metrics`). Read at the first
            evaluation; checked to exist in ``setup``.
    """

    report_metrics: ClassVar[tuple[tuple[str, str], ...]] = REPORT_METRICS

    def __init__(
        self,
        model: str | dict[str, Any],
        dtype: str = "float32",
        revision: str | None = None,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_fraction: float = 0.1,
        min_lr_ratio: float = 0.1,
        memorized_min_level: int = 16,
        memorized_set: str = "levels",
        loose_threshold: float = 0.75,
        generation_batch_size: int = 64,
        ndcg_k: int = 10,
        ndcg_max_batches: int = 8,
        recall_every_n_epochs: int = 1,
        prefix_shifts: list[int] | None = None,
        oracle_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        check_choice("dtype", dtype, tuple(DTYPES))
        check_choice("memorized_set", memorized_set, MEMORIZED_SETS)
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr={lr!r} must be a positive number")
        if not (isinstance(warmup_fraction, (int, float)) and 0 <= warmup_fraction < 1):
            raise ValueError(f"warmup_fraction={warmup_fraction!r} must be in [0, 1)")
        if not (isinstance(loose_threshold, (int, float)) and 0 < loose_threshold <= 1):
            raise ValueError(f"loose_threshold={loose_threshold!r} must be in (0, 1]")
        if not isinstance(memorized_min_level, int) or memorized_min_level < 1:
            raise ValueError(f"memorized_min_level={memorized_min_level!r} must be an integer >= 1")
        check_positive_int("generation_batch_size", generation_batch_size)
        check_positive_int("ndcg_k", ndcg_k)
        check_positive_int("ndcg_max_batches", ndcg_max_batches)
        if not isinstance(recall_every_n_epochs, int) or recall_every_n_epochs < 0:
            raise ValueError(f"recall_every_n_epochs={recall_every_n_epochs!r} must be an integer >= 0")
        shifts = [1, 2, 4] if prefix_shifts is None else list(prefix_shifts)
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shifts):
            raise ValueError(f"prefix_shifts={prefix_shifts!r} must be a list of integers >= 1")
        self.save_hyperparameters()
        self.prefix_shifts = shifts
        self.model = build_causal_lm(model, dtype, revision, gguf_file, trust_remote_code)
        self.val_perplexity = HeldOutPerplexity()
        self._reference: TopKReference | None = None
        self._reference_state: dict[str, Tensor] | None = None  # unedited weights of the reference
        self._reference_key: str | None = None  # their weights_fingerprint
        self._mined: tuple[str, Tensor] | None = None  # (reference fingerprint, memorized canary mask)
        self._oracle_state: dict[str, Tensor] | None = None  # the never-trained oracle's weights (set_oracle)
        self._oracle_scores: dict[str, Tensor] | None = None  # its per-canary scores, computed once

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy`` (which lends a device mesh): each decoder layer is sharded,
        then the whole model (:func:`~memcurve.utils.sharding.fully_shard_blocks`). Any other strategy, or a model
        sharded by an earlier call (Lightning calls this hook at every fit / validate): nothing."""
        mesh = self.device_mesh
        if mesh is None or parameters_sharded(self.model):
            return
        fully_shard_blocks(self.model, mesh["data_parallel"] if mesh.mesh_dim_names else mesh)

    # -- eager checks against the data ---------------------------------------------------------------
    def setup(self, stage: str) -> None:
        oracle = self.hparams.get("oracle_checkpoint")
        if oracle is not None and not Path(oracle).is_file():
            raise FileNotFoundError(
                f"oracle_checkpoint={oracle!r} is not a file; train the oracle first (CanaryTextDataModule("
                "oracle_min_level=...), configs/protocol/olmo2_tiny_canaries_oracle.yaml) or pass None"
            )
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.check_compatible(datamodule)

    def check_compatible(self, datamodule: Any) -> None:
        """Raise a clear error when the tokenizer's vocabulary does not fit the model's embedding."""
        if callable(getattr(datamodule, "setup", None)) and getattr(datamodule, "tokenizer", None) is None:
            datamodule.setup("fit")
        vocab = getattr(datamodule, "vocab_size", None)
        rows = self.model.get_input_embeddings().num_embeddings
        if vocab is not None and vocab > rows:
            raise ValueError(
                f"the tokenizer has {vocab} tokens but the model's embedding has {rows} rows "
                f"(model vocab_size={self.model.config.vocab_size}); use the model's own tokenizer or set "
                "vocab_size in the model config to at least the tokenizer's size"
            )
        for name in ("prefix_length", "suffix_length"):
            value = getattr(datamodule, name, None)
            limit = getattr(self.model.config, "max_position_embeddings", None)
            if value is not None and limit is not None and value > limit:
                raise ValueError(f"data {name}={value} exceeds the model's max_position_embeddings={limit}")

    # -- adapters for the curvature callbacks ---------------------------------------------------------
    def fisher_adapter(self) -> CausalLMFisherAdapter:
        return CausalLMFisherAdapter()

    def probe_adapter(self) -> CanaryProbeAdapter:
        return CanaryProbeAdapter(memorized_min_level=self.hparams.memorized_min_level, module=self)

    # -- steps ---------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, T, V]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, int]:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        labels = CausalLMFisherAdapter().labels(batch)
        tokens = int((labels != -100).sum())
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return loss, logits, tokens

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _, tokens = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=tokens)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, logits, tokens = self._loss(batch)
        self.val_perplexity.update(logits, batch["input_ids"], batch.get("attention_mask"))
        self.log("val/loss", loss, on_epoch=True, batch_size=tokens, sync_dist=True)
        self.log("val/perplexity", self.val_perplexity, on_epoch=True, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Greedy next token at every position."""
        return self(batch["input_ids"], batch.get("attention_mask")).argmax(dim=-1)

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.recall_every_n_epochs
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.trainer.sanity_checking or not every or datamodule is None:
            return
        last_epoch = self.trainer.max_epochs is not None and self.current_epoch + 1 >= self.trainer.max_epochs
        if (self.current_epoch + 1) % every and not last_epoch:
            return
        if callable(getattr(datamodule, "canary_examples", None)):
            for key, value in self.canary_recall(datamodule, shard=True).items():
                self.log(key, value, on_epoch=True, prog_bar=key == "mem/strict", rank_zero_only=False)
        if _has_suite(datamodule):  # the skill curves (generation only; membership inference in evaluation_metrics)
            for key, value in self.skills_metrics(datamodule, membership=False).items():
                self.log(key, value, on_epoch=True, rank_zero_only=False)

    # -- memorization measurements ------------------------------------------------------------------
    @torch.no_grad()
    def canary_recall(
        self, datamodule: Any, shard: bool = False, scores: Mapping[str, Tensor] | None = None
    ) -> dict[str, float]:
        """Verbatim recall of the canaries: memorized set (``mem/``), controls (``control/``: never planted and not
        in the memorized set), every level (``canary/dup<L>/``). With ``shard`` each rank generates for its share
        and the sums are all-reduced. ``scores``: the canaries' :meth:`_canary_scores` of the current weights, when
        already computed (their normalized log-likelihood is the ``suffix_loglik``)."""
        examples = datamodule.canary_examples()
        levels = examples["levels"]
        suffixes = examples["suffixes"]
        rank, world = rank_and_world() if shard else (0, 1)
        rows = torch.arange(rank, len(levels), world)
        prefixes = [examples["prefixes"][i] for i in rows.tolist()]
        pad = datamodule.pad_token_id
        generated = greedy_generate(
            self.model,
            prefixes,
            suffixes.shape[1],
            pad_token_id=pad,
            batch_size=self.hparams.generation_batch_size,
            device=self.device,
        ).cpu()
        memorized = self.memorized_canaries(datamodule, examples)[rows]
        # Controls: the never-planted canaries, less any the reference recites (memorized_set="mined" may mine them).
        controls = (levels[rows] == 0) & ~memorized
        level_values = sorted(set(datamodule.duplicate_levels))
        # Unsharded evaluation runs on one process while the others wait: its metrics must not sync.
        settings = {"loose_threshold": self.hparams.loose_threshold, "sync_on_compute": world > 1}
        by_level = VerbatimMemorization(group_values=level_values, **settings)
        by_level.update(generated, suffixes[rows], levels[rows])
        sets = VerbatimMemorization(group_values=[0, 1, 2], **settings)  # other, memorized, control
        sets.update(generated, suffixes[rows], memorized.long() + 2 * controls.long())
        if scores is not None:
            loglik = scores["normalized_log_likelihood"][rows]
        else:
            loglik = suffix_log_likelihood(
                self.model, prefixes, suffixes[rows], pad_token_id=pad, batch_size=self.hparams.generation_batch_size
            ).cpu()
        sums = torch.tensor(
            [
                float(loglik[memorized].sum()),
                float(memorized.sum()),
                float(loglik[controls].sum()),
                float(controls.sum()),
            ],
            dtype=torch.float64,
        )
        if world > 1:
            by_level, sets = by_level.to(self.device), sets.to(self.device)
            sums = sums.to(self.device)
            dist.all_reduce(sums)
        level_stats = by_level.compute()
        set_stats = sets.compute()
        out: dict[str, float] = {}
        for key in ("strict", "loose", "avg_levenshtein", "avg_similarity", "exact_tokens"):
            out[f"mem/{key}"] = float(set_stats.get(f"g1/{key}", math.nan))
        out["mem/count"] = float(set_stats.get("g1/count", 0.0))
        out["mem/suffix_loglik"] = float(sums[0] / sums[1]) if sums[1] else math.nan
        if 0 in level_values:
            for key in ("strict", "loose", "avg_similarity"):
                out[f"control/{key}"] = float(set_stats.get(f"g2/{key}", math.nan))
            out["control/count"] = float(set_stats.get("g2/count", 0.0))
        out["control/suffix_loglik"] = float(sums[2] / sums[3]) if sums[3] else math.nan
        for level in level_values:
            for key in ("strict", "loose"):
                out[f"canary/dup{level}/{key}"] = float(level_stats.get(f"g{level}/{key}", math.nan))
        return out

    def memorized_canaries(self, datamodule: Any, examples: Mapping[str, Any] | None = None) -> Tensor:
        """Boolean ``[N]``: which canaries form the memorized set (``memorized_set``: by duplicate level, or mined
        once from the unedited reference weights — the canaries it recites exactly — and cached)."""
        examples = examples if examples is not None else datamodule.canary_examples()
        pad = datamodule.pad_token_id
        levels = examples["levels"]
        if self.hparams.memorized_set == "levels":
            return levels >= self.hparams.memorized_min_level
        reference = self._reference_weights()
        key = self._reference_key
        if self._mined is None or self._mined[0] != key:
            sequences = [list(p) + s.tolist() for p, s in zip(examples["prefixes"], examples["suffixes"])]
            prefix_length = len(examples["prefixes"][0])
            mined = mine_memorized(
                _FunctionalModel(self.model, reference),
                torch.tensor(sequences),
                prefix_length,
                examples["suffixes"].shape[1],
                pad_token_id=pad,
                loose_threshold=self.hparams.loose_threshold,
                batch_size=self.hparams.generation_batch_size,
            )
            self._mined = (key, mined["strict"].cpu())
        return self._mined[1]

    def _reference_weights(self) -> dict[str, Tensor]:
        if self._reference_state is None:  # first evaluation: the current weights are the unedited reference
            self._reference_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self._reference_key = weights_fingerprint(self._reference_state)
        return self._reference_state

    def set_reference(self, state_dict: Mapping[str, Tensor]) -> None:
        """Use these (unedited) weights — a LightningModule state dict — as the reference of nDCG and mining."""
        weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        if not weights:
            raise ValueError("set_reference: the state dict has no 'model.*' entries of a CausalLMModule")
        key = weights_fingerprint(weights)
        if key != self._reference_key:
            self._reference_state, self._reference_key = weights, key
            self._reference = None

    def reset_reference(self) -> None:
        """Forget the cached reference: the next evaluation's weights become the unedited reference."""
        self._reference_state = None
        self._reference_key = None
        self._reference = None
        self._mined = None

    @torch.no_grad()
    def ndcg(self, datamodule: Any) -> float:
        """nDCG@k of the current weights against the cached top-k of the unedited reference weights."""
        batches = []
        for i, batch in enumerate(datamodule.evaluation_dataloader("val", shard=False)):
            if i >= self.hparams.ndcg_max_batches:
                break
            batches.append(move_data_to_device(batch, self.device))
        reference_weights = self._reference_weights()
        if self._reference is None:
            self._reference = TopKReference.from_model(
                _FunctionalModel(self.model, reference_weights), batches, k=self.hparams.ndcg_k
            )
        return ndcg_against_reference(self.model, self._reference, batches)

    @torch.no_grad()
    def shifted_recall(self, datamodule: Any) -> dict[str, float]:
        """Recall of the memorized canaries with the first k prompt tokens dropped, for k in ``prefix_shifts``."""
        examples = datamodule.canary_examples()
        memorized = self.memorized_canaries(datamodule, examples)
        shortest = min(len(p) for p in examples["prefixes"])
        shifts = [k for k in self.prefix_shifts if k < shortest]
        if not shifts or not memorized.any():
            return {}
        rows = memorized.nonzero().flatten().tolist()
        results = shifted_prefix_recall(
            self.model,
            [examples["prefixes"][i] for i in rows],
            examples["suffixes"][rows],
            shifts,
            pad_token_id=datamodule.pad_token_id,
            loose_threshold=self.hparams.loose_threshold,
            batch_size=self.hparams.generation_batch_size,
        )
        return {f"shift/k{k}/{key}": results[k][key] for k in shifts for key in ("strict", "loose")}

    def set_oracle(self, state_dict: Mapping[str, Tensor] | None) -> None:
        """Use these weights — a LightningModule state dict of the never-trained oracle — as the reference of the
        ``oracle/`` metrics (None: no oracle)."""
        if state_dict is None:
            self._oracle_state = self._oracle_scores = None
            return
        weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        if not weights:
            raise ValueError("set_oracle: the state dict has no 'model.*' entries of a CausalLMModule")
        self._oracle_state, self._oracle_scores = weights, None

    def _oracle_weights(self) -> dict[str, Tensor] | None:
        path = self.hparams.get("oracle_checkpoint")
        if self._oracle_state is None and path is not None:
            self.set_oracle(torch.load(path, map_location="cpu", weights_only=False)["state_dict"])
        return self._oracle_state

    def _canary_scores(self, model: nn.Module, examples: Mapping[str, Any], pad_token_id: int) -> dict[str, Tensor]:
        return sequence_scores(
            model,
            examples["prefixes"],
            examples["suffixes"],
            pad_token_id=pad_token_id,
            k=MIA_MIN_K,
            batch_size=self.hparams.generation_batch_size,
            device=self.device,
        )

    @torch.no_grad()
    def membership_metrics(self, datamodule: Any, scores: Mapping[str, Tensor] | None = None) -> dict[str, float]:
        """Membership inference (HUBBLE, MUSE): how well each canary's suffix likelihood tells planted canaries from
        the never-seen controls (level 0), as AUROCs of −loss (``auroc_loss``) and of Min-40% probability
        (``auroc_mink``): per duplicate level (``mia/dup<L>/``) and for the memorized set (``mia/mem/``); 0.5 is
        chance, 1 a perfect attack. The normalized log-likelihood of each level is ``mia/dup<L>/nll`` (mean
        −loss).

        With an oracle (``oracle_checkpoint`` or :meth:`set_oracle`), the memorized set against the oracle's
        scores of the same canaries: ``oracle/forget_quality`` (TOFU: the KS test's p-value between the per-canary
        losses; high = indistinguishable), ``oracle/ks`` (its statistic), ``oracle/privleak`` (MUSE's privacy
        leakage of the Min-40% AUROC: 0 = as private as the oracle, < 0 under-, > 0 over-unlearning) and
        ``oracle/auroc_mink`` (the oracle's own AUROC). Empty without controls."""
        examples = datamodule.canary_examples()
        levels = examples["levels"]
        controls = levels == 0
        if not controls.any():
            return {}
        pad = datamodule.pad_token_id
        if scores is None:
            scores = self._canary_scores(self.model, examples, pad)
        members = self.memorized_canaries(datamodule, examples) & ~controls
        groups = [(f"dup{level}", levels == level) for level in sorted(set(levels.tolist()) - {0})]
        out = membership_by_group("mia/", scores, [*groups, ("mem", members)], controls)
        oracle = self._oracle_weights()
        if oracle is None or not members.any():
            return out
        if self._oracle_scores is None:
            self._oracle_scores = self._canary_scores(_FunctionalModel(self.model, oracle), examples, pad)
        reference = self._oracle_scores
        quality = forget_quality(scores["loss"][members], reference["loss"][members])
        oracle_auroc = membership_aurocs(
            {k: v[members] for k, v in reference.items()}, {k: v[controls] for k, v in reference.items()}
        )["min_k"]
        out["oracle/forget_quality"] = quality.pvalue
        out["oracle/ks"] = quality.statistic
        out["oracle/auroc_mink"] = oracle_auroc
        method_auroc = out["mia/mem/auroc_mink"]
        if oracle_auroc < 1.0:
            out["oracle/privleak"] = privacy_leakage(method_auroc, oracle_auroc)
        else:  # MUSE's ratio is 0/0 when both separate perfectly (as private as the oracle), undefined otherwise
            out["oracle/privleak"] = 0.0 if method_auroc == oracle_auroc else math.nan
        return out

    @torch.no_grad()
    def skills_metrics(self, datamodule: Any, membership: bool = True) -> dict[str, float]:
        """What the model knows of each category of the DataModule's perturbation suite
        (``CanaryTextDataModule(perturbations=...)``; empty without one), by greedy generation (batched, exactly the
        answer's length; an answer counts only when every token matches):

        * ``skill/passages/dup<L>/strict`` / ``loose``: recall of a passage's next ``passage_suffix_length`` tokens
          after its first ``passage_prefix_length`` (loose: Levenshtein similarity >= ``loose_threshold``);
        * ``skill/facts/dup<L>/qa``: closed-book answers to questions never trained on (the answer and an EOS);
          ``skill/facts/dup<L>/cloze``: the attribute after the biography's own words up to it;
        * ``skill/arithmetic/train`` / ``heldout`` and ``skill/reasoning/train`` / ``heldout``: the answer and an EOS
          after the question (training instances: the first ``eval_train_instances``);

        and with ``membership`` (HUBBLE's metrics, per category against that category's controls: never-seen facts
        and passages of level 0, held-out arithmetic / reasoning instances, whose training instances sit at level
        ``*_copies``): ``mia/<category>/dup<L>/auroc_loss`` and ``auroc_mink`` (as :meth:`membership_metrics`, from
        each whole item's likelihood after an EOS) and ``mia/<category>/dup<L>/nll``, the mean normalized
        log-likelihood (level 0 included). Levels with no item give no key. Every process computes everything
        (unsharded)."""
        if not _has_suite(datamodule):
            return {}
        probes = datamodule.perturbation_examples()
        pad = datamodule.pad_token_id
        batch_size = self.hparams.generation_batch_size
        out: dict[str, float] = {}
        for name, probe in probes.items():
            category, kind = name.split("/")
            levels = probe.levels
            if kind == "text":
                if not membership:
                    continue
                scores = sequence_scores(
                    self.model,
                    probe.prompts,
                    probe.answers,
                    pad_token_id=pad,
                    k=MIA_MIN_K,
                    batch_size=batch_size,
                    device=self.device,
                )
                groups = [(f"dup{level}", levels == level) for level in sorted(set(levels.tolist()))]
                out |= membership_by_group(f"mia/{category}/", scores, groups, levels == 0)
                continue
            length = max(len(answer) for answer in probe.answers)
            generated = greedy_generate(
                self.model, probe.prompts, length, pad_token_id=pad, batch_size=batch_size, device=self.device
            ).cpu()
            if kind == "recall":  # passages: fixed-length suffixes
                scores = verbatim_scores(generated, torch.tensor(probe.answers), self.hparams.loose_threshold)
                for level in sorted(set(levels.tolist())):
                    for key in ("strict", "loose"):
                        out[f"skill/{category}/dup{level}/{key}"] = fraction(scores[key][levels == level])
                continue
            correct = exact_answers(generated, probe.answers)
            if kind == "answer":  # arithmetic, reasoning: training instances (level >= 1) and held-out ones (0)
                out[f"skill/{category}/train"] = fraction(correct[levels > 0])
                out[f"skill/{category}/heldout"] = fraction(correct[levels == 0])
            else:  # facts: qa, cloze
                for level in sorted(set(levels.tolist())):
                    out[f"skill/{category}/dup{level}/{kind}"] = fraction(correct[levels == level])
        return {key: out[key] for key in sorted(out)}

    @torch.no_grad()
    def evaluation_metrics(
        self, datamodule: Any, shard: bool = False, reference_state_dict: Mapping[str, Tensor] | None = None
    ) -> dict[str, float]:
        """Canary recall, held-out perplexity, nDCG@k and membership inference of the current weights (the pruning
        report's figures), with the distance to the never-trained oracle when there is one, and the skills of the
        perturbation suite when the DataModule plants one (:meth:`skills_metrics`).

        ``reference_state_dict``: the unedited weights for nDCG (and ``memorized_set="mined"``); default: the
        reference cached so far, else the current weights."""
        if reference_state_dict is not None:
            self.set_reference(reference_state_dict)
        was_training = self.training
        self.eval()
        try:
            # One teacher-forcing pass over the canaries serves recall's log-likelihood and membership inference.
            scores = self._canary_scores(self.model, datamodule.canary_examples(), datamodule.pad_token_id)
            metrics = self.canary_recall(datamodule, shard=shard, scores=scores)
            perplexity = HeldOutPerplexity(sync_on_compute=shard).to(self.device)
            for batch in datamodule.evaluation_dataloader("val", shard=shard):
                batch = move_data_to_device(batch, self.device)
                perplexity.update(
                    self(batch["input_ids"], batch["attention_mask"]), batch["input_ids"], batch["attention_mask"]
                )
            metrics["val/perplexity"] = float(perplexity.compute())
            metrics |= self.shifted_recall(datamodule)
            metrics[f"val/ndcg@{self.hparams.ndcg_k}"] = self.ndcg(datamodule)
            metrics |= self.membership_metrics(datamodule, scores=scores)
            metrics |= self.skills_metrics(datamodule)
        finally:
            self.train(was_training)
        return metrics

    # -- BalancedSubnet baseline (memcurve.callbacks.BalancedSubnetPruning) ---------------------------------
    def balanced_subnet_data(
        self,
        datamodule: Any,
        batch_size: int,
        max_forget: int | None = None,
        max_retain: int | None = None,
        seed: int = 0,
        retain_length: int = 64,
    ) -> tuple[DataLoader, DataLoader]:
        """``(forget, retain)`` loaders of BalancedSubnet: the memorized canaries (prefix + suffix, see
        ``memorized_canaries``) and ``max_retain`` (default 512) random windows of background training text
        (``retain_length`` tokens, at most a block) that touch no canary; shuffled by a ``seed``-ed generator."""
        dataset = canary_dataset(datamodule)
        memorized = self.memorized_canaries(datamodule).nonzero().flatten()
        if len(memorized) == 0:
            raise ValueError(
                "no canary is memorized (memorized_set="
                f"{self.hparams.memorized_set!r}, memorized_min_level={self.hparams.memorized_min_level}): "
                "BalancedSubnet needs a forget set"
            )
        generator = torch.Generator().manual_seed(seed)
        if max_forget is not None and max_forget < len(memorized):
            memorized = memorized[torch.randperm(len(memorized), generator=generator)[:max_forget]].sort().values
        length = min(retain_length, datamodule.block_size)
        windows = datamodule.training_windows(max_retain or 512, length, seed=seed)
        levels = torch.zeros(len(windows), dtype=torch.long)
        retain = _SequenceDataset(windows.tolist(), levels, datamodule.pad_token_id)
        loaders = []
        for data in (torch.utils.data.Subset(dataset, memorized.tolist()), retain):
            order = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            loaders.append(DataLoader(data, batch_size=batch_size, shuffle=True, generator=order))
        return loaders[0], loaders[1]

    def balanced_subnet_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean next-token loss of a batch (padding excluded)."""
        loss, _, _ = self._loss(move_data_to_device(batch, self.device))
        return loss

    @staticmethod
    def report_tables(rows: Sequence[Any]) -> list[tuple[str, list[tuple[str, str]]]]:
        """Extra report tables (:func:`memcurve.editing.report_markdown`), unedited and after each edit of
        ``rows``: strict and loose canary recall per duplicate level; membership-inference AUROC (Min-40%) per
        category and duplicate level; the perturbation suite's skills (when the model was trained with one)."""
        keys = {key for row in rows for key in (*row.before, *row.after)}
        levels = sorted({int(key.split("/")[1][3:]) for key in keys if key.startswith("canary/dup")})
        columns = [
            (f"canary/dup{level}/{kind}", f"dup{level} {kind}") for kind in ("strict", "loose") for level in levels
        ]
        tables = [("canary recall per duplicate level", columns)] if columns else []
        membership = sorted(
            (key for key in keys if key.startswith("mia/") and key.endswith("/auroc_mink") and "/mem/" not in key),
            key=lambda key: (key.count("/"), key.split("/dup")[0], int(key.rsplit("/dup", 1)[1].split("/")[0])),
        )
        if membership:
            headers = [(key, key.removeprefix("mia/").removesuffix("/auroc_mink")) for key in membership]
            tables.append(("membership AUROC (Min-40%) against never-seen items, per duplicate level", headers))
        skills = sorted(key for key in keys if key.startswith("skill/"))
        if skills:
            tables.append(("skills (perturbation suite)", [(key, key.removeprefix("skill/")) for key in skills]))
        return tables

    # -- optimization --------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                (no_decay if parameter.dim() < 2 or "norm" in name else decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup_steps = round(hp.warmup_fraction * total_steps)

        def factor(step: int) -> float:
            return warmup_cosine_factor(step, warmup_steps, total_steps, hp.min_lr_ratio)

        rank_zero_info(f"memcurve: {total_steps} optimizer steps, {warmup_steps} of warm-up")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": "step"}}
