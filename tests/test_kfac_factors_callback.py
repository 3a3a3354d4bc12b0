"""KFACFactors on real (tiny) Lightning runs: files, equality with the pure pass, hygiene, DDP, checkpoints, errors."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memcurve.callbacks import KFACFactors, kfac_factors
from memcurve.callbacks.kfac_factors import effective_rank
from memcurve.curvature import FactorFileError, FactorSettings, collect_factors, load_factors
from memcurve.data import NoisyLabelDataModule
from memcurve.lightning_modules import NoisyLabelClassifier

LAYERS = ["model.blocks.*.mlp.fc?"]
EXACT = {"rtol": 1e-9, "atol": 1e-12}  # float64 sums, same batches: only summation order may differ


def tiny_model(tiny_vit_kwargs) -> NoisyLabelClassifier:
    torch.manual_seed(0)
    return NoisyLabelClassifier(model_kwargs=tiny_vit_kwargs, warmup_epochs=0, memorization_eval_every_n_epochs=0)


def small_digits() -> NoisyLabelDataModule:
    return NoisyLabelDataModule(val_size=297, subset_size=120, val_subset_size=40, batch_size=40, eval_batch_size=50)


def make_trainer(tmp_path: Path, callback: KFACFactors, **overrides) -> pl.Trainer:
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": TensorBoardLogger(tmp_path, name="run"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [callback],
    }
    options.update(overrides)
    return pl.Trainer(**options)


def reconstruct(layer):
    """A and G back from their eigendecompositions."""
    a = layer.eigvecs_A @ torch.diag(layer.eigvals_A) @ layer.eigvecs_A.T
    g = layer.eigvecs_G @ torch.diag(layer.eigvals_G) @ layer.eigvecs_G.T
    return a, g


def test_fit_end_factors_equal_the_pure_pass_and_load_against_the_model(tmp_path, tiny_vit_kwargs):
    settings = FactorSettings(dtype="float64", position="cls", mc_samples=2)
    callback = KFACFactors(layers=LAYERS, settings=settings)
    model, datamodule = tiny_model(tiny_vit_kwargs), small_digits()
    trainer = make_trainer(tmp_path, callback)
    trainer.fit(model, datamodule=datamodule)
    path = Path(callback.saved_paths[-1])
    assert path == Path(trainer.log_dir) / "kfac" / "kfac-final.safetensors"
    stored = load_factors(path, model)
    assert sorted(stored.layers) == [
        "model.blocks.0.mlp.fc1",
        "model.blocks.0.mlp.fc2",
        "model.blocks.1.mlp.fc1",
        "model.blocks.1.mlp.fc2",
    ]
    assert stored.settings["position"] == "cls" and stored.settings["mc_samples"] == 2
    assert stored.layers["model.blocks.0.mlp.fc1"].count_A == 120  # one CLS position per training image
    reference = collect_factors(model, datamodule.memorization_dataloader(), callback.layer_names, settings)
    for name, layer in stored.layers.items():
        a, g = reconstruct(layer)
        torch.testing.assert_close(a, reference[name].A, **EXACT)
        torch.testing.assert_close(g, reference[name].G, **EXACT)


def test_factor_pass_leaves_the_model_as_it_was(tmp_path, tiny_vit_kwargs):
    model, datamodule = tiny_model(tiny_vit_kwargs), small_digits()
    datamodule.setup("fit")
    model.train()
    model.model.blocks[0].mlp.fc1.weight.requires_grad_(False)  # a frozen layer is tracked and stays frozen
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.inference_mode():  # as inside a validation hook
        collect_factors(model, datamodule.memorization_dataloader(), ["model.blocks.0.mlp.fc1", "model.head"])
    assert model.training and all(m.training for m in model.modules())
    assert not model.model.blocks[0].mlp.fc1.weight.requires_grad and model.model.head.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_checkpoint_mode_records_the_file_in_the_checkpoint_and_logs_spectra(tmp_path, tiny_vit_kwargs):
    callback = KFACFactors(
        layers=["model.head", "model.blocks.1.attn.qkv"], settings=FactorSettings(max_batches=2), when="checkpoint"
    )
    trainer = make_trainer(tmp_path, callback)
    trainer.fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits())
    checkpoint_path = next(Path(trainer.log_dir).glob("checkpoints/*.ckpt"))
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    recorded = Path(checkpoint["kfac_factors"]["path"])
    assert recorded.is_file() and recorded.name == "kfac-epoch000-step3.safetensors"
    assert checkpoint["callbacks"][callback.state_key]["saved_paths"] == [str(recorded)]  # the state lists it too
    assert load_factors(recorded).layers["model.head"].count_A == 100  # 2 unaugmented batches of eval_batch_size 50
    events = EventAccumulator(str(next(Path(trainer.log_dir).glob("events.out.tfevents.*"))))
    events.Reload()
    assert "kfac/model.head/effective_rank_A" in events.Tags()["scalars"]
    assert "kfac/model.head/pair_fraction_for_90pct_energy" in events.Tags()["scalars"]
    assert "kfac/model.head/log10_eigvals_G" in events.Tags()["histograms"]


def test_validate_collects_on_a_finished_checkpoint(tmp_path, tiny_vit_kwargs):
    """``trainer.validate(..., ckpt_path=...)`` with ``when="validate"``: the factors of the checkpoint's weights."""
    trainer = make_trainer(tmp_path, KFACFactors(layers=["model.head"], when="validate"))
    trained = tiny_model(tiny_vit_kwargs)
    trainer.fit(trained, datamodule=small_digits())
    checkpoint = next(Path(trainer.log_dir).glob("checkpoints/*.ckpt"))
    output = tmp_path / "out" / "factors.safetensors"
    settings = FactorSettings(fisher="empirical", max_batches=2, dtype="float64")

    def validate(model: NoisyLabelClassifier, datamodule: NoisyLabelDataModule) -> KFACFactors:
        callback = KFACFactors(
            layers=["model.blocks.*.mlp.fc1"],
            settings=settings,
            when="validate",
            output_dir=str(output.parent),
            filename=output.name,
        )
        trainer = make_trainer(tmp_path, callback, logger=False, enable_checkpointing=False)
        trainer.validate(model, datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False)
        return callback

    # A model of another size cannot take this checkpoint: refused before any factor is collected.
    with pytest.raises(RuntimeError, match=r"size mismatch|Missing key|Unexpected key"):
        validate(NoisyLabelClassifier(model_kwargs={**tiny_vit_kwargs, "embed_dim": 16}), small_digits())
    assert not output.exists()
    torch.manual_seed(1)  # other initial weights: the checkpoint's must replace them
    fresh = NoisyLabelClassifier(model_kwargs=tiny_vit_kwargs, warmup_epochs=0, memorization_eval_every_n_epochs=0)
    datamodule = small_digits()
    callback = validate(fresh, datamodule)
    assert callback.saved_paths == [str(output)]
    stored = load_factors(output, trained)
    assert stored.settings["fisher"] == "empirical" and len(stored.layers) == 2
    assert stored.extra["max_batches"] == 2
    reference = collect_factors(trained, datamodule.memorization_dataloader(), callback.layer_names, settings)
    for name, layer in stored.layers.items():
        a, g = reconstruct(layer)
        torch.testing.assert_close(a, reference[name].A, **EXACT)
        torch.testing.assert_close(g, reference[name].G, **EXACT)
    with pytest.raises(FactorFileError, match="model"):
        load_factors(output, NoisyLabelClassifier(model_kwargs={**tiny_vit_kwargs, "embed_dim": 16}))


