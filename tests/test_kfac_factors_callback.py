"""KFACFactors on real (tiny) Lightning runs: files, equality with the pure pass, hygiene, DDP, CLI, errors."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memcurve.callbacks import KFACFactors
from memcurve.callbacks.kfac_factors import effective_rank
from memcurve.callbacks.kfac_factors import main as collect_main
from memcurve.curvature import FactorFileError, collect_factors, load_factors
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
    callback = KFACFactors(layers=LAYERS, dtype="float64", position="cls", mc_samples=2)
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
    reference = collect_factors(
        model,
        datamodule.memorization_dataloader(),
        callback.layer_names,
        position="cls",
        mc_samples=2,
        dtype=torch.float64,
    )
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
    callback = KFACFactors(layers=["model.head", "model.blocks.1.attn.qkv"], when="checkpoint", max_batches=2)
    trainer = make_trainer(tmp_path, callback)
    trainer.fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits())
    checkpoint_path = next(Path(trainer.log_dir).glob("checkpoints/*.ckpt"))
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    recorded = Path(checkpoint["kfac_factors"]["path"])
    assert recorded.is_file() and recorded.name == "kfac-epoch000-step3.safetensors"
    assert load_factors(recorded).layers["model.head"].count_A == 100  # 2 unaugmented batches of eval_batch_size 50
    events = EventAccumulator(str(next(Path(trainer.log_dir).glob("events.out.tfevents.*"))))
    events.Reload()
    assert "kfac/model.head/effective_rank_A" in events.Tags()["scalars"]
    assert "kfac/model.head/pair_fraction_for_90pct_energy" in events.Tags()["scalars"]
    assert "kfac/model.head/log10_eigvals_G" in events.Tags()["histograms"]


def test_standalone_collection_on_a_finished_checkpoint(tmp_path, tiny_vit_kwargs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(tmp_path, KFACFactors(layers=["model.head"], when="validate"))
    model = tiny_model(tiny_vit_kwargs)
    trainer.fit(model, datamodule=NoisyLabelDataModule(val_size=297))
    checkpoint = next(Path(trainer.log_dir).glob("checkpoints/*.ckpt"))
    config = Path(__file__).parents[1] / "configs" / "vit_digits_noisy.yaml"
    output = tmp_path / "out" / "factors.safetensors"
    # The digits config builds the demo-sized ViT; this checkpoint holds the tiny one, which must be refused.
    with pytest.raises(RuntimeError, match=r"size mismatch|Missing key|Unexpected key"):
        collect_main(
            [
                "--config",
                str(config),
                "--ckpt",
                str(checkpoint),
                "--layers",
                "model.head",
                "--output",
                str(output),
                "--max-batches",
                "1",
            ]
        )
    tiny_config = tmp_path / "tiny.yaml"
    tiny_config.write_text(
        config.read_text()
        .replace("embed_dim: 96", "embed_dim: 32")
        .replace("depth: 6", "depth: 2")
        .replace("num_heads: 3", "num_heads: 2")
    )
    collect_main(
        [
            "--config",
            str(tiny_config),
            "--ckpt",
            str(checkpoint),
            "--layers",
            "model.blocks.*.mlp.fc1",
            "--output",
            str(output),
            "--max-batches",
            "2",
            "--fisher",
            "empirical",
        ]
    )
    stored = load_factors(output, model)
    assert stored.settings["fisher_type"] == "empirical" and len(stored.layers) == 2
    with pytest.raises(FactorFileError, match="model"):
        load_factors(output, NoisyLabelClassifier(model_kwargs={**tiny_vit_kwargs, "embed_dim": 16}))
    with pytest.raises(FileNotFoundError, match=r"--ckpt '/nope\.ckpt' does not exist"):
        collect_main(["--config", str(tiny_config), "--ckpt", "/nope.ckpt", "--layers", "x", "--output", "o"])


def _validate_factors(tmp_path: Path, tiny_vit_kwargs, devices: int) -> Path:
    callback = KFACFactors(
        layers=LAYERS, when="validate", dtype="float64", batch_size=16, output_dir=str(tmp_path / f"world{devices}")
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


def test_effective_rank():
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.zeros(3)) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "mean"}, ValueError, r"mode='mean' is not supported; choose one of \('expand', 'reduce'\)"),
        ({"fisher": "true"}, ValueError, r"fisher='true' is not supported"),
        ({"mc_samples": 0}, ValueError, r"mc_samples=0 must be a positive integer"),
        ({"fisher": "empirical", "mc_samples": 4}, ValueError, r"mc_samples=4: the empirical Fisher"),
        ({"when": "epoch"}, ValueError, r"when='epoch' is not supported"),
        ({"dataloader": "test"}, ValueError, r"dataloader='test' is not supported; choose one of \('train', 'val'\)"),
        ({"dtype": "float16"}, ValueError, r"dtype='float16' is not supported"),
        ({"layers": []}, ValueError, r"layers=\[\] is empty"),
        ({"layers": ["re:("]}, ValueError, r"not a valid regular expression"),
        ({"max_batches": 0}, ValueError, r"max_batches=0 must be a positive integer or None"),
        ({"adapter": "vit"}, TypeError, r"adapter must be a memcurve.curvature.FisherAdapter"),
    ],
)
def test_bad_arguments_fail_eagerly(kwargs, error, message):
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
    callback = KFACFactors(layers=layers, on_non_linear=on_non_linear)
    with pytest.raises(error, match=message):
        make_trainer(tmp_path, callback).fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits())
