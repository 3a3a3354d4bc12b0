"""The ``memcurve`` command: its help lists every subcommand, every subcommand takes ``--help`` and ``--print_config``,
and one chain on a tiny digits ViT (fit → factors → probe → prune → compare → edit) and one on a tiny OLMo-2 saved as
a HF folder (factors on plain text → edit → reload and generate)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from memcurve.cli import COMMANDS, main, run
from memcurve.curvature import load_factors
from memcurve.editing import EDIT_KEY

CONFIGS = Path(__file__).parents[1] / "configs"
DIGITS = CONFIGS / "vit_digits_noisy.yaml"
SWEEP = CONFIGS / "protocol" / "vit_digits_augmented_sweep.yaml"
TINY_VIT = {"img_size": 8, "in_chans": 1, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}
FC2 = "[model.blocks.*.mlp.fc2]"
UP_PROJ = "[model.model.layers.*.mlp.up_proj]"


def tiny_digits_config(folder: Path) -> Path:
    """The digits config, shrunk: a 2-block ViT, 2 epochs on 200 images, checkpoints only (no analysis callbacks)."""
    config = yaml.safe_load(DIGITS.read_text())
    config["trainer"]["callbacks"] = [
        callback for callback in config["trainer"]["callbacks"] if callback["class_path"].endswith("ModelCheckpoint")
    ]
    config["trainer"] |= {
        "accelerator": "cpu",
        "max_epochs": 2,
        "check_val_every_n_epoch": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    config["model"]["init_args"] |= {"model_kwargs": dict(TINY_VIT), "warmup_epochs": 1}
    config["data"]["init_args"] |= {"subset_size": 200, "val_subset_size": 64, "batch_size": 64}
    path = folder / "tiny_digits.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -- help and --print_config ---------------------------------------------------------------------------------------
def test_memcurve_help_lists_every_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "memcurve.cli", "--help"], capture_output=True, text=True, check=True, timeout=120
    )
    listed = [line.split()[0] for line in result.stdout.split("commands:\n")[1].splitlines() if line.startswith("  ")]
    expected = ["fit", "validate", "test", "factors", "probe", "prune", "compare", "sweep", "edit"]
    assert listed == list(COMMANDS) == expected


def test_unknown_subcommand_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["train"])
    assert exit_info.value.code == 2
    assert "unknown command 'train'" in capsys.readouterr().err


# (command, extra arguments, what the printed configuration must hold)
PRINT_CONFIG = [
    ("fit", ["--config", str(DIGITS), "--trainer.max_epochs=3"], "max_epochs: 3"),
    ("validate", ["--config", str(DIGITS), "--trainer.limit_val_batches=2"], "limit_val_batches: 2"),
    ("test", ["--config", str(DIGITS)], "NoisyLabelDataModule"),
    ("factors", ["--config", str(DIGITS), "--layers", FC2, "--settings.position", "cls"], "position: cls"),
    ("factors", ["--text", "corpus.txt", "--model", "some/model", "--block_size", "32"], "block_size: 32"),
    ("probe", ["--config", str(DIGITS), "--factors", "kfac.safetensors", "--bands", "[0.2]"], "factors: kfac"),
    ("prune", ["--config", str(DIGITS), "--method", "[kfac, svd]", "--energy", "[0.6]"], "- svd"),
    ("compare", ["--config", str(DIGITS), "--edits", "[{method: bsn, layers: [x], ratio: [0.1]}]"], "method: bsn"),
    ("sweep", ["--config", str(SWEEP), "--seeds", "[3, 4]"], "- 4"),
    ("edit", ["--source", "in.ckpt", "--output", "out.ckpt", "--layers", FC2, "--energy", "0.6"], "energy: 0.6"),
]


@pytest.mark.parametrize(
    ("command", "arguments", "expected"),
    PRINT_CONFIG,
    ids=["fit", "validate", "test", "factors", "factors-hf", "probe", "prune", "compare", "sweep", "edit"],
)
def test_every_subcommand_prints_its_config(command, arguments, expected, capsys, tmp_path, monkeypatch):
    """Through the console entry point (``main`` reads ``sys.argv``), without Lightning's args-and-argv warning."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["memcurve", command, *arguments, "--print_config"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit) as exit_info:
        warnings.simplefilter("always")
        main()
    assert exit_info.value.code in (0, None)
    assert not [w for w in caught if "args parameter" in str(w.message)]
    printed = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(printed, dict) and expected in yaml.safe_dump(printed)
    assert not list(tmp_path.iterdir())  # printing the configuration runs nothing and writes nothing