def _validate_factors(tmp_path: Path, tiny_vit_kwargs, devices: int) -> Path:
    callback = KFACFactors(
        layers=LAYERS,
        settings=FactorSettings(dtype="float64", batch_size=16),
        when="validate",
        output_dir=str(tmp_path / f"world{devices}"),
    )
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = make_trainer(tmp_path, callback, devices=devices, strategy=strategy, logger=False)
    trainer.validate(tiny_model(tiny_vit_kwargs), datamodule=small_digits(), verbose=False)
    return tmp_path / f"world{devices}" / "kfac.safetensors"


def test_two_gloo_processes_give_the_single_process_factors(tmp_path, tiny_vit_kwargs):
    single = load_factors(_validate_factors(tmp_path, tiny_vit_kwargs, devices=1))
    double = load_factors(_validate_factors(tmp_path, tiny_vit_kwargs, devices=2))
    for name, layer in single.layers.items():
        other = double.layers[name]
        assert (
            (layer.count_A, layer.count_G) == (other.count_A, other.count_G) == (120 * 17, 120 * 17)
        )  # 16 patches + CLS
        for one, two in zip(reconstruct(layer), reconstruct(other)):
            torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-10)


def test_peak_memory_without_the_resource_module_is_reported_unavailable(monkeypatch):
    """Where ``resource`` does not exist (Windows), a CPU pass reports NaN and says so, instead of failing."""
    monkeypatch.setattr(kfac_factors, "resource", None)
    meter = kfac_factors.Throughput(torch.device("cpu"))
    meter.stop()
    result = meter.finish()
    assert math.isnan(result["peak_memory_bytes"]) and result["peak_memory_kind"] == "unavailable"
    assert kfac_factors._format_peak(result["peak_memory_bytes"]) == "unavailable"


