"""Every config instantiates (``memcurve.cli.instantiate``); ``memcurve fit`` trains end to end and prints its
summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from memcurve.cli import instantiate, run
from memcurve.curvature import load_factors
from memcurve.data import NoisyLabelDataModule
from memcurve.lightning_modules import NoisyLabelClassifier

SWEEPS = sorted((Path(__file__).parents[1] / "configs").glob("*_sweep.yaml"))  # `memcurve sweep` configs
CONFIGS = sorted(set((Path(__file__).parents[1] / "configs").glob("*.yaml")) - set(SWEEPS))
# GPU configs are instantiated on CPU here; the rest of each config is exactly what users run.
ON_CPU = {"trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.strategy": "auto"}
DIGITS = CONFIGS[[p.name for p in CONFIGS].index("vit_digits_noisy.yaml")]


def instantiate_with(config: Path, folder: Path, overrides: dict) -> object:
    """``instantiate`` of ``config`` with the settings at dotted keys replaced (as ``--trainer.devices=1`` would)."""
    settings = yaml.safe_load(config.read_text())
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        section = settings
        for key in parents:
            section = section.setdefault(key, {})
        section[last] = value
    path = folder / f"{config.stem}-overridden.yaml"
    path.write_text(yaml.safe_dump(settings))
    return instantiate(path)


def test_there_are_configs():
    assert {path.name for path in CONFIGS} >= {
        "vit_digits_noisy.yaml",
        "vit_fashion_mnist_noisy.yaml",
        "vit_cifar10_noisy.yaml",
        "vit_base_imagenet_noisy.yaml",
    }


VIT_CONFIGS = [path for path in CONFIGS if path.name.startswith("vit_")]
LM_CONFIGS = [path for path in CONFIGS if path.name.startswith("olmo2_")]
# Hub models are never downloaded in tests: a tiny OLMo-2 stands in for them (the rest is what users run).
TINY_OLMO2 = {
    "model_type": "olmo2",
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 1024,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}


def test_every_config_is_tested():
    assert set(VIT_CONFIGS) | set(LM_CONFIGS) == set(CONFIGS)
    assert {path.name for path in LM_CONFIGS} >= {
        "olmo2_tiny_canaries.yaml",
        "olmo2_1b_eval.yaml",
        "olmo2_7b_eval.yaml",
    }


@pytest.mark.parametrize("config", LM_CONFIGS, ids=[path.stem for path in LM_CONFIGS])
def test_lm_config_instantiates(config, tmp_path, monkeypatch):
    from memcurve.data import CanaryTextDataModule
    from memcurve.lightning_modules import CausalLMModule

    monkeypatch.chdir(tmp_path)
    overrides = ON_CPU | {"trainer.precision": "32-true"}
    if "tiny" not in config.name:
        overrides["model.init_args.model"] = dict(TINY_OLMO2)
    cli = instantiate_with(config, tmp_path, overrides)
    assert isinstance(cli.model, CausalLMModule)
    assert isinstance(cli.datamodule, CanaryTextDataModule)
    if "tiny" in config.name:  # the embedded data builds offline and fits the model
        cli.datamodule.setup("fit")
        cli.model.check_compatible(cli.datamodule)
        assert cli.datamodule.vocab_size == cli.model.model.config.vocab_size == 2048


@pytest.mark.parametrize("config", VIT_CONFIGS, ids=[path.stem for path in VIT_CONFIGS])
def test_config_instantiates(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = instantiate_with(config, tmp_path, ON_CPU)
    assert isinstance(cli.model, NoisyLabelClassifier)
    assert isinstance(cli.datamodule, NoisyLabelDataModule)
    # Static facts of the data must fit the model (imagefolder/hf only know theirs after loading).
    cli.model.check_compatible(cli.datamodule)
    if cli.datamodule.source == "digits":
        cli.datamodule.setup("fit")
        cli.model.check_compatible(cli.datamodule)


def test_cli_fit_writes_logs_noise_and_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = {"img_size": 8, "in_chans": 1, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}
    cli = run(
        [
            "fit",
            "--config",
            str(DIGITS),
            "--trainer.max_epochs=2",
            "--trainer.check_val_every_n_epoch=1",
            "--trainer.enable_progress_bar=false",
            f"--model.init_args.model_kwargs={json.dumps(tiny)}",
            "--data.init_args.subset_size=200",
        ]
    )
    printed = capsys.readouterr().out
    assert "mem/noised_acc" in printed and "val/acc" in printed and "tensorboard --logdir runs" in printed
    run_dir = tmp_path / "runs" / "vit_digits_noisy" / "version_0"
    assert (run_dir / "label_noise.json").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
    # The config's KFACFactors callback wrote CLS-only factors of all 4 MLP projections (depth 2) at fit end.
    factors = load_factors(run_dir / "kfac" / "kfac-final.safetensors")
    assert len(factors.layers) == 4 and factors.settings["position"] == "cls" and factors.settings["mc_samples"] == 4
    assert "KFACFactors:" in printed
    assert cli.trainer.current_epoch == 2  # run returns the LightningCLI it ran


def test_cli_rejects_bad_config_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"noise_fraction=1.5 must be a number in \[0, 1\)"):
        instantiate_with(DIGITS, tmp_path, {"data.init_args.noise_fraction": 1.5})
    with pytest.raises(ValueError, match=r"noise_fraction=1.5 must be a number in \[0, 1\)"):
        run(["fit", "--config", str(DIGITS), "--data.init_args.noise_fraction=1.5"])


def test_counts_in_configs_stay_integers(tmp_path, monkeypatch):
    """``val_size: 297`` is a count; a float 297.0 would be read as a fraction and rejected."""
    monkeypatch.chdir(tmp_path)
    cli = instantiate(DIGITS)
    assert cli.datamodule.val_size == 297 and isinstance(cli.datamodule.val_size, int)


# -- the held-out protocol's configs: run configs (one per seed) and the sweeps over them ---------------------------
PROTOCOL = Path(__file__).parents[1] / "configs" / "protocol"
PROTOCOL_SWEEPS = sorted(PROTOCOL.glob("*_sweep.yaml"))
PROTOCOL_RUNS = sorted(set(PROTOCOL.glob("*.yaml")) - set(PROTOCOL_SWEEPS))
PROTOCOL_ORACLES = sorted(PROTOCOL.glob("*_oracle.yaml"))  # never-trained references: runs without a sweep of their own


def test_every_protocol_run_has_a_sweep():
    runs = {yaml.safe_load(path.read_text())["run_config"] for path in PROTOCOL_SWEEPS}
    analysed = {f"configs/protocol/{path.name}" for path in PROTOCOL_RUNS if path not in PROTOCOL_ORACLES}
    assert runs == analysed and len(PROTOCOL_SWEEPS) == 3
    for oracle in PROTOCOL_ORACLES:  # each oracle is the run of a sweep with the planted items left out
        assert PROTOCOL / oracle.name.replace("_oracle", "") in PROTOCOL_RUNS


@pytest.mark.parametrize("config", PROTOCOL_RUNS, ids=[path.stem for path in PROTOCOL_RUNS])
def test_protocol_run_config_instantiates_per_seed(config, tmp_path, monkeypatch):
    """Training only (the sweep analyses), last.ckpt only (no checkpoint chosen on held-out data), one seed → the
    data seed, the global seed and the run folder."""
    from memcurve.cli import DEFAULT_SEED_OVERRIDES, _run_cli

    monkeypatch.chdir(tmp_path)
    settings = yaml.safe_load(config.read_text())
    kinds = [callback["class_path"].rsplit(".", 1)[-1] for callback in settings["trainer"]["callbacks"]]
    assert kinds == ["ModelCheckpoint", "LearningRateMonitor"]
    assert settings["trainer"]["callbacks"][0]["init_args"]["save_top_k"] == 0
    cli = _run_cli(
        "sweep", lambda parser: None, ["--config", str(config), *(o.format(seed=2) for o in DEFAULT_SEED_OVERRIDES)]
    )
    assert cli.config["seed_everything"] == 2 and cli.datamodule.seed == 2
    assert cli.config["trainer"]["logger"]["init_args"]["version"] == "seed2"


@pytest.mark.parametrize("sweep", PROTOCOL_SWEEPS, ids=[path.stem for path in PROTOCOL_SWEEPS])
def test_protocol_sweep_config_parses(sweep, capsys, monkeypatch):
    from memcurve.cli import BudgetGrid, EditSpec

    monkeypatch.chdir(Path(__file__).parents[1])
    with pytest.raises(SystemExit):
        run(["sweep", "--config", str(sweep), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert Path(printed["run_config"]).is_file() and printed["seeds"] == [0, 1, 2]
    assert "{seed}" in printed["checkpoints"] and printed["output_dir"].startswith("runs/protocol/sweeps/")
    assert len(BudgetGrid(**printed["budgets"]).budgets()) == 3
    specs = [EditSpec(**edit) for edit in printed["edits"]]
    assert {spec.method for spec in specs} >= {"kfac", "svd"} and all(spec.requests() for spec in specs)


@pytest.mark.parametrize("config", SWEEPS, ids=[path.stem for path in SWEEPS])
def test_sweep_configs_parse_and_name_a_run_config(config, capsys):
    with pytest.raises(SystemExit):
        run(["sweep", "--config", str(config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert Path(__file__).parents[1] / printed["run_config"] in CONFIGS and printed["edits"]
