"""A timm image classifier trained on noisy labels, with memorization metrics.

Logs ``train/loss``, ``train/acc`` (against the labels it trains on, noisy ones included), ``val/loss``,
``val/acc`` and, after validation every ``memorization_eval_every_n_epochs`` epochs (always at the last epoch and
in ``trainer.validate``, never while sanity checking), ``mem/noised_acc``, ``mem/gt_recovery`` and
``mem/clean_train_acc`` from an eval-mode pass over the whole training set — the same pass, schedule and tags as
the :class:`~memcurve.callbacks.MemorizationEval` callback offers other modules
(:func:`memcurve.metrics.log_memorization`); do not add that callback to this module's runs.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import lightning.pytorch as pl
import timm
import timm.optim
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Subset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from memcurve.metrics.memorization import (
    check_memorization_datamodule,
    evaluate_memorization,
    log_memorization,
    memorization_due,
)
from memcurve.utils.sharding import fully_shard_blocks, parameters_sharded

__all__ = ["NoisyLabelClassifier", "warmup_cosine_factor"]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warmup from ~0 to 1, then cosine decay to ``min_lr_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _create_timm_model(model_name: str, num_classes: int, pretrained: bool, model_kwargs: dict[str, Any]):
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5)
        raise ValueError(
            f"model_name={model_name!r} is not a timm model; close matches: {close} (all names: timm.list_models())"
        )
    return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **model_kwargs)


def _patch_and_image_size(model: torch.nn.Module) -> tuple[tuple[int, int], tuple[int, int]] | None:
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "img_size", None) is None:
        return None
    return tuple(patch_embed.patch_size), tuple(patch_embed.img_size)


class NoisyLabelClassifier(pl.LightningModule):
    """Any timm model (a ViT by default) trained with AdamW, linear warmup and cosine decay.

    Args:
        model_name: a timm model name, e.g. ``vit_base_patch16_224`` (the paper) or ``vit_tiny_patch16_224``
            shrunk through ``model_kwargs`` (``img_size=8, patch_size=2, embed_dim=96, depth=6, num_heads=3``).
        num_classes: number of classes; must equal the data's.
        model_kwargs: keyword arguments for ``timm.create_model`` (``img_size``, ``in_chans``, ``patch_size``, ...).
        pretrained: load timm's pretrained weights (needs the hub; off by default and in tests).
        lr: peak learning rate.
        weight_decay: AdamW weight decay (paper recipe: 0.3); biases, norms and embeddings are exempt.
        betas: AdamW betas.
        warmup_epochs: linear warmup length in epochs (fractions allowed).
        min_lr_ratio: the cosine schedule ends at ``lr * min_lr_ratio``.
        label_smoothing: cross-entropy label smoothing (0 lets the model memorize noisy labels fully).
        memorization_eval_every_n_epochs: run the memorization pass over the training set every N
            validation epochs (and at the last epoch); 0 turns it off.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.3,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        min_lr_ratio: float = 0.0,
        label_smoothing: float = 0.0,
        memorization_eval_every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("warmup_epochs", warmup_epochs)):
            if not value >= 0:
                raise ValueError(f"{name}={value!r} must be >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={min_lr_ratio!r} must be in [0, 1]")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
        if not isinstance(memorization_eval_every_n_epochs, int) or memorization_eval_every_n_epochs < 0:
            raise ValueError(
                f"memorization_eval_every_n_epochs={memorization_eval_every_n_epochs!r} must be an integer >= 0"
            )
        self.save_hyperparameters()
        self.model_kwargs = dict(model_kwargs or {})
        self.model = _create_timm_model(model_name, num_classes, pretrained, self.model_kwargs)
        sizes = _patch_and_image_size(self.model)
        if sizes is not None:
            patch, image = sizes
            if image[0] % patch[0] or image[1] % patch[1]:
                raise ValueError(
                    f"model_kwargs img_size={image} is not divisible by patch_size={patch}; "
                    "choose an image size that is a multiple of the patch size"
                )
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_loss = MeanMetric()

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy`` (which lends a device mesh): each transformer block is
        sharded, then the whole model (:func:`~memcurve.utils.sharding.fully_shard_blocks`). Any other strategy, or a
        model sharded by an earlier call (Lightning calls this hook at every fit / validate): nothing."""
        mesh = self.device_mesh
        if mesh is None or parameters_sharded(self.model):
            return
        fully_shard_blocks(self.model, mesh["data_parallel"] if mesh.mesh_dim_names else mesh)

    # -- eager checks against the data ---------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        every_n = self.hparams.memorization_eval_every_n_epochs
        # validate() on given loaders (a held-out split, someone's own loader) scores them alone, without the mem/
        # pass; a fit, or a validate of a DataModule, without the memorized set is a mistake worth stopping.
        plain_validation = stage == "validate" and datamodule is None
        if every_n and stage in ("fit", "validate") and not plain_validation:
            check_memorization_datamodule(
                datamodule,
                f"NoisyLabelClassifier with memorization_eval_every_n_epochs={every_n}",
                hint="; set memorization_eval_every_n_epochs=0 to turn the mem/ pass off",
            )
        if datamodule is not None:
            self.check_compatible(datamodule)

    def check_compatible(self, datamodule: Any) -> None:
        """Raise a clear error when the data's classes, channels or image size do not fit the model."""
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"model num_classes={self.num_classes} does not match the data: source "
                f"{getattr(datamodule, 'source', '?')!r} has {data_classes} classes"
            )
        data_chans = getattr(datamodule, "in_chans", None)
        model_chans = self.model_kwargs.get("in_chans", 3)
        if data_chans is not None and data_chans != model_chans:
            raise ValueError(f"model_kwargs in_chans={model_chans} does not match the data's {data_chans} channel(s)")
        sizes = _patch_and_image_size(self.model)
        data_size = getattr(datamodule, "image_size", None)
        if sizes is not None and data_size is not None and tuple(sizes[1]) != (data_size, data_size):
            raise ValueError(
                f"model_kwargs img_size={sizes[1]} does not match the data's image size {data_size}; "
                "set data image_size or model_kwargs img_size so they agree"
            )

    # -- steps ---------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, batch["label"])
        batch_size = len(batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["image"])
        self.val_loss.update(F.cross_entropy(logits, batch["label"]), weight=len(batch["label"]))
        self.val_acc.update(logits, batch["label"])
        self.log("val/loss", self.val_loss, on_epoch=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["image"]).argmax(dim=-1)

    def on_validation_epoch_end(self) -> None:
        """The ``mem/`` pass over the training set, when due (:func:`memcurve.metrics.memorization_due`)."""
        every_n = self.hparams.memorization_eval_every_n_epochs
        datamodule = getattr(self.trainer, "datamodule", None)
        if not callable(getattr(datamodule, "memorization_dataloader", None)):
            return  # plain loaders (or a held-out split scored alone): no memorized set to measure
        if every_n and memorization_due(self.trainer, every_n):
            log_memorization(self, self.trainer)

    # -- evaluation outside the training loop (pruning reports) ---------------------------------------
    @torch.no_grad()
    def evaluation_metrics(self, datamodule: Any, shard: bool = False) -> dict[str, float]:
        """``val/acc`` and the ``mem/`` metrics of the current weights, in eval mode, on the datamodule's
        unaugmented validation and training sets (the numbers a before/after pruning report compares)."""
        was_training = self.training
        self.eval()
        try:
            # Unsharded (shard=False) means one process scores everything alone: no cross-rank sync.
            accuracy = MulticlassAccuracy(self.num_classes, average="micro", sync_on_compute=shard).to(self.device)
            for batch in datamodule.evaluation_dataloader("val", shard=shard):
                batch = move_data_to_device(batch, self.device)
                accuracy.update(self(batch["image"]), batch["label"])
            memorization = evaluate_memorization(
                self, datamodule.evaluation_dataloader("train", shard=shard), sync=shard
            )
        finally:
            self.train(was_training)
        return {
            "val/acc": float(accuracy.compute()),
            "mem/noised_acc": memorization["noised_acc"],
            "mem/gt_recovery": memorization["gt_recovery"],
            "mem/clean_train_acc": memorization["clean_train_acc"],
        }

    # -- BalancedSubnet baseline (memcurve.callbacks.BalancedSubnetPruning) ---------------------------------
    def balanced_subnet_data(
        self,
        datamodule: Any,
        batch_size: int,
        max_forget: int | None = None,
        max_retain: int | None = None,
        seed: int = 0,
    ) -> tuple[DataLoader, DataLoader]:
        """``(forget, retain)`` loaders of BalancedSubnet: the noised training examples with the (noisy) labels they
        were trained on, and the clean training examples; unaugmented, shuffled by a ``seed``-ed generator, each
        optionally limited to a random subset of ``max_forget`` / ``max_retain`` examples."""
        if getattr(datamodule, "train_eval_set", None) is None:
            raise RuntimeError("the datamodule must be set up (datamodule.setup('fit')) before BalancedSubnet")
        dataset = datamodule.train_eval_set
        noised = dataset.is_noised.nonzero().flatten()
        if len(noised) == 0:
            raise ValueError(
                "the training set has no noised examples (noise_fraction=0): BalancedSubnet needs a forget set"
            )
        generator = torch.Generator().manual_seed(seed)
        loaders = []
        for indices, limit in ((noised, max_forget), ((~dataset.is_noised).nonzero().flatten(), max_retain)):
            if limit is not None and limit < len(indices):
                indices = indices[torch.randperm(len(indices), generator=generator)[:limit]].sort().values
            loader_generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            subset = Subset(dataset, indices.tolist())
            loaders.append(
                DataLoader(
                    subset,
                    batch_size=batch_size,
                    shuffle=True,
                    generator=loader_generator,
                    num_workers=getattr(datamodule, "num_workers", 0),
                )
            )
        return loaders[0], loaders[1]

    def balanced_subnet_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy of a batch against the labels trained on (noisy ones for the forget set)."""
        batch = move_data_to_device(batch, self.device)
        return F.cross_entropy(self(batch["image"]), batch["label"])

    # -- optimization --------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        optimizer = timm.optim.create_optimizer_v2(
            self.model, opt="adamw", lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas)
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs
        steps_per_epoch = total_steps / max_epochs if max_epochs and max_epochs > 0 else total_steps
        warmup_steps = min(total_steps, round(hp.warmup_epochs * steps_per_epoch))

        def factor(step: int) -> float:
            return warmup_cosine_factor(step, warmup_steps, total_steps, hp.min_lr_ratio)

        scheduler = LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
