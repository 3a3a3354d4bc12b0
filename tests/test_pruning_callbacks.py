"""KFACPruning / SVDPruning on real tiny runs: edited copies in their own folder, untouched originals, evaluation,
reports, TensorBoard, ``memcurve prune``, misconfiguration, and DDP = one process."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memcurve.callbacks import KFACFactors, KFACPruning, SVDPruning
from memcurve.cli import run
from memcurve.curvature import FactorSettings
from memcurve.data import NoisyLabelDataModule
from memcurve.editing import EDIT_KEY, EDITED_FOLDER, EditRequest
from memcurve.editing.request import layers_id
from memcurve.lightning_modules import NoisyLabelClassifier

EDITED = ["model.blocks.*.mlp.fc1", "model.blocks.*.mlp.fc2"]
CONFIG = Path(__file__).parents[1] / "configs" / "vit_digits_noisy.yaml"


def tiny_model(tiny_vit_kwargs) -> NoisyLabelClassifier:
    torch.manual_seed(0)
    return NoisyLabelClassifier(
        model_kwargs=tiny_vit_kwargs, lr=3e-3, warmup_epochs=0, memorization_eval_every_n_epochs=0
    )


def small_digits() -> NoisyLabelDataModule:
    return NoisyLabelDataModule(val_size=297, subset_size=150, val_subset_size=60, batch_size=50, eval_batch_size=75)


def fit(tmp_path: Path, model, callbacks, max_epochs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(save_last=True, save_top_k=-1, every_n_epochs=1), *callbacks],
    )
    trainer.fit(model, datamodule=small_digits())
    return trainer


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    text = CONFIG.read_text().replace("embed_dim: 96", "embed_dim: 32").replace("depth: 6", "depth: 2")
    text = text.replace("    augment: none", "    augment: none\n    subset_size: 150\n    val_subset_size: 60")
    path.write_text(text.replace("num_heads: 3", "num_heads: 2"))
    return path


def test_kfac_pruning_writes_separate_checkpoints_and_leaves_originals_and_live_model(
    tmp_path, tiny_vit_kwargs, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the run config's logger writes relative to the working directory
    model = tiny_model(tiny_vit_kwargs)
    factors = KFACFactors(layers=EDITED, settings=FactorSettings(position="cls", mc_samples=2), when="checkpoint")
    pruning = KFACPruning(layers=EDITED, energy=[0.6, 1.0], keep_fraction=0.05, when="checkpoint")
    trainer = fit(tmp_path, model, [factors, pruning])
    folder = Path(trainer.log_dir) / "checkpoints"
    last = folder / "last.ckpt"
    e06, e10, k005 = (
        EditRequest("kfac", EDITED, energy=0.6),
        EditRequest("kfac", EDITED, energy=1.0),
        EditRequest("kfac", EDITED, keep_fraction=0.05),
    )
    assert [request.tag for request in pruning.requests] == [e06.tag, e10.tag, k005.tag]
    assert e06.tag == f"kfac-e0.6-L{layers_id(EDITED)}"
    edited_folder = folder / EDITED_FOLDER  # outside the folder Lightning searches for last / best
    pruned = {request.tag: edited_folder / f"last-{request.tag}.ckpt" for request in (e06, e10, k005)}
    assert all(path.is_file() for path in pruned.values()), sorted(p.name for p in edited_folder.iterdir())
    assert (edited_folder / f"epoch=0-step=3-{e06.tag}.ckpt").is_file()  # every checkpoint gets its edited twins
    assert not any(folder.glob("*kfac*.ckpt"))  # nothing edited beside the originals
    original = torch.load(last, weights_only=False)["state_dict"]
    for key, value in model.state_dict().items():  # the live model is the original: pruning wrote copies only
        assert torch.equal(value, original[key]), key
    edited = torch.load(pruned[e06.tag], weights_only=False)
    assert edited[EDIT_KEY]["source"] == str(last) and edited[EDIT_KEY]["energy"] == 0.6
    assert edited[EDIT_KEY]["method"] == "kfac" and edited[EDIT_KEY]["layers"] == tuple(EDITED)
    changed = {key for key, value in edited["state_dict"].items() if not torch.equal(value, original[key])}
    assert changed == {f"model.blocks.{b}.mlp.fc{f}.weight" for b in (0, 1) for f in (1, 2)}
    rows = json.loads((Path(trainer.log_dir) / "pruning" / "pruning_report.json").read_text())
    assert len(rows) == 4 * 3  # 4 saves (epoch 0, last, epoch 1, last again) x 3 requests
    assert [row["tag"] for row in rows[:3]] == [e06.tag, e10.tag, k005.tag]
    assert len(pruning.rows) == 12 and pruning.rows[-1].tag == k005.tag  # the callback keeps its rows too
    by_request = {(row["energy"], row["keep_fraction"]): row for row in rows if row["source_checkpoint"] == str(last)}
    assert by_request[(0.6, None)]["edited_checkpoint"] == str(pruned[e06.tag])
    # Energy 1 keeps every pair with κ > 0; 150 CLS vectors leave A and G rank-deficient, so it is no identity.
    kept = [by_request[request]["kept_pairs"] for request in ((0.6, None), (None, 0.05), (1.0, None))]
    assert kept == sorted(kept) and kept[1] == pytest.approx(0.05 * 16384, abs=4)
    # Pruning the same file again, standalone with `memcurve prune`, never rewrites it.
    digest = sha256(last)
    again = tmp_path / "again"
    rows = run(
        ["prune", "--config", str(tiny_config(tmp_path)), "--ckpt_path", str(last), "--layers", "[model.head]",
         "--method", "[svd]", "--energy", "[0.5]", "--save", "true", "--output_dir", str(again)]
    )  # fmt: skip
    tag = EditRequest("svd", ["model.head"], energy=0.5).tag
    assert [row.tag for row in rows] == [tag] and rows[0].source_checkpoint == str(last)
    assert sha256(last) == digest and (again / "checkpoints" / f"last-{tag}.ckpt").is_file()
    assert rows[0].edited_checkpoint == str(again / "checkpoints" / f"last-{tag}.ckpt")


def test_pruned_checkpoint_loads_evaluates_and_matches_the_report(tmp_path, tiny_vit_kwargs):
    pruning = KFACPruning(layers=EDITED, keep_fraction=0.02, when="fit_end", factors="latest")
    factors = KFACFactors(layers=EDITED, settings=FactorSettings(position="cls"), when="fit_end")
    trainer = fit(tmp_path, tiny_model(tiny_vit_kwargs), [factors, pruning], max_epochs=1)
    request = EditRequest("kfac", EDITED, keep_fraction=0.02)
    pruned_path = Path(trainer.log_dir) / "checkpoints" / EDITED_FOLDER / f"fit-end-{request.tag}.ckpt"
    row = json.loads((Path(trainer.log_dir) / "pruning" / "pruning_report.json").read_text())[-1]
    assert row["edited_checkpoint"] == str(pruned_path) and 0 < row["kept_pairs"] < row["total_pairs"]
    assert row["kept_fraction"] == pytest.approx(0.02, abs=0.005)
    assert row["method"] == "kfac" and row["layers"] == EDITED and row["tag"] == request.tag
    reloaded = NoisyLabelClassifier.load_from_checkpoint(pruned_path)
    datamodule = small_digits()
    datamodule.setup("fit")
    assert reloaded.evaluation_metrics(datamodule) == pytest.approx(row["after"])
    assert set(row["before"]) == {"val/acc", "mem/noised_acc", "mem/gt_recovery", "mem/clean_train_acc"}
    events = EventAccumulator(str(next(Path(trainer.log_dir).glob("events.out.tfevents.*"))))
    events.Reload()
    curve = f"prune/kfac/keep_fraction/L{layers_id(EDITED)}"
    logged = {(e.step, round(e.value, 6)) for e in events.Scalars(f"{curve}/mem/noised_acc")}
    # The unedited model at step 0, the edit at its strength in parts per million.
    assert logged == {(0, round(row["before"]["mem/noised_acc"], 6)), (20000, round(row["after"]["mem/noised_acc"], 6))}
    assert [(e.step, e.value) for e in events.Scalars(f"{curve}/strength")] == [(20000, pytest.approx(0.02))]


def test_svd_pruning_same_interface(tmp_path, tiny_vit_kwargs):
    pruning = SVDPruning(layers=["model.blocks.1.mlp.fc2"], energy=0.5, when="fit_end", evaluate=False)
    trainer = fit(tmp_path, tiny_model(tiny_vit_kwargs), [pruning], max_epochs=1)
    tag = EditRequest("svd", ["model.blocks.1.mlp.fc2"], energy=0.5).tag
    pruned = torch.load(
        Path(trainer.log_dir) / "checkpoints" / EDITED_FOLDER / f"fit-end-{tag}.ckpt", weights_only=False
    )
    weight = pruned["state_dict"]["model.blocks.1.mlp.fc2.weight"]
    rank = int(torch.linalg.matrix_rank(weight.double(), rtol=1e-6))
    assert 0 < rank < min(weight.shape)
    assert pruning.rows[0].before == pruning.rows[0].after == {}  # evaluate=False: no metrics


def test_prune_command_reports_every_combination(tmp_path, tiny_vit_kwargs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    factors = KFACFactors(
        layers=EDITED, settings=FactorSettings(position="cls"), when="fit_end", output_dir=str(tmp_path)
    )
    trainer = fit(tmp_path, tiny_model(tiny_vit_kwargs), [factors], max_epochs=1)
    ckpt = Path(trainer.log_dir) / "checkpoints" / "last.ckpt"
    first = ["model.blocks.0.mlp.fc?"]
    second = ["model.blocks.1.mlp.fc1", "model.blocks.1.mlp.fc2"]
    methods = ("kfac", "kfac-separable", "svd")
    # One layer set through the --method shorthand, the other as a list of --edits.
    edits = ", ".join(
        f"{{method: {method}, layers: [{', '.join(second)}], energy: [0.9], keep_fraction: [0.01]}}"
        for method in methods
    )
    sweep = tmp_path / "sweep"
    rows = run(
        ["prune", "--config", str(tiny_config(tmp_path)), "--ckpt_path", str(ckpt),
         "--factors", str(tmp_path / "kfac-final.safetensors"), "--edits", f"[{edits}]",
         "--method", f"[{', '.join(methods)}]", "--layers", f"[{first[0]}]", "--energy", "[0.9]",
         "--keep_fraction", "[0.01]", "--output_dir", str(sweep)]
    )  # fmt: skip
    assert len(rows) == 2 * 3 * 2
    assert {(row.method, tuple(row.layers), row.energy, row.keep_fraction) for row in rows} == {
        (method, tuple(layers), *strength)
        for method in methods
        for layers in (first, second)
        for strength in ((0.9, None), (None, 0.01))
    }
    assert all(row.edited_checkpoint is None for row in rows) and not (sweep / "checkpoints").exists()  # --save false
    assert (sweep / "pruning_report.png").stat().st_size > 1000
    csv_lines = (sweep / "pruning_report.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 12 and "after mem/noised_acc" in csv_lines[0]
    assert "| unedited |" in (sweep / "pruning_report.md").read_text()
    assert len(json.loads((sweep / "pruning_report.json").read_text())) == 12
    events = EventAccumulator(str(next((sweep / "tensorboard").glob("events.out.tfevents.*"))))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for method in methods:  # one curve per method, strength kind and layer set
        for kind in ("energy", "keep_fraction"):
            for layers in (first, second):
                assert f"prune/{method}/{kind}/L{layers_id(layers)}/mem/noised_acc" in tags, sorted(tags)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"energy": 1.5}, ValueError, r"energy=1.5 must be in \(0, 1\]"),
        ({"energy": 0.0}, ValueError, r"energy=0.0 must be in \(0, 1\]"),
        ({"keep_fraction": -0.1}, ValueError, r"keep_fraction=-0.1 must be in \(0, 1\]"),
        ({}, ValueError, r"method='kfac' needs at least one energy or keep_fraction value; got none"),
        ({"energy": [0.6, 0.6]}, ValueError, r"the same edit is requested twice: \['kfac-e0.6-L"),
        ({"energy": 0.6, "method": "kfac-kronecker"}, ValueError, r"method='kfac-kronecker' is not supported"),
        ({"energy": 0.6, "method": "svd"}, ValueError, r"method='svd' is not supported"),
        ({"energy": 0.6, "when": "epoch"}, ValueError, r"when='epoch' is not supported"),
        ({"energy": 0.6, "factors": "/nope.safetensors"}, FileNotFoundError, r"factors='/nope.safetensors'"),
        ({"energy": 0.6, "layers": []}, ValueError, r"layers=\[\] must name at least one layer pattern"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        KFACPruning(**{"layers": EDITED, **kwargs})


def test_layers_without_factors_and_factors_of_another_model(tmp_path, tiny_vit_kwargs):
    factors = KFACFactors(layers=["model.blocks.0.mlp.fc1"], when="fit_end", output_dir=str(tmp_path))
    fit(tmp_path, tiny_model(tiny_vit_kwargs), [factors], max_epochs=1)
    path = tmp_path / "kfac-final.safetensors"
    pruning = KFACPruning(layers=["model.blocks.1.mlp.fc1"], factors=str(path), energy=0.6, when="fit_end")
    with pytest.raises(ValueError, match=r"model.blocks.1.mlp.fc1.*no factors"):
        fit(tmp_path, tiny_model(tiny_vit_kwargs), [pruning], max_epochs=1)
    other = NoisyLabelClassifier(model_kwargs={**tiny_vit_kwargs, "embed_dim": 16}, memorization_eval_every_n_epochs=0)
    pruning = KFACPruning(layers=["model.blocks.0.mlp.fc1"], factors=str(path), energy=0.6, when="fit_end")
    with pytest.raises(ValueError, match=r"in_features is 16 in the model, 32 in the file"):
        fit(tmp_path, other, [pruning], max_epochs=1)


def _fit_end_pruning_report(tmp_path: Path, tiny_vit_kwargs, devices: int) -> list[dict]:
    folder = tmp_path / f"world{devices}"
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=0,  # no training step: both runs prune the same (initial) weights
        limit_val_batches=0,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        logger=TensorBoardLogger(folder, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[
            KFACFactors(layers=EDITED, settings=FactorSettings(position="cls", dtype="float64"), when="fit_end"),
            KFACPruning(layers=EDITED, keep_fraction=0.05, when="fit_end", output_dir=str(folder / "pruning")),
        ],
    )
    trainer.fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits())
    return json.loads((folder / "pruning" / "pruning_report.json").read_text())


def test_two_gloo_processes_report_the_single_process_pruning(tmp_path, tiny_vit_kwargs):
    """Under DDP rank zero scores the checkpoint alone (its metrics must not wait for the other rank) and gets
    the figures of one process."""
    single = _fit_end_pruning_report(tmp_path, tiny_vit_kwargs, devices=1)
    double = _fit_end_pruning_report(tmp_path, tiny_vit_kwargs, devices=2)
    assert len(single) == len(double) == 1
    for key in ("before", "after"):
        assert single[0][key].keys() == double[0][key].keys()
        for metric, value in single[0][key].items():
            assert double[0][key][metric] == pytest.approx(value, abs=1e-6), (key, metric)