def test_hf_factors_take_their_options_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "hf_factors.yaml"
    options = {"model": "some/model", "text": "corpus.txt", "layers": ["model.model.layers.*.mlp.up_proj"]}
    config.write_text(yaml.safe_dump(options | {"output_dir": "kfac", "settings": {"max_samples": 64}}))
    with pytest.raises(SystemExit):
        run(["factors", "--config", str(config), "--block_size", "32", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed.items() >= options.items() and printed["block_size"] == 32
    assert printed["settings"]["max_samples"] == 64 and printed["settings"]["position"] == "all"


@pytest.mark.parametrize("command", [*COMMANDS, "factors --text corpus.txt"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run([*command.split(), "--help"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "--config" in printed and "--print_config" in printed
    flags = {
        "factors": "--settings.position",  # FactorSettings | None: --settings.help lists its fields
        "factors --text corpus.txt": "--block_size",
        "probe": "--bands",
        "prune": "--bsn.epochs",
        "compare": "--edits",
        "sweep": "--budgets.max_accuracy_drop",
        "edit": "--overwrite",
    }
    assert flags.get(command, "--trainer.max_epochs") in printed


# -- one chain on a tiny digits ViT ---------------------------------------------------------------------------------
def test_fit_factors_probe_prune_compare_edit_on_a_tiny_vit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", str(tiny_digits_config(tmp_path))])
    assert cli.trainer.current_epoch == 2
    run_dir = tmp_path / "runs" / "vit_digits_noisy" / "version_0"
    config, ckpt = str(run_dir / "config.yaml"), str(run_dir / "checkpoints" / "last.ckpt")
    assert Path(ckpt).is_file()
    common = ["--config", config, "--ckpt_path", ckpt]

    # factors: the run config's Trainer, with its settings overridden from the command line
    trainers: list[pl.Trainer] = []
    validate = pl.Trainer.validate

    def spy(trainer: pl.Trainer, *args, **kwargs):
        trainers.append(trainer)
        return validate(trainer, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "validate", spy)
    factors = run(
        ["factors", *common, "--layers", FC2, "--settings.position", "cls", "--settings.max_samples", "64",
         "--trainer.limit_val_batches", "1", "--trainer.precision", "bf16-mixed"]
    )  # fmt: skip
    (trainer,) = trainers
    assert trainer.limit_val_batches == 1 and trainer.num_val_batches == [1]
    assert trainer.precision == "bf16-mixed"
    # the config's logger (a new version beside the run) and the callback's default file name
    assert factors.resolve() == run_dir.parent / "version_1" / "kfac" / "kfac.safetensors"
    stored = load_factors(factors)
    assert sorted(stored.layers) == ["model.blocks.0.mlp.fc2", "model.blocks.1.mlp.fc2"]
    assert stored.settings["position"] == "cls"
    with pytest.raises(RuntimeError, match=r"memcurve factors: nothing was written.*limit_val_batches=0"):
        run(["factors", *common, "--layers", FC2, "--trainer.limit_val_batches", "0"])

    probe = run(["probe", *common, "--factors", str(factors), "--output_dir", str(tmp_path / "probe")])
    assert probe.is_file() and probe.parent == tmp_path / "probe"

    out = tmp_path / "prune"
    rows = run(
        ["prune", *common, "--factors", str(factors), "--method", "[kfac, svd]", "--layers", FC2,
         "--keep_fraction", "[0.05, 0.5]", "--save", "true", "--output_dir", str(out)]
    )  # fmt: skip
    assert [(row.method, row.keep_fraction) for row in rows] == [
        ("kfac", 0.05),
        ("kfac", 0.5),
        ("svd", 0.05),
        ("svd", 0.5),
    ]
    assert all(row.before["val/acc"] == rows[0].before["val/acc"] and "mem/noised_acc" in row.after for row in rows)
    for suffix in ("json", "csv", "md", "png"):
        assert (out / f"pruning_report.{suffix}").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    edited = sorted((out / "checkpoints").glob("*.ckpt"))
    assert [Path(row.edited_checkpoint) for row in rows] == [out / "checkpoints" / f"last-{r.tag}.ckpt" for r in rows]
    assert sorted(Path(row.edited_checkpoint) for row in rows) == edited
    assert torch.load(edited[0], weights_only=False)[EDIT_KEY]["source"] == ckpt

    edits = tmp_path / "edits.yaml"
    edits.write_text(
        yaml.safe_dump(
            {
                "edits": [
                    {"method": "kfac", "layers": ["model.blocks.*.mlp.fc2"], "energy": [0.6]},
                    {"method": "svd", "layers": ["model.blocks.*.mlp.fc2"], "keep_fraction": [0.1]},
                    {"method": "bsn", "layers": ["model.blocks.*.mlp.fc2"], "ratio": [0.05]},
                ],
                "bsn": {"epochs": 1, "max_retain": 16},
            }
        )
    )
    compared = run(["compare", *common, "--config", str(edits), "--factors", str(factors), "--output_dir", "compare"])
    assert [row.method for row in compared] == ["kfac", "svd", "bsn"]
    table = (tmp_path / "compare" / "comparison.md").read_text()
    assert "| – | unedited |" in table and "| bsn | ratio 0.05 |" in table
    assert not (tmp_path / "compare" / "checkpoints").exists()  # --save defaults to false

    command = ["edit", "--source", ckpt, "--output", "edited.ckpt", "--factors", str(factors), "--layers", FC2]
    record = run([*command, "--energy", "0.6"])
    assert sorted(record["layers"]) == ["model.blocks.0.mlp.fc2", "model.blocks.1.mlp.fc2"]
    assert torch.load("edited.ckpt", weights_only=False)[EDIT_KEY]["energy"] == 0.6
    with pytest.raises(FileExistsError, match="already exists"):
        run([*command, "--energy", "0.5"])
    run([*command, "--energy", "0.5", "--overwrite", "true"])
    assert torch.load("edited.ckpt", weights_only=False)[EDIT_KEY]["energy"] == 0.5
    assert "memcurve edit: kfac on 2 layers" in capsys.readouterr().out


# -- the direct Hugging Face path ----------------------------------------------------------------------------------
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Curvature tells which directions of the weights the data care about.",
    "Memorized examples hide in the flat directions of the loss.",
    "Pretrained language models recite famous quotes word for word.",
]


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    """A tiny OLMo-2 built from its config and a BPE trained offline, saved like a Hugging Face model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from memcurve.data.text_sources import EOS_TOKEN, build_tokenizer

    folder = tmp_path / "tiny_olmo2"
    backend = build_tokenizer("train", SENTENCES * 4, vocab_size=300).backend_tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN)
    tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model(
        "olmo2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_factors_then_edit_of_a_hf_folder(hf_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.chdir(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(SENTENCES * 3) + "\n")
    factors = run(
        ["factors", "--model", str(hf_folder), "--text", str(text), "--layers", UP_PROJ,
         "--output_dir", str(tmp_path / "kfac"), "--block_size", "32", "--accelerator", "cpu"]
    )  # fmt: skip
    assert factors == tmp_path / "kfac" / "kfac.safetensors"
    assert sorted(load_factors(factors).layers) == [f"model.model.layers.{i}.mlp.up_proj" for i in (0, 1)]

    out = tmp_path / "edited"
    record = run(
        ["edit", "--source", str(hf_folder), "--output", str(out), "--factors", str(factors), "--layers", UP_PROJ,
         "--energy", "0.6"]
    )  # fmt: skip
    assert record["method"] == "kfac" and record["prefix"] == "model." and record["tokenizer"]
    assert json.loads((out / "memcurve_edit.json").read_text())["layers"].keys() == {
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.up_proj",
    }
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = tokenizer("The quick brown fox", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    original = AutoModelForCausalLM.from_pretrained(hf_folder).state_dict()
    edited = model.state_dict()
    assert edited.keys() == original.keys()
    changed = {key for key in original if not torch.equal(original[key], edited[key])}
    assert changed == {f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)}
