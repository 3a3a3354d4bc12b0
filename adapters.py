"""The protocols between models and the analysis, and the defaults inferred from a batch.

Both sides import this module: the callbacks (which read batches through an adapter) and the LightningModules
(which provide one, e.g. ``CausalLMModule.fisher_adapter()``). It depends on torch only (Lightning objects are used
through their attributes, never imported), so the framework-free factor pass of :mod:`memcurve.curvature` uses it
too.

* :class:`FisherAdapter`: how the factor pass reads a batch — logits, data labels (empirical Fisher), example
  indices (seeding of the sampled Fisher), position and loss masks. :class:`AutoFisherAdapter` infers all of it
  from the batch and the output (the default for any LightningModule without a ``fisher_adapter()``);
  :class:`ClassificationAdapter` takes explicit keys.
* :class:`ProbeAdapter`: how the band probe runs a model and sorts examples into groups.
  :class:`AutoProbeAdapter` forms ``train`` / ``val`` for any module; :class:`ClassificationProbeAdapter` forms the
  ``noised`` / ``clean`` / ``val`` groups of a noisy-label run.
* :func:`find_dataloader`: the run's own training or validation DataLoader (from the trainer, whether the loaders
  came from a DataModule, were passed to ``fit`` / ``validate`` or are the module's hooks) and
  :func:`sequential_loader`, its sequential, unpadded-sharded copy that the analyses read.

The batch contract of the ``Auto`` adapters (anything else needs an adapter passed explicitly):

* a tensor (the input), a tuple or list (``(input, target, ...)``), or a dict whose input is the first present of
  :data:`INPUT_KEYS` and whose target (needed by the empirical Fisher only) the first present of
  :data:`TARGET_KEYS`; example indices come from :data:`INDEX_KEYS` when the dict has one, otherwise from the
  example's position in the (sequential) loader;
* ``input_ids`` dicts: ``attention_mask`` (when present) is passed to the model and masks padding positions;
  the model is called ``model(input_ids=..., attention_mask=...)`` when its ``forward`` takes those names (or
  ``**kwargs``), else ``model(input_ids)``; a ``forward(batch)`` gets the whole batch;
* the model's output: logits as a tensor, or an object / dict with ``logits`` (a Hugging Face ``ModelOutput``);
* a module containing a Hugging Face causal LM (a submodule named ``*ForCausalLM`` / ``*LMHeadModel``) is read
  as next-token prediction: the last position is dropped and data labels are shifted (as
  ``CausalLMFisherAdapter`` does).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from memcurve.utils.sampling import loader_like, unpadded_shard_sampler

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = [
    "INDEX_KEYS",
    "INPUT_KEYS",
    "TARGET_KEYS",
    "AutoFisherAdapter",
    "AutoProbeAdapter",
    "BatchLayoutError",
    "ClassificationAdapter",
    "ClassificationProbeAdapter",
    "FisherAdapter",
    "ProbeAdapter",
    "dataloader_origin",
    "default_fisher_adapter",
    "default_probe_adapter",
    "find_dataloader",
    "is_causal_lm",
    "output_logits",
    "sample_batch",
    "sequential_loader",
]

INPUT_KEYS = ("image", "pixel_values", "input_ids", "x", "inputs")
"""Dict keys tried, in order, for the model input."""
TARGET_KEYS = ("label", "labels", "y", "target", "targets")
"""Dict keys tried, in order, for the data targets (empirical Fisher)."""
INDEX_KEYS = ("index", "idx")
"""Dict keys tried, in order, for global example indices (seeding of the sampled Fisher)."""
MASK_KEY = "attention_mask"
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


# -- the factor pass -------------------------------------------------------------------------------------------
class FisherAdapter:
    """How the factor pass reads a batch. Override the methods for other batch layouts or models.

    ``drop_last_position``: the default of ``KFACFactors(drop_last_position=None)`` (True for causal LMs, whose
    last position has no next-token target).
    """

    drop_last_position: bool = False

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        """Model outputs ``[B, C]`` or ``[B, T, C]`` whose softmax is the predictive distribution."""
        raise NotImplementedError

    def labels(self, batch: Any) -> Tensor:
        """Data targets (empirical Fisher), shaped like ``logits.shape[:-1]``."""
        raise NotImplementedError

    def example_index(self, batch: Any) -> Tensor | None:
        """Global example indices ``[B]`` (seeding of the sampled Fisher); None to count examples instead."""
        return None

    def position_mask(self, batch: Any) -> Tensor | None:
        """Boolean ``[B, T]`` of positions the tracked layers should count (None: all)."""
        return None

    def loss_mask(self, batch: Any) -> Tensor | None:
        """Boolean mask over ``logits.shape[:-1]`` of positions that carry a loss (None: all)."""
        return None


def _get(batch: Any, key: str | int) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as error:
        keys = list(batch) if isinstance(batch, Mapping) else f"a {type(batch).__name__} of length {len(batch)}"
        raise KeyError(f"batch has no entry {key!r} (it has {keys}); configure the adapter's keys") from error


@dataclass
class ClassificationAdapter(FisherAdapter):
    """Classifier batches: dicts (``image``/``label``/``index``, memcurve's noisy-label batches) or tuples.

    Set ``index_key=None`` for batches without example indices.
    """

    input_key: str | int = "image"
    label_key: str | int = "label"
    index_key: str | int | None = "index"

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        return model(_get(batch, self.input_key))

    def labels(self, batch: Any) -> Tensor:
        return _get(batch, self.label_key)

    def example_index(self, batch: Any) -> Tensor | None:
        if self.index_key is None:
            return None
        if isinstance(batch, Mapping) and self.index_key not in batch:
            return None
        return _get(batch, self.index_key)


class BatchLayoutError(ValueError):
    """A batch or model output the ``Auto`` adapters cannot read; the message says which adapter to pass instead."""


_FISHER_HINT = (
    "pass KFACFactors(adapter=memcurve.adapters.ClassificationAdapter(input_key=..., label_key=...)) or a "
    "memcurve.adapters.FisherAdapter subclass"
)
_PROBE_HINT = "pass BandActivationProbe(adapter=...) a memcurve.adapters.ProbeAdapter subclass"


def _describe(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return f"a {type(batch).__name__} batch with keys {list(batch)}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} batch of {len(batch)} items ({', '.join(type(v).__name__ for v in batch)})"
    return f"a {type(batch).__name__} batch"


@dataclass(frozen=True)
class _Layout:
    """Where the parts of a batch are: ``input_key`` None means the batch itself is the input."""

    input_key: str | int | None
    target_key: str | int | None = None
    index_key: str | None = None
    mask_key: str | None = None


def _layout(batch: Any, hint: str) -> _Layout:
    if isinstance(batch, Tensor):
        return _Layout(None)
    if isinstance(batch, Mapping):
        input_key = next((k for k in INPUT_KEYS if k in batch), None)
        if input_key is not None:
            return _Layout(
                input_key,
                next((k for k in TARGET_KEYS if k in batch), None),
                next((k for k in INDEX_KEYS if k in batch), None),
                MASK_KEY if input_key == "input_ids" and MASK_KEY in batch else None,
            )
    elif isinstance(batch, (list, tuple)) and len(batch) > 0:
        return _Layout(0, 1 if len(batch) > 1 else None)
    raise BatchLayoutError(
        f"cannot infer the model input of {_describe(batch)}: expected a tensor, a tuple/list (input, target, ...) "
        f"or a dict with one of the keys {INPUT_KEYS}; {hint}"
    )


def _forward_parameters(model: Any) -> Mapping[str, inspect.Parameter] | None:
    target = model.forward if isinstance(model, nn.Module) else model
    try:
        return inspect.signature(target).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): call it with the input only
        return None


def _call_model(model: Any, batch: Any, layout: _Layout) -> Any:
    """Run ``model`` on a batch: ``forward(batch)`` gets the batch, ``input_ids`` go by name with their mask."""
    params = _forward_parameters(model)
    if layout.input_key is None:
        return model(batch)
    if params is not None:
        required = [
            p
            for p in params.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        if len(required) == 1 and required[0].name == "batch":
            return model(batch)
    inputs = batch[layout.input_key]
    if layout.input_key == "input_ids" and params is not None:
        by_name = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        any_name = any(p.kind == p.VAR_KEYWORD for p in params.values())
        if "input_ids" in by_name or any_name:
            skip = {*TARGET_KEYS, *INDEX_KEYS}
            kwargs = {k: v for k, v in batch.items() if k in by_name and k not in skip}
            kwargs["input_ids"] = inputs
            if layout.mask_key is not None and (any_name or layout.mask_key in by_name):
                kwargs[layout.mask_key] = batch[layout.mask_key]
            return model(**kwargs)
    return model(inputs)


def output_logits(output: Any, hint: str = _FISHER_HINT) -> Tensor:
    """The logits of a model output: the tensor itself, or the ``logits`` of an object or dict (HF ``ModelOutput``)."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    keys = f" with keys {list(output)}" if isinstance(output, Mapping) else ""
    raise BatchLayoutError(
        f"the model's forward returned a {type(output).__name__}{keys}: expected the logits as a tensor or an "
        f"object with .logits (a Hugging Face ModelOutput); {hint}"
    )


def is_causal_lm(module: nn.Module) -> bool:
    """Whether ``module`` contains a Hugging Face causal LM (a submodule class named ``*ForCausalLM`` or
    ``*LMHeadModel``), read as next-token prediction by :class:`AutoFisherAdapter`."""
    return any(type(m).__name__.endswith(_CAUSAL_LM_SUFFIXES) for m in module.modules())


def _shift_left(values: Tensor, valid: Tensor) -> Tensor:
    """``out[:, t] = values[:, t + 1]`` where position t + 1 is valid, else -100 (also at the last position)."""
    out = torch.full_like(values, -100)
    out[:, :-1] = values[:, 1:].masked_fill(~valid[:, 1:], -100)
    return out


@dataclass
class AutoFisherAdapter(FisherAdapter):
    """Reads any batch of the documented layouts (module docstring): tensors, ``(input, target, ...)`` tuples and
    lists, dicts with an input key of :data:`INPUT_KEYS`; outputs as tensors or objects with ``logits``.

    ``causal_lm``: next-token prediction (logits ``[B, T, V]``): the last position is dropped
    (``drop_last_position``), data labels (``labels`` if the batch has them, else ``input_ids``) are shifted by
    one and positions without a next token, or labelled -100, carry no loss. :func:`default_fisher_adapter`
    sets it with :func:`is_causal_lm`. On memcurve's noisy-label batches (``image``/``label``/``index``) it
    reads exactly what ``ClassificationAdapter()`` reads.
    """

    causal_lm: bool = False
    _position_logits: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def drop_last_position(self) -> bool:  # type: ignore[override]
        return self.causal_lm

    def check_batch(self, batch: Any, need_labels: bool = False) -> None:
        """Raise :class:`BatchLayoutError` now (one line) if a batch like this one cannot be read."""
        layout = _layout(batch, _FISHER_HINT)
        if need_labels and layout.target_key is None and not (self.causal_lm and layout.input_key == "input_ids"):
            raise BatchLayoutError(
                f"the empirical Fisher needs data targets, but {_describe(batch)} has none (the second item of a "
                f"tuple/list, or one of the keys {TARGET_KEYS}); use settings.fisher='sampled' or {_FISHER_HINT}"
            )

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        logits = output_logits(_call_model(model, batch, _layout(batch, _FISHER_HINT)))
        self._position_logits = logits.dim() >= 3  # loss_mask: only per-position logits take a position mask
        return logits

    def labels(self, batch: Any) -> Tensor:
        self.check_batch(batch, need_labels=True)
        layout = _layout(batch, _FISHER_HINT)
        if self.causal_lm and layout.input_key == "input_ids":
            source = batch[layout.target_key] if layout.target_key is not None else batch["input_ids"]
            return _shift_left(source, self._valid(batch))
        return batch[layout.target_key]

    def example_index(self, batch: Any) -> Tensor | None:
        key = _layout(batch, _FISHER_HINT).index_key
        return None if key is None else torch.as_tensor(batch[key])

    def position_mask(self, batch: Any) -> Tensor | None:
        key = _layout(batch, _FISHER_HINT).mask_key
        return None if key is None else batch[key].bool()

    def loss_mask(self, batch: Any) -> Tensor | None:
        layout = _layout(batch, _FISHER_HINT)
        if self.causal_lm and layout.input_key == "input_ids":
            valid = self._valid(batch)
            has_next = torch.zeros_like(valid)
            has_next[:, :-1] = valid[:, :-1] & valid[:, 1:]
            if layout.target_key is not None:  # HF labels: -100 marks positions without a loss
                has_next &= _shift_left(batch[layout.target_key], valid) != -100
            return has_next
        if layout.mask_key is not None and self._position_logits:
            return batch[layout.mask_key].bool()
        return None

    @staticmethod
    def _valid(batch: Mapping[str, Tensor]) -> Tensor:
        mask = batch.get(MASK_KEY)
        return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def default_fisher_adapter(module: nn.Module) -> FisherAdapter:
    """The module's ``fisher_adapter()`` when it defines one, else an :class:`AutoFisherAdapter` (causal LM or
    not, by :func:`is_causal_lm`)."""
    make = getattr(module, "fisher_adapter", None)
    if callable(make):
        return make()
    return AutoFisherAdapter(causal_lm=is_causal_lm(module))


# -- the run's data ---------------------------------------------------------------------------------------------
def _defines(owner: Any, hook: str) -> bool:
    """Whether ``owner`` (a LightningModule or DataModule) overrides Lightning's ``<split>_dataloader`` hook."""
    method = getattr(type(owner), hook, None)
    return callable(method) and method.__qualname__.split(".")[0] not in ("DataHooks", "LightningDataModule")


def _data_sources(trainer: Any, split: str) -> list[Any]:
    """Lightning's records of where each loop's data comes from (loaders passed to fit/validate, a DataModule or
    the module), the current entry point's first."""
    fit_loop, validate_loop = getattr(trainer, "fit_loop", None), getattr(trainer, "validate_loop", None)
    if split == "train":
        loops = [fit_loop]
    else:
        fit_val = getattr(getattr(fit_loop, "epoch_loop", None), "val_loop", None)
        validating = getattr(getattr(trainer, "state", None), "fn", None) == "validate"  # TrainerFn is a str enum
        loops = [validate_loop, fit_val] if validating else [fit_val, validate_loop]
    return [loop._data_source for loop in loops if getattr(loop, "_data_source", None) is not None]


def _dataloader_getter(trainer: Any, split: str) -> tuple[str, Callable[[], Any]] | None:
    """``(origin, getter)`` of the run's ``split`` data, or None; ``origin`` is ``datamodule``, ``trainer``,
    ``loaders`` (passed to fit/validate) or ``module`` (the LightningModule's hook, callable only after its setup)."""
    datamodule = getattr(trainer, "datamodule", None)
    if split == "train" and callable(getattr(datamodule, "memorization_dataloader", None)):
        return "datamodule", datamodule.memorization_dataloader  # the whole training set, unaugmented, in order
    loaded = getattr(trainer, "train_dataloader" if split == "train" else "val_dataloaders", None)
    if loaded is not None and not callable(loaded):
        return "trainer", lambda: loaded
    for source in _data_sources(trainer, split):
        if not source.is_module():
            if source.instance is not None:
                return "loaders", lambda source=source: source.instance
        elif source.is_defined():
            return ("datamodule" if source.instance is datamodule else "module"), source.dataloader
    for origin, owner in (("datamodule", datamodule), ("module", getattr(trainer, "lightning_module", None))):
        if owner is not None and _defines(owner, f"{split}_dataloader"):
            return origin, getattr(owner, f"{split}_dataloader")
    return None


def _first_loader(loaders: Any, who: str, split: str) -> DataLoader:
    while isinstance(loaders, (Mapping, list, tuple)) and not isinstance(loaders, DataLoader) and len(loaders):
        loaders = next(iter(loaders.values())) if isinstance(loaders, Mapping) else loaders[0]
    if not isinstance(loaders, DataLoader):
        raise TypeError(
            f"{who}: the run's {split} data is a {type(loaders).__name__}, not a torch DataLoader; pass the "
            "callback a callable trainer -> DataLoader"
        )
    return loaders


def dataloader_origin(trainer: Trainer, split: str) -> str | None:
    """Where :func:`find_dataloader` would take the ``split`` data from, without building a loader: ``datamodule``,
    ``trainer``, ``loaders`` (passed to fit/validate) or ``module`` (its hook); None when the run has none."""
    found = _dataloader_getter(trainer, split)
    return None if found is None else found[0]


def find_dataloader(trainer: Trainer, split: str, who: str) -> DataLoader:
    """The first ``split`` (``train`` or ``val``) DataLoader of the run.

    Found, in order: a DataModule's ``memorization_dataloader()`` (``train``: the whole training set, unaugmented);
    the loaders the Trainer has loaded (``trainer.train_dataloader`` / ``trainer.val_dataloaders``); the loaders
    passed to ``fit`` / ``validate`` or the DataModule's / LightningModule's ``<split>_dataloader()`` hook. ``who``
    names the callback argument in the one-line error raised when the run has none.
    """
    found = _dataloader_getter(trainer, split)
    if found is None:
        entry = "trainer.fit(model, train_dataloaders=...)" if split == "train" else "trainer.fit/validate"
        raise ValueError(
            f"{who}: this run has no {split} DataLoader; pass one to {entry}, use a LightningDataModule with "
            f"{split}_dataloader(), or define LightningModule.{split}_dataloader()"
        )
    return _first_loader(found[1](), who, split)


def sequential_loader(
    loader: DataLoader, trainer: Any = None, batch_size: int | None = None, max_samples: int | None = None
) -> DataLoader:
    """``loader``'s dataset read in order (its first ``max_samples`` examples), as this rank's unpadded shard.

    Batch size, workers, collate function and pinning are ``loader``'s (``batch_size`` overrides the first).
    Example k of this rank is global example ``rank + world_size * k``, the index the factor pass uses for
    batches without indices. An iterable-style dataset cannot be re-batched or sharded: it is returned as is.
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return loader
    if max_samples is not None and len(dataset) > max_samples:
        dataset = Subset(dataset, range(max_samples))
    return loader_like(loader, dataset, batch_size, unpadded_shard_sampler(dataset, trainer))


def sample_batch(loader: DataLoader) -> Any | None:
    """A batch of the loader's first example (no workers, no iteration), to check its layout; None when the
    dataset is iterable-style or empty."""
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or len(dataset) == 0:
        return None
    if loader.batch_size is None and loader.batch_sampler is None:  # no automatic batching: items are batches
        return loader.collate_fn(dataset[0])
    return loader.collate_fn([dataset[0]])


# -- the band probe --------------------------------------------------------------------------------------------
class ProbeAdapter:
    """How the probe runs a model and sorts examples into groups. Subclass for other models and batches.

    Attributes:
        groups: every group this adapter can form, in display order.
        contrast: ``(memorized, reference)`` groups whose relative difference the figure annotates, or None.
    """

    groups: ClassVar[tuple[str, ...]] = ()
    contrast: ClassVar[tuple[str, str] | None] = None

    def passes(self, trainer: Trainer, groups: Sequence[str]) -> list[tuple[str, DataLoader]]:
        """``(pass name, loader)`` for the data passes ``groups`` need; eval loaders, sharded without padding."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Any) -> None:
        """Run ``model`` on a batch already on its device (outputs are unused; hooks read the layer inputs)."""
        raise NotImplementedError

    def batch_groups(self, pass_name: str, batch: Any) -> Mapping[str, Tensor]:
        """Boolean ``[B]`` membership per group of the batch's examples (an example may be in no group)."""
        raise NotImplementedError

    def position_mask(self, batch: Any) -> Tensor | None:
        """Boolean ``[B, T]`` of real (non-padding) positions, or None when every position is real."""
        return None


def _datamodule_or_module(trainer: Trainer) -> Any:
    return trainer.datamodule if trainer.datamodule is not None else trainer.lightning_module


@dataclass
class ClassificationProbeAdapter(ProbeAdapter):
    """Noisy-label classification: ``noised`` / ``clean`` training examples and ``val`` examples.

    The training groups come from ``memorization_dataloader()`` (the whole training set, unaugmented, in
    order) split by ``batch[noised_key]``; ``val`` from ``val_dataloader()``. The model is called on
    ``batch[input_key]``.
    """

    groups: ClassVar[tuple[str, ...]] = ("noised", "clean", "val")
    contrast: ClassVar[tuple[str, str] | None] = ("noised", "clean")
    input_key: str | int = "image"
    noised_key: str | int = "is_noised"

    def passes(self, trainer: Trainer, groups: Sequence[str]) -> list[tuple[str, DataLoader]]:
        source = _datamodule_or_module(trainer)
        out = []
        if "noised" in groups or "clean" in groups:
            make = getattr(source, "memorization_dataloader", None)
            if not callable(make):
                raise ValueError(
                    "groups 'noised'/'clean' need a datamodule with memorization_dataloader() (e.g. "
                    f"memcurve.data.NoisyLabelDataModule); got {type(source).__name__}"
                )
            out.append(("train", make()))
        if "val" in groups:
            loader = source.val_dataloader()
            out.append(("val", loader[0] if isinstance(loader, (list, tuple)) else loader))
        return out

    def forward(self, model: nn.Module, batch: Any) -> None:
        model(batch[self.input_key])

    def batch_groups(self, pass_name: str, batch: Any) -> dict[str, Tensor]:
        if pass_name == "val":
            return {"val": torch.ones(len(batch[self.input_key]), dtype=torch.bool)}
        try:
            noised = torch.as_tensor(batch[self.noised_key]).bool()
        except (KeyError, IndexError, TypeError) as error:
            raise KeyError(
                f"training batches need {self.noised_key!r} to form the noised/clean groups; "
                "configure ClassificationProbeAdapter(noised_key=...)"
            ) from error
        return {"noised": noised, "clean": ~noised}


@dataclass
class AutoProbeAdapter(ProbeAdapter):
    """Any module: ``train`` (the run's training examples, in order) and ``val`` (its validation examples), each
    fed through the module with the batch inference of :class:`AutoFisherAdapter` (padding masked by
    ``attention_mask``). The loaders are the run's own (:func:`find_dataloader`), read sequentially as unpadded
    shards; the training examples keep whatever transform the training dataset applies."""

    groups: ClassVar[tuple[str, ...]] = ("train", "val")
    contrast: ClassVar[tuple[str, str] | None] = ("train", "val")

    def passes(self, trainer: Trainer, groups: Sequence[str]) -> list[tuple[str, DataLoader]]:
        who = f"BandActivationProbe(groups={list(groups)!r})"
        return [
            (split, sequential_loader(find_dataloader(trainer, split, who), trainer))
            for split in self.groups
            if split in groups
        ]

    def check_batch(self, batch: Any) -> None:
        """Raise :class:`BatchLayoutError` now (one line) if a batch like this one cannot be read."""
        _layout(batch, _PROBE_HINT)

    def forward(self, model: nn.Module, batch: Any) -> None:
        _call_model(model, batch, _layout(batch, _PROBE_HINT))

    def batch_groups(self, pass_name: str, batch: Any) -> dict[str, Tensor]:
        layout = _layout(batch, _PROBE_HINT)
        inputs = batch if layout.input_key is None else batch[layout.input_key]
        return {pass_name: torch.ones(len(inputs), dtype=torch.bool)}

    def position_mask(self, batch: Any) -> Tensor | None:
        key = _layout(batch, _PROBE_HINT).mask_key
        return None if key is None else batch[key].bool()


def default_probe_adapter(module: nn.Module, trainer: Trainer) -> ProbeAdapter:
    """The module's ``probe_adapter()`` when it defines one; :class:`ClassificationProbeAdapter` for memcurve's
    noisy-label data (a DataModule with ``memorization_dataloader()`` whose batches carry ``is_noised``); else
    :class:`AutoProbeAdapter`."""
    make = getattr(module, "probe_adapter", None)
    if callable(make):
        return make()
    make_loader = getattr(getattr(trainer, "datamodule", None), "memorization_dataloader", None)
    if callable(make_loader):
        batch = sample_batch(make_loader())
        if isinstance(batch, Mapping) and ClassificationProbeAdapter.noised_key in batch:
            return ClassificationProbeAdapter()
    return AutoProbeAdapter()
