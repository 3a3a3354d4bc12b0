"""memcurve's callbacks with their defaults on *foreign* LightningModules: none subclasses a memcurve class.

Three modules a user could have written (defined here, module level, for every test of this file to reuse):

* :class:`TupleMLP`: an MLP on scikit-learn's digits, ``(x, y)`` batches, the DataLoaders passed to
  ``trainer.fit(model, train_loader, val_loader)``;
* :class:`DictMLP` + :class:`DictDataModule`: ``{"pixel_values", "labels", "idx"}`` batches from a plain
  LightningDataModule, ``forward`` returning an object with ``.logits``;
* :class:`HFCausalLM`: a Hugging Face ``AutoModelForCausalLM`` (tiny Llama from a config) in a ten-line
  LightningModule, ``{"input_ids", "attention_mask"}`` batches from its own ``*_dataloader`` hooks, ``forward``
  returning the HF ``ModelOutput``.

:data:`FOREIGN` lists them as :class:`Case` (how to build the module, how to call ``fit``, which layers); the
``case`` fixture runs a test once per module. Part A: factors and probe with the defaults, the inferred adapters
against explicit ones and brute-force references, output guards, and a crash-and-resume run.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from memcurve.adapters import (
    AutoFisherAdapter,
    AutoProbeAdapter,
    BatchLayoutError,
    ClassificationAdapter,
    default_fisher_adapter,
    output_logits,
)
from memcurve.callbacks import BandActivationProbe, KFACFactors
from memcurve.callbacks.kfac_factors import _Forward
from memcurve.curvature import FactorSettings, collect_factors, load_factors
from memcurve.lightning_modules.causal_lm import CausalLMFisherAdapter

EXACT = {"rtol": 1e-9, "atol": 1e-12}  # float64 sums of the same batches: only summation order may differ
FLOAT32_FORWARD = {"rtol": 1e-5, "atol": 1e-8}  # float64 sums of float32 activations vs a float64 reference
N_TRAIN, N_VAL, BATCH = 160, 64, 32


# -- data -----------------------------------------------------------------------------------------------------
@cache
def digits() -> tuple[Tensor, Tensor]:
    """The first ``N_TRAIN + N_VAL`` scikit-learn digits: ``[N, 64]`` floats in [0, 1] and labels (bundled, offline)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    n = N_TRAIN + N_VAL
    return torch.from_numpy(data.data[:n]).float() / 16.0, torch.from_numpy(data.target[:n]).long()


def tuple_loaders() -> tuple[DataLoader, DataLoader]:
    """``(x, y)`` batches (default collation turns them into lists), training set not shuffled."""
    x, y = digits()
    train = DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=BATCH)
    val = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=BATCH)
    return train, val


class TupleDataModule(pl.LightningDataModule):
    """The same ``(x, y)`` batches from a plain DataModule."""

    def train_dataloader(self) -> DataLoader:
        return tuple_loaders()[0]

    def val_dataloader(self) -> DataLoader:
        return tuple_loaders()[1]


class DictDigits(Dataset):
    """``{"pixel_values": [1, 8, 8], "labels": int, "idx": int}`` examples (``idx``: the example's index)."""

    def __init__(self, start: int, stop: int) -> None:
        x, y = digits()
        self.x, self.y, self.offset = x[start:stop].reshape(-1, 1, 8, 8), y[start:stop], start

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixel_values": self.x[i], "labels": self.y[i], "idx": i}