def test_effective_rank():
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.zeros(3)) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"when": "epoch"}, ValueError, r"when='epoch' is not supported"),
        ({"every_n_epochs": 0}, ValueError, r"every_n_epochs=0 must be a positive integer"),
        ({"dataloader": "test"}, ValueError, r"dataloader='test' is not supported; choose one of \('train', 'val'\)"),
        ({"layers": []}, ValueError, r"layers=\[\] is empty"),
        ({"layers": ["re:("]}, ValueError, r"not a valid regular expression"),
        ({"adapter": "vit"}, TypeError, r"adapter must be a memcurve.curvature.FisherAdapter"),
        ({"settings": {"position": "cls"}}, TypeError, r"settings must be a memcurve.curvature.FactorSettings"),
        (
            {"settings": FactorSettings(sharded=True), "filename": "kfac.pt"},
            ValueError,
            r"filename='kfac.pt': sharded=True needs a '<stem>.safetensors' name",
        ),
        ({"overwrite": 1}, TypeError, r"overwrite=1 must be True or False"),
        ({"filename": "kfac-{rank}.safetensors"}, ValueError, r"filename='kfac-\{rank\}.safetensors' must be a file"),
        ({"filename": "kfac-{epoch"}, ValueError, r"filename='kfac-\{epoch' is not a valid name template"),
    ],
)
def test_bad_arguments_fail_eagerly(kwargs, error, message):
    """The callback's own arguments; every pass setting is checked by FactorSettings (test_factor_settings.py)."""
    with pytest.raises(error, match=message):
        KFACFactors(**{"layers": LAYERS, **kwargs})


@pytest.mark.parametrize(
    ("layers", "on_non_linear", "error", "message"),
    [
        (["model.decoder.*"], "skip", ValueError, r"layer pattern 'model.decoder.\*' matches no nn.Linear module"),
        (["model.blocks.0.mlp.*"], "error", TypeError, r"matches modules that are not nn.Linear.*GELU"),
    ],
)
def test_layers_are_checked_against_the_model_at_setup(
    tmp_path, tiny_vit_kwargs, layers, on_non_linear, error, message
):
    callback = KFACFactors(layers=layers, settings=FactorSettings(on_non_linear=on_non_linear))
    with pytest.raises(error, match=message):
        make_trainer(tmp_path, callback).fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits())
