"""``memcurve compare``: every method on one checkpoint, one table (markdown, CSV, JSON, figure, TensorBoard), one
unedited score, untouched original; one method vocabulary; misconfiguration before any work."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memcurve.callbacks import KFACFactors
from memcurve.cli import EditSpec, instantiate, run
from memcurve.curvature import FactorSettings
from memcurve.data import NoisyLabelDataModule
from memcurve.editing import METHODS, EditRequest
from memcurve.editing.request import layers_id
from memcurve.lightning_modules import NoisyLabelClassifier

CONFIG = Path(__file__).parents[1] / "configs" / "vit_digits_noisy.yaml"
LAYERS = ["model.blocks.*.mlp.fc1", "model.blocks.*.mlp.fc2"]
YAML_LAYERS = f"[{', '.join(LAYERS)}]"
TINY_VIT_KWARGS = {"img_size": 8, "in_chans": 1, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """The run config's logger (save_dir: runs) is relative: keep it inside the test's folder."""
    monkeypatch.chdir(tmp_path)


def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    text = CONFIG.read_text().replace("embed_dim: 96", "embed_dim: 32").replace("depth: 6", "depth: 2")
    text = text.replace("    augment: none", "    augment: none\n    subset_size: 150\n    val_subset_size: 60")
    path.write_text(text.replace("num_heads: 3", "num_heads: 2"))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, one_thread) -> tuple[Path, Path, Path]:
    """A tiny digits ViT fitted for one epoch: (config, last.ckpt, K-FAC factor file)."""
    tmp_path = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = NoisyLabelClassifier(
        model_kwargs=dict(TINY_VIT_KWARGS), lr=3e-3, warmup_epochs=0, memorization_eval_every_n_epochs=0
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            ModelCheckpoint(save_last=True, save_top_k=-1, every_n_epochs=1),
            KFACFactors(
                layers=LAYERS, settings=FactorSettings(position="cls"), when="fit_end", output_dir=str(tmp_path)
            ),
        ],
    )
    datamodule = NoisyLabelDataModule(
        val_size=297, subset_size=150, val_subset_size=60, batch_size=50, eval_batch_size=75
    )
    trainer.fit(model, datamodule=datamodule)
    ckpt = Path(trainer.log_dir) / "checkpoints" / "last.ckpt"
    return tiny_config(tmp_path), ckpt, tmp_path / "kfac-final.safetensors"


def test_compare_runs_every_method_on_one_checkpoint(fitted, tmp_path, monkeypatch):
    config, ckpt, factors = fitted
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    calls = []
    evaluate = NoisyLabelClassifier.evaluation_metrics

    def counting(self, *args, **kwargs):
        calls.append(1)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(NoisyLabelClassifier, "evaluation_metrics", counting)
    output = tmp_path / "comparison"
    edits = (
        f"[{{method: kfac, layers: {YAML_LAYERS}, energy: [0.9], keep_fraction: [0.02]}}, "
        f"{{method: svd, layers: {YAML_LAYERS}, keep_fraction: [0.1]}}]"
    )
    # kfac and svd as a list of edits, bsn through the --method shorthand (its strength: --ratio).
    rows = run(
        ["compare", "--config", str(config), "--ckpt_path", str(ckpt), "--factors", str(factors),
         "--edits", edits, "--method", "[bsn]", "--layers", YAML_LAYERS, "--ratio", "[0.01]",
         "--bsn.epochs", "2", "--output_dir", str(output), "--save", "true"]
    )  # fmt: skip
    requests = [
        EditRequest("kfac", LAYERS, energy=0.9),
        EditRequest("kfac", LAYERS, keep_fraction=0.02),
        EditRequest("svd", LAYERS, keep_fraction=0.1),
        EditRequest("bsn", LAYERS, ratio=0.01),
    ]
    assert [(row.method, row.energy, row.keep_fraction, row.ratio) for row in rows] == [
        ("kfac", 0.9, None, None),
        ("kfac", None, 0.02, None),
        ("svd", None, 0.1, None),
        ("bsn", None, None, 0.01),
    ]
    assert [row.tag for row in rows] == [request.tag for request in requests]
    assert len(calls) == 1 + len(rows)  # the unedited model is scored once, shared by every row
    assert all(row.before == rows[0].before and row.after for row in rows)
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    assert [row.edited_checkpoint for row in rows] == [
        str(output / "checkpoints" / f"last-{request.tag}.ckpt") for request in requests
    ]
    assert all(Path(row.edited_checkpoint).is_file() for row in rows)
    bsn = rows[-1]
    assert bsn.total_pairs - bsn.kept_pairs == 4 * 41  # round(0.01 · 4096) weights in each of the 4 layers

    table = (output / "comparison.md").read_text()
    assert table.splitlines()[0] == "| layers | method | setting | kept | rel. change | val/acc | mem | GT | clean |"
    cells = ["| unedited |", "| kfac | energy 0.9 |", "| kfac | keep fraction 0.02 |", "| svd | keep fraction 0.1 |"]
    cells.append("| bsn | ratio 0.01 |")
    assert all(cell in table for cell in cells), table
    with open(output / "comparison.csv") as handle:
        records = list(csv.DictReader(handle))
    assert [record["method"] for record in records] == ["kfac", "kfac", "svd", "bsn"]
    assert float(records[-1]["after mem/noised_acc"]) == pytest.approx(bsn.after["mem/noised_acc"])
    assert float(records[0]["before val/acc"]) == pytest.approx(rows[0].before["val/acc"])
    assert [record["tag"] for record in json.loads((output / "comparison.json").read_text())] == [
        request.tag for request in requests
    ]
    assert (output / "comparison.png").stat().st_size > 1000
    events = EventAccumulator(str(next((output / "tensorboard").glob("events.out.tfevents.*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    curves = {
        (request.method, request.strength[0]): f"compare/{request.method}/{request.strength[0]}/L{layers_id(LAYERS)}"
        for request in requests
    }
    for curve in curves.values():
        assert f"{curve}/mem/gt_recovery" in tags, sorted(tags)
    # The unedited model at step 0, the edit at its strength in parts per million.
    assert [event.step for event in events.Scalars(f"{curves['kfac', 'energy']}/val/acc")] == [0, 900_000]
    assert [event.step for event in events.Scalars(f"{curves['bsn', 'ratio']}/val/acc")] == [0, 10_000]
    assert "compare/figure" in events.Tags()["images"]


def test_edit_specs_use_the_one_method_vocabulary():
    assert METHODS == ("kfac", "kfac-separable", "svd", "bsn")
    assert EditSpec("kfac", LAYERS, energy=[0.9], keep_fraction=[0.02]).requests() == [
        EditRequest("kfac", LAYERS, energy=0.9),
        EditRequest("kfac", LAYERS, keep_fraction=0.02),
    ]
    assert EditSpec("bsn", LAYERS, ratio=[0.01]).requests() == [EditRequest("bsn", LAYERS, ratio=0.01)]
    for old in ("kfac-kronecker", "balanced_subnet"):  # the old aliases are gone
        with pytest.raises(ValueError, match=rf"method='{old}' is not supported; choose one of"):
            EditSpec(old, LAYERS, energy=[0.9]).requests()


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (["--method", "[kfac, lora]", "--energy", "[0.9]"], ValueError, r"method='lora' is not supported"),
        (["--method", "[kfac-kronecker]", "--energy", "[0.9]"], ValueError, r"method='kfac-kronecker' is not"),
        ([], ValueError, r"nothing to edit: give --edits"),
        (["--method", "[kfac]"], ValueError, r"method='kfac' needs at least one energy or keep_fraction value"),
        (["--method", "[svd]", "--ratio", "[0.1]"], ValueError, r"method='svd' needs at least one energy"),
        (["--method", "[kfac, kfac]", "--energy", "[0.9]"], ValueError, r"the same edit is requested twice"),
        (["--method", "[bsn]", "--ratio", "[1.5]"], ValueError, r"ratio=1.5 must be a number in \(0, 1\)"),
        (["--method", "[bsn]", "--ratio", "[0]"], ValueError, r"ratio=0.0 must be a number in \(0, 1\)"),
        (["--method", "[bsn]"], ValueError, r"method='bsn' needs at least one ratio value"),
        (["--method", "[bsn]", "--ratio", "[0.01]", "--bsn.retain_weight", "2"], ValueError,
         r"retain_weight=2.0 must be a number in \[0.0, 1.0\]"),
        (["--method", "[bsn]", "--ratio", "[0.01]", "--bsn.epochs", "0"], ValueError,
         r"epochs=0 must be a positive integer"),
        (["--edits", "[{method: bsn, layers: [model.head], energy: [0.5]}]"], ValueError, r"method='bsn' takes ratio"),
        (["--edits", "[{method: svd, layers: [model.head], ratio: [0.5]}]"], ValueError, r"ratio=0.5 is Balanced"),
        (["--method", "[bsn]", "--ratio", "[0.01]", "--layers", "[]"], ValueError, r"--method needs --layers"),
        (["--energy", "[0.9]"], ValueError, r"shorthand of --method: give --method too"),
        (["--method", "[svd]", "--energy", "[0.9]", "--ckpt_path", "/nope.ckpt"], FileNotFoundError,
         r"--ckpt_path '/nope.ckpt' does not exist"),
        (["--method", "[svd]", "--energy", "[0.9]", "--factors", "/nope.safetensors"], FileNotFoundError,
         r"--factors '/nope.safetensors' does not exist"),
        (["--method", "[svd]", "--energy", "[0.9]", "--ckpt_path", None], ValueError,
         r"without --ckpt_path .* give --output_dir"),
    ],
)  # fmt: skip
def test_misconfiguration_fails_before_loading_anything(tmp_path, arguments, error, message):
    arguments = list(arguments)
    base = ["compare", "--config", str(tiny_config(tmp_path))]
    if "--method" in arguments and "--layers" not in arguments:
        base += ["--layers", YAML_LAYERS]
    if "--ckpt_path" in arguments:
        at = arguments.index("--ckpt_path")
        if arguments[at + 1] is None:  # no checkpoint at all
            del arguments[at : at + 2]
    else:
        ckpt = tmp_path / "model.ckpt"
        ckpt.write_bytes(b"")  # never loaded: the arguments are checked first
        base += ["--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(error, match=message):
        run(base + arguments)
    assert not (tmp_path / "out").exists()


def test_compare_bsn_needs_a_forget_set(fitted, tmp_path):
    config, ckpt, _ = fitted
    text = config.read_text().replace("noise_fraction: 0.1", "noise_fraction: 0.0")
    clean = tmp_path / "clean.yaml"
    clean.write_text(text)
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint.pop("NoisyLabelDataModule", None)  # its recorded noise would (rightly) contradict the clean config
    clean_ckpt = tmp_path / "clean.ckpt"
    torch.save(checkpoint, clean_ckpt)
    with pytest.raises(ValueError, match=r"no noised examples \(noise_fraction=0\): BalancedSubnet needs a forget set"):
        run(
            ["compare", "--config", str(clean), "--ckpt_path", str(clean_ckpt), "--method", "[bsn]",
             "--layers", YAML_LAYERS, "--ratio", "[0.01]", "--evaluate", "false", "--output_dir", str(tmp_path / "out")]
        )  # fmt: skip


def test_compare_scores_a_module_without_evaluation_metrics_by_its_own_validation(fitted, tmp_path, monkeypatch):
    """The default scorer: the module's own validation loop (here with its epoch-end memorization pass, which reads
    ``self.trainer.datamodule``) on the unedited and the edited weights, reporting every metric it logs."""
    config, ckpt, _ = fitted
    monkeypatch.delattr(NoisyLabelClassifier, "evaluation_metrics")
    output = tmp_path / "by-validation"
    rows = run(
        ["compare", "--config", str(config), "--ckpt_path", str(ckpt), "--method", "[svd]", "--layers", YAML_LAYERS,
         "--keep_fraction", "[0.05]", "--output_dir", str(output)]
    )  # fmt: skip
    assert {"val/loss", "val/acc", "mem/noised_acc"} <= set(rows[0].before) == set(rows[0].after)
    assert rows[0].after != rows[0].before
    built = instantiate(config)  # the same module and data, validated the ordinary way
    built.model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    expected = trainer.validate(built.model, datamodule=built.datamodule, verbose=False)[0]
    assert rows[0].before == pytest.approx(expected)  # exactly what validating the checkpoint gives


def test_an_existing_report_is_refused_unless_overwrite(fitted, tmp_path):
    config, ckpt, _ = fitted
    output = tmp_path / "comparison"
    output.mkdir()
    (output / "comparison.json").write_text("[]")
    arguments = ["compare", "--config", str(config), "--ckpt_path", str(ckpt), "--method", "[svd]", "--layers",
                 YAML_LAYERS, "--energy", "[0.5]", "--evaluate", "false", "--output_dir", str(output)]  # fmt: skip
    with pytest.raises(FileExistsError, match=r"--output_dir '.*comparison' already holds a report \(comparison\.json"):
        run(arguments)
    assert (output / "comparison.json").read_text() == "[]"
    assert [row.method for row in run([*arguments, "--overwrite", "true"])] == ["svd"]
    assert len(json.loads((output / "comparison.json").read_text())) == 1