class DictDataModule(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(DictDigits(0, N_TRAIN), batch_size=BATCH, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(DictDigits(N_TRAIN, N_TRAIN + N_VAL), batch_size=BATCH)


class Tokens(Dataset):
    """Random right-padded token sequences ``{"input_ids", "attention_mask"}`` of 5 to 12 tokens (vocabulary 64)."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 64, (n, 12), generator=generator)
        lengths = torch.randint(5, 13, (n,), generator=generator)
        self.mask = (torch.arange(12)[None] < lengths[:, None]).long()
        self.ids = self.ids * self.mask  # padding token 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


# -- the foreign modules --------------------------------------------------------------------------------------
class _Classifier(pl.LightningModule):
    """What the two classifiers share: cross-entropy training, ``val/loss`` and ``val/acc``, Adam."""

    def _logits(self, batch: Any) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        logits, y = self._logits(batch)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        logits, y = self._logits(batch)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class TupleMLP(_Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _logits(self, batch: Any) -> tuple[Tensor, Tensor]:
        x, y = batch
        return self(x), y


@dataclass
class Output:
    logits: Tensor


class DictMLP(_Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh())
        self.head = nn.Linear(32, 10)

    def forward(self, pixel_values: Tensor) -> Output:
        return Output(self.head(self.body(pixel_values)))

    def _logits(self, batch: Any) -> tuple[Tensor, Tensor]:
        return self(batch["pixel_values"]).logits, batch["labels"]


def tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return AutoModelForCausalLM.from_config(config)


class HFCausalLM(pl.LightningModule):  # the "ten-line" wrapper of a Hugging Face causal LM
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = self.model(**batch, labels=labels).loss
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        self.log("val/loss", self.model(**batch, labels=labels).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(48, seed=0), batch_size=16)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(16, seed=1), batch_size=16)


@dataclass
class Case:
    """A foreign module and how its run is started: ``build() -> (module, keyword arguments of trainer.fit)``."""

    name: str
    build: Callable[[], tuple[pl.LightningModule, dict[str, Any]]]
    layers: list[str]
    n_train: int  # training examples (the factor pass and the probe's train group read all of them)
    n_val: int


def _tuple_case() -> tuple[pl.LightningModule, dict[str, Any]]:
    torch.manual_seed(0)
    train, val = tuple_loaders()
    return TupleMLP(), {"train_dataloaders": train, "val_dataloaders": val}


def _tuple_datamodule_case() -> tuple[pl.LightningModule, dict[str, Any]]:
    """The tuple MLP with its data from a DataModule (the regression tests below: they fail on the code before
    the change for their own reason, not because loaders passed to fit were not found)."""
    torch.manual_seed(0)
    return TupleMLP(), {"datamodule": TupleDataModule()}


EXPLICIT = ClassificationAdapter(0, 1, None)  # tuple batches without indices, given explicitly


def _dict_case() -> tuple[pl.LightningModule, dict[str, Any]]:
    torch.manual_seed(0)
    return DictMLP(), {"datamodule": DictDataModule()}


def _hf_case() -> tuple[pl.LightningModule, dict[str, Any]]:
    torch.manual_seed(0)
    return HFCausalLM(), {}


FOREIGN = [
    Case("tuple_batches_loaders_passed_to_fit", _tuple_case, ["net.*"], N_TRAIN, N_VAL),
    Case("dict_batches_datamodule", _dict_case, ["body.1", "head"], N_TRAIN, N_VAL),
    Case("hf_causal_lm_module_hooks", _hf_case, ["model.model.layers.*.mlp.*_proj"], 48, 16),
]


@pytest.fixture(params=FOREIGN, ids=[case.name for case in FOREIGN])
def case(request) -> Case:
    return request.param


def make_trainer(root: Path, callbacks: list, **overrides) -> pl.Trainer:
    """A quiet CPU Trainer logging under ``root`` (TensorBoard, no checkpoints unless ``overrides`` say so)."""
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": root,
        "logger": pl.loggers.TensorBoardLogger(root, name="run"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
    }
    options.update(overrides)
    return pl.Trainer(**options)


def read_rows(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reconstruct(layer) -> tuple[Tensor, Tensor]:
    """A and G back from their eigendecompositions."""
    a = layer.eigvecs_A @ torch.diag(layer.eigvals_A) @ layer.eigvecs_A.T
    g = layer.eigvecs_G @ torch.diag(layer.eigvals_G) @ layer.eigvecs_G.T
    return a, g


# -- the defaults, end to end ---------------------------------------------------------------------------------
def test_defaults_collect_factors_and_probe_train_and_val(case, tmp_path):
    """``KFACFactors(layers=...)`` and ``BandActivationProbe()`` with nothing else given: a factor file that loads
    against the module, and a probe CSV with the groups ``train`` and ``val`` counting every example."""
    module, fit_kwargs = case.build()
    factors, probe = KFACFactors(layers=case.layers), BandActivationProbe()
    trainer = make_trainer(tmp_path, [factors, probe])
    trainer.fit(module, **fit_kwargs)

    assert trainer.current_epoch == 1  # trained, then analysed
    path = Path(factors.saved_paths[-1])
    assert path == Path(trainer.log_dir) / "kfac" / "kfac-final.safetensors"
    stored = load_factors(path, module)
    assert sorted(stored.layers) == sorted(factors.layer_names) and stored.layers
    rows = read_rows(probe.saved_paths[-1])
    assert {row["group"] for row in rows} == {"train", "val"}
    assert {row["layer"] for row in rows} == set(stored.layers)
    counted = {row["group"]: int(row["n"]) for row in rows}
    assert counted == {"train": case.n_train, "val": case.n_val}
    assert (Path(trainer.log_dir) / "probe" / "bands-final.png").is_file()


def test_inferred_adapter_reads_what_an_explicit_adapter_reads_tuple_batches(tmp_path):
    """Sampled Fisher (indices from the position in the loader): the callback's factors equal those of the pure
    pass with ``ClassificationAdapter(0, 1, None)`` over the same loader, in float64."""
    module, fit_kwargs = _tuple_case()
    settings = FactorSettings(dtype="float64", mc_samples=2)
    callback = KFACFactors(layers=["net.*"], settings=settings)
    make_trainer(tmp_path, [callback]).fit(module, **fit_kwargs)
    stored = load_factors(callback.saved_paths[-1], module)
    reference = collect_factors(
        module,
        fit_kwargs["train_dataloaders"],
        callback.layer_names,
        settings,
        adapter=ClassificationAdapter(0, 1, None),
    )
    for name, layer in stored.layers.items():
        a, g = reconstruct(layer)
        torch.testing.assert_close(a, reference[name].A, **EXACT)
        torch.testing.assert_close(g, reference[name].G, **EXACT)
        assert layer.count_A == N_TRAIN and layer.count_G == 2 * N_TRAIN


def test_inferred_adapter_empirical_fisher_equals_a_brute_force_reference(tmp_path):
    """Empirical Fisher on tuple batches: A of the first layer is XᵀX / N, G of the last is the mean of
    (softmax(z) − e_y)(softmax(z) − e_y)ᵀ — written out by hand, in float64."""
    module, fit_kwargs = _tuple_case()
    settings = FactorSettings(dtype="float64", fisher="empirical")
    callback = KFACFactors(layers=["net.0", "net.2"], settings=settings)
    make_trainer(tmp_path, [callback]).fit(module, **fit_kwargs)
    stored = load_factors(callback.saved_paths[-1], module)
    x, y = digits()
    x, y = x[:N_TRAIN], y[:N_TRAIN]
    with torch.no_grad():
        errors = module(x).softmax(-1).double() - nn.functional.one_hot(y, 10).double()
    expected_a = x.double().T @ x.double() / N_TRAIN
    expected_g = errors.T @ errors / N_TRAIN
    torch.testing.assert_close(reconstruct(stored.layers["net.0"])[0], expected_a, **FLOAT32_FORWARD)
    torch.testing.assert_close(reconstruct(stored.layers["net.2"])[1], expected_g, **FLOAT32_FORWARD)


class _HFOutputLMAdapter(CausalLMFisherAdapter):
    """memcurve's own causal-LM adapter, reading the logits of a forward that returns a ``ModelOutput``."""

    def logits(self, model: nn.Module, batch: Any) -> Tensor:
        return super().logits(model, batch).logits


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_inferred_adapter_reads_a_hf_causal_lm_as_memcurve_s_lm_adapter_does(tmp_path, fisher):
    """A module holding a ``*ForCausalLM``: last position dropped, padding masked, labels shifted — the factors of
    memcurve's ``CausalLMFisherAdapter``, in float64."""
    module, _ = _hf_case()
    settings = FactorSettings(dtype="float64", fisher=fisher)
    layers = ["model.model.layers.0.mlp.down_proj", "model.model.layers.1.self_attn.q_proj"]
    callback = KFACFactors(layers=layers, settings=settings)
    make_trainer(tmp_path, [callback], max_epochs=0).fit(module)
    assert isinstance(callback.adapter, AutoFisherAdapter) and callback.adapter.causal_lm
    stored = load_factors(callback.saved_paths[-1], module)
    assert stored.settings["drop_last_position"] is True
    reference = collect_factors(module, module.train_dataloader(), layers, settings, adapter=_HFOutputLMAdapter())
    tokens = Tokens(48, seed=0).mask.sum() - 48  # every real token but each sequence's last
    for name, layer in stored.layers.items():
        assert layer.count_A == tokens
        a, g = reconstruct(layer)
        torch.testing.assert_close(a, reference[name].A, **EXACT)
        torch.testing.assert_close(g, reference[name].G, **EXACT)


# -- the inferred adapter, batch by batch ----------------------------------------------------------------------
def test_auto_adapter_reads_every_documented_layout():
    adapter = AutoFisherAdapter()
    x, y, idx = torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.tensor([7, 8, 9])
    model = nn.Linear(4, 3)
    for batch, labels, index in [
        ((x, y), y, None),
        ([x, y, idx], y, None),  # a third item is not taken for indices
        ({"image": x, "label": y, "index": idx}, y, idx),
        ({"pixel_values": x, "labels": y, "idx": idx}, y, idx),
        ({"x": x, "y": y}, y, None),
        ({"inputs": x, "targets": y}, y, None),
    ]:
        torch.testing.assert_close(adapter.logits(model, batch), model(x))
        assert torch.equal(adapter.labels(batch), labels)
        assert (
            (adapter.example_index(batch) is None)
            if index is None
            else torch.equal(adapter.example_index(batch), index)
        )
        assert adapter.position_mask(batch) is None and adapter.loss_mask(batch) is None
    torch.testing.assert_close(adapter.logits(model, x), model(x))  # a bare tensor is the input


def test_auto_adapter_passes_input_ids_by_name_with_their_mask():
    seen = {}

    class Wrapper(nn.Module):
        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            seen.update(mask=attention_mask, types=token_type_ids)
            return {"logits": torch.zeros(*input_ids.shape, 5)}

    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": mask * 0, "labels": ids}
    adapter = AutoFisherAdapter()
    assert adapter.logits(Wrapper(), batch).shape == (2, 3, 5)
    assert torch.equal(seen["mask"], mask) and torch.equal(seen["types"], mask * 0)
    assert torch.equal(adapter.position_mask(batch), mask.bool())
    assert torch.equal(adapter.loss_mask(batch), mask.bool())  # per-position logits: padding carries no loss


def test_auto_adapter_follows_the_module_s_forward_signature_through_the_callback_s_caller():
    """What ``KFACFactors`` calls (``_Forward``, the precision context around the module) shows the module's own
    ``forward`` signature: ``forward(batch)`` gets the batch, ``forward(ids, mask=None)`` gets the ids only."""

    class WholeBatch(nn.Module):
        def forward(self, batch):
            return batch["input_ids"].float()[..., None].expand(-1, -1, 3)

    class Positional(nn.Module):
        def forward(self, ids, mask=None):
            assert mask is None
            return ids.float()[..., None].expand(-1, -1, 3)

    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    adapter = AutoFisherAdapter()
    for module in (WholeBatch(), Positional()):
        assert adapter.logits(_Forward(module, None, None), batch).shape == (2, 4, 3)


def test_output_logits_reads_tensors_dicts_and_objects():
    logits = torch.randn(2, 3)
    assert output_logits(logits) is logits
    assert output_logits({"logits": logits, "loss": None}) is logits
    assert output_logits(Output(logits)) is logits
    with pytest.raises(BatchLayoutError, match=r"forward returned a tuple: expected the logits as a tensor"):
        output_logits((logits, logits))


def test_unknown_batch_layout_is_refused_in_setup_naming_the_keys_and_the_fix(tmp_path):
    class Unnamed(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return {"features": torch.zeros(64), "answer": 0}

    module = TupleMLP()
    loader = DataLoader(Unnamed(), batch_size=4)
    trainer = make_trainer(tmp_path, [KFACFactors(layers=["net.0"])])
    with pytest.raises(
        BatchLayoutError, match=r"dict batch with keys \['features', 'answer'\].*pass KFACFactors\(adapter="
    ):
        trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 0  # refused before training


def test_empirical_fisher_without_targets_is_refused_in_setup(tmp_path):
    x, _ = digits()
    loader = DataLoader(TensorDataset(x[:8]), batch_size=4)  # 1-tuples: inputs only
    callback = KFACFactors(layers=["net.0"], settings=FactorSettings(fisher="empirical"))
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(BatchLayoutError, match=r"the empirical Fisher needs data targets"):
        trainer.fit(TupleMLP(), train_dataloaders=loader)
    assert trainer.global_step == 0


def test_default_adapter_is_the_module_s_own_when_it_has_one():
    assert isinstance(default_fisher_adapter(TupleMLP()), AutoFisherAdapter)
    assert not default_fisher_adapter(TupleMLP()).causal_lm and default_fisher_adapter(HFCausalLM()).causal_lm

    class Own(TupleMLP):
        def fisher_adapter(self):
            return ClassificationAdapter(0, 1, None)

    assert isinstance(default_fisher_adapter(Own()), ClassificationAdapter)


# -- where the data come from -----------------------------------------------------------------------------------
def test_validate_with_loaders_reads_them_and_a_missing_train_loader_is_named(tmp_path):
    """``trainer.validate(model, dataloaders=...)``: ``dataloader="val"`` reads the loaders passed to validate;
    ``dataloader="train"`` — the module has no ``train_dataloader`` — is refused in setup with the fixes."""
    module, fit_kwargs = _tuple_case()
    val = fit_kwargs["val_dataloaders"]
    callback = KFACFactors(layers=["net.0"], dataloader="val", when="validate")
    make_trainer(tmp_path, [callback]).validate(module, dataloaders=val, verbose=False)
    assert load_factors(callback.saved_paths[-1], module).layers["net.0"].count_A == N_VAL

    missing = KFACFactors(layers=["net.0"], when="validate", output_dir=str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"KFACFactors\(dataloader='train'\): this run has no train DataLoader; pass"):
        make_trainer(tmp_path, [missing]).validate(module, dataloaders=val, verbose=False)


def test_probe_without_validation_data_names_the_group_and_the_fix(tmp_path):
    module, fit_kwargs = _tuple_case()
    trainer = make_trainer(tmp_path, [KFACFactors(layers=["net.0"]), BandActivationProbe()])
    with pytest.raises(ValueError, match=r"BandActivationProbe\(groups=\['train', 'val'\]\): this run has no val"):
        trainer.fit(module, train_dataloaders=fit_kwargs["train_dataloaders"])
    assert trainer.global_step == 0
    probe = BandActivationProbe(groups=["train"])
    make_trainer(tmp_path, [KFACFactors(layers=["net.0"]), probe]).fit(
        module, train_dataloaders=fit_kwargs["train_dataloaders"]
    )
    assert isinstance(probe.adapter, AutoProbeAdapter)
    assert {row["group"] for row in read_rows(probe.saved_paths[-1])} == {"train"}


# -- nothing of another run is overwritten --------------------------------------------------------------------
def test_an_existing_factor_file_of_another_run_is_refused_in_setup_unless_overwrite(tmp_path):
    folder = tmp_path / "kfac"
    module, fit_kwargs = _tuple_datamodule_case()
    first = KFACFactors(layers=["net.0"], output_dir=str(folder), adapter=EXPLICIT)
    make_trainer(tmp_path, [first]).fit(module, **fit_kwargs)
    original = sha256(first.saved_paths[-1])

    second = make_trainer(
        tmp_path, [KFACFactors(layers=["net.0"], output_dir=str(folder), adapter=EXPLICIT)], max_epochs=3
    )
    with pytest.raises(ValueError, match=r"output_dir/filename: refusing to overwrite .*kfac-final\.safetensors"):
        second.fit(module, **fit_kwargs)
    assert second.global_step == 0 and sha256(first.saved_paths[-1]) == original  # refused before training

    again = KFACFactors(layers=["net.0"], output_dir=str(folder), adapter=EXPLICIT, overwrite=True)
    make_trainer(tmp_path, [again], max_epochs=2).fit(module, **fit_kwargs)
    assert again.saved_paths == first.saved_paths and sha256(first.saved_paths[-1]) != original


def test_an_existing_probe_output_of_another_run_is_refused_in_setup(tmp_path):
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / "bands-final.png").write_bytes(b"another run's figure")
    module, fit_kwargs = _tuple_case()
    trainer = make_trainer(tmp_path, [KFACFactors(layers=["net.0"]), BandActivationProbe(output_dir=str(folder))])
    with pytest.raises(ValueError, match=r"output_dir/filename: refusing to overwrite .*bands-final\.png"):
        trainer.fit(module, **fit_kwargs)
    assert trainer.global_step == 0 and (folder / "bands-final.png").read_bytes() == b"another run's figure"


@pytest.mark.parametrize("callback", ["factors", "probe"])
def test_an_output_dir_that_is_a_file_is_refused_in_setup(tmp_path, callback):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    callbacks = {
        "factors": [KFACFactors(layers=["net.0"], output_dir=str(taken))],
        "probe": [KFACFactors(layers=["net.0"]), BandActivationProbe(output_dir=str(taken / "probe"))],
    }[callback]
    module, fit_kwargs = _tuple_case()
    trainer = make_trainer(tmp_path, callbacks)
    with pytest.raises(ValueError, match=r"output_dir='.*taken.*' (is a file|cannot be created: '.*taken' is a file)"):
        trainer.fit(module, **fit_kwargs)
    assert trainer.global_step == 0


# -- crash and resume -------------------------------------------------------------------------------------------
class Crash(pl.Callback):
    """Raises in the middle of ``epoch`` (after that epoch's first batches), as a killed job would stop."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if trainer.current_epoch == self.epoch and i == 2:
            raise RuntimeError("killed mid-epoch")


def _checkpoint_state(path: Path, callback: KFACFactors) -> dict[str, Any]:
    checkpoint = torch.load(path, weights_only=False)
    return {"state": checkpoint["callbacks"][callback.state_key], "record": checkpoint["kfac_factors"]}


def test_a_run_killed_mid_epoch_resumes_from_last_with_its_factor_files_and_state(tmp_path):
    ckpt_dir, kfac_dir = tmp_path / "checkpoints", tmp_path / "kfac"

    def callbacks(*extra: pl.Callback) -> tuple[KFACFactors, list[pl.Callback]]:
        factors = KFACFactors(layers=["net.*"], when="checkpoint", output_dir=str(kfac_dir), adapter=EXPLICIT)
        return factors, [ModelCheckpoint(dirpath=ckpt_dir, save_last=True), factors, *extra]

    module, fit_kwargs = _tuple_datamodule_case()
    first, first_callbacks = callbacks(Crash(epoch=1))
    trainer = make_trainer(tmp_path, first_callbacks, max_epochs=3, enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="killed mid-epoch"):
        trainer.fit(module, **fit_kwargs)
    steps_per_epoch = N_TRAIN // BATCH
    epoch0 = kfac_dir / f"kfac-epoch000-step{steps_per_epoch}.safetensors"
    assert first.saved_paths == [str(epoch0)] and sorted(kfac_dir.iterdir()) == [epoch0]  # one pass for 2 saves
    saved = _checkpoint_state(ckpt_dir / "last.ckpt", first)
    assert saved["state"]["saved_paths"] == [str(epoch0)]  # the state in a checkpoint lists its own factor file
    assert saved["record"]["path"] == str(epoch0)
    digest = sha256(epoch0)

    # A fresh run into the same folder is refused before training; the resumed run may continue there.
    _, fresh_callbacks = callbacks()
    fresh = make_trainer(tmp_path, fresh_callbacks, max_epochs=3, enable_checkpointing=True)
    with pytest.raises(ValueError, match=r"refusing to overwrite .*kfac-epoch000-step5\.safetensors"):
        fresh.fit(TupleMLP(), datamodule=TupleDataModule())
    assert fresh.global_step == 0

    resumed_module, fit_kwargs = _tuple_datamodule_case()
    resumed, resumed_callbacks = callbacks()
    trainer = make_trainer(tmp_path, resumed_callbacks, max_epochs=3, enable_checkpointing=True)
    trainer.fit(resumed_module, ckpt_path="last", **fit_kwargs)
    assert trainer.current_epoch == 3 and trainer.global_step == 3 * steps_per_epoch
    expected = [kfac_dir / f"kfac-epoch{e:03d}-step{(e + 1) * steps_per_epoch}.safetensors" for e in range(3)]
    assert resumed.saved_paths == [str(p) for p in expected]
    assert sha256(epoch0) == digest  # the resumed run did not touch the first epoch's file
    final = _checkpoint_state(ckpt_dir / "last.ckpt", resumed)
    assert final["state"]["saved_paths"] == [str(p) for p in expected]
    assert final["record"]["path"] == str(expected[-1])
    load_factors(expected[-1], resumed_module)  # the last file belongs to the resumed weights


# -- the whole drop-in story per foreign module ---------------------------------------------------------------------
class _RecordStartWeights(pl.Callback):
    """The weights the module holds when training (re)starts: after a ``ckpt_path`` resume has restored them."""

    def __init__(self) -> None:
        self.weights: dict[str, Tensor] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_defaults_collect_probe_prune_score_and_resume_from_last_with_the_original_weights(case, tmp_path):
    """Issue 14's "done when" for each foreign module: the default callbacks collect factors, probe, prune (K-FAC
    and SVD) with before/after scores from the module's OWN validation metrics, and ``ckpt_path="last"`` then
    resumes from the original ``last.ckpt`` — never from an edited copy."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from memcurve.callbacks import KFACPruning, SVDPruning

    module, fit_kwargs = case.build()
    checkpoints = tmp_path / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=checkpoints, save_last=True),
        KFACFactors(layers=case.layers),
        BandActivationProbe(),
        KFACPruning(layers=case.layers, energy=0.6),
        SVDPruning(layers=case.layers, keep_fraction=0.5),
    ]
    trainer = make_trainer(tmp_path, callbacks, enable_checkpointing=True)
    trainer.fit(module, **fit_kwargs)

    kfac, svd = callbacks[3], callbacks[4]
    for pruning, method in ((kfac, "kfac"), (svd, "svd")):
        assert [row.method for row in pruning.rows] == [method]
        row = pruning.rows[0]
        assert "val/loss" in row.before and "val/loss" in row.after  # the module's own validation metric
        assert row.after["val/loss"] != row.before["val/loss"]
        edited = Path(row.edited_checkpoint)
        assert edited.is_file() and edited.parent.name == "edited"
    assert read_rows(callbacks[2].saved_paths[-1])  # the probe ran after the factors

    last = checkpoints / "last.ckpt"
    assert last.is_file() and not any(p.name.startswith("last") and p != last for p in checkpoints.glob("*.ckpt"))
    original = torch.load(last, map_location="cpu", weights_only=False)["state_dict"]
    resumed_module, resumed_kwargs = case.build()
    start = _RecordStartWeights()
    resumed = make_trainer(
        tmp_path / "resumed",
        [ModelCheckpoint(dirpath=checkpoints, save_last=True), start],
        enable_checkpointing=True,
        max_epochs=2,
    )
    resumed.fit(resumed_module, ckpt_path="last", **resumed_kwargs)
    assert start.weights is not None and set(start.weights) == set(original)
    for key, value in original.items():
        assert torch.equal(start.weights[key], value), f"{key}: resumed from something other than last.ckpt"


def test_collect_factors_without_lightning_infers_tuple_batches():
    """The framework-free ``collect_factors`` defaults to the inferred adapter too: a plain ``nn.Sequential`` on
    ``(x, y)`` tuples gives the factors of the explicit adapter (float64, both Fisher types)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 8, dtype=torch.float64), torch.randint(0, 3, (20,))
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, 20, 7)]
    for fisher in ("sampled", "empirical"):
        settings = FactorSettings(fisher=fisher, dtype="float64")
        inferred = collect_factors(model, batches, ["0", "2"], settings)
        explicit = collect_factors(model, batches, ["0", "2"], settings, adapter=EXPLICIT)
        for name in ("0", "2"):
            torch.testing.assert_close(inferred[name].A, explicit[name].A, **EXACT)
            torch.testing.assert_close(inferred[name].G, explicit[name].G, **EXACT)
