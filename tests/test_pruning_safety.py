"""Nothing is lost, shadowed or done too late when pruning (issue 14): one regression test per data-loss case of the
bad-input audit, each failing on the code before it (commit 9e988fb), plus the composition of the default ``when``s,
the nested scoring of a foreign module, copies that follow their source, FSDP and crash-and-resume.

The modules here are *foreign*: a plain LightningModule with ``(x, y)`` tuple batches whose DataLoaders are passed to
``trainer.fit(model, train, val)`` — no memcurve base class, no ``evaluation_metrics``. CPU, offline, tiny.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memcurve.callbacks import KFACFactors, KFACPruning, SVDPruning
from memcurve.callbacks.checkpoint_pruning import check_checkpoint_strategy
from memcurve.cli import instantiate, run
from memcurve.curvature import FactorFileError, LayerEigen, save_factors
from memcurve.editing import EDIT_KEY, EDITED_FOLDER, EditRequest
from memcurve.editing.request import layers_id

D_IN, D_HID, D_OUT = 8, 12, 3
FILE_SETTINGS = {
    "mode": "expand",
    "position": "all",
    "bias": "exclude",
    "dtype": "float64",
    "drop_last_position": False,
    "fisher": "empirical",
    "mc_samples": 1,
}
CONFIG = Path(__file__).parents[1] / "configs" / "vit_digits_noisy.yaml"
VIT_LAYERS = ["model.blocks.*.mlp.fc1", "model.blocks.*.mlp.fc2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# -- a foreign module and its data -----------------------------------------------------------------------------------
class PlainMLP(pl.LightningModule):
    """An ordinary LightningModule: tuple batches, its own validation_step, no memcurve methods.

    ``steps`` counts every training step of every instance (cheap checks must refuse before the first one);
    ``crash_at`` raises in the training step of that global step (a run killed mid-epoch)."""

    steps: ClassVar[list[int]] = []

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(D_IN, D_HID), nn.Linear(D_HID, D_HID), nn.Linear(D_HID, D_OUT)
        self.crash_at = crash_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        PlainMLP.steps.append(self.global_step)
        if self.crash_at is not None and self.global_step == self.crash_at:
            raise RuntimeError(f"killed at step {self.global_step}")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2)


def loaders() -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, D_IN, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True)
    return train, DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)


def make_trainer(tmp_path: Path, callbacks: list, max_epochs: int = 2, logger: Any = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=logger if logger is not None else TensorBoardLogger(tmp_path, name="run", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=callbacks,
    )


def fit(tmp_path: Path, callbacks: list, max_epochs: int = 2, seed: int = 0, **kwargs: Any) -> pl.Trainer:
    torch.manual_seed(seed)
    model = PlainMLP(kwargs.pop("crash_at", None))
    trainer = make_trainer(tmp_path, callbacks, max_epochs, kwargs.pop("logger", None))
    trainer.fit(model, *loaders(), **kwargs)
    return trainer


def eigen_file(path: Path, module: nn.Module, layers: list[str], seed: int = 0) -> Path:
    """A valid eigen factor file of ``module`` (random spectra and orthonormal bases): made for that model."""
    generator = torch.Generator().manual_seed(seed)
    named = dict(module.named_modules())
    eigen = {}
    for name in layers:
        d_out, d_in = named[name].weight.shape
        bases, values = [], []
        for d in (d_in, d_out):
            bases.append(torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0])
            values.append(torch.rand(d, generator=generator, dtype=torch.float64).sort(descending=True).values)
        eigen[name] = LayerEigen(values[0], bases[0], values[1], bases[1], 100, 100)
    return save_factors(path, eigen, model=module, settings=FILE_SETTINGS)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def last_checkpoints(folder: Path) -> set[str]:
    """What Lightning's ``ckpt_path="last"`` lookup finds in ``folder``."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return {os.path.normpath(str(p)) for p in ModelCheckpoint(dirpath=folder)._find_last_checkpoints(trainer)}


class RestoredWeights(pl.Callback):
    """Records the module's weights once a ``ckpt_path=`` resume has restored them."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}


# -- data-loss case 1: `--ckpt_path last` resumed from a pruned copy ---------------------------------------------------
def test_resume_from_last_restores_the_original_never_an_edited_copy(tmp_path):
    """Pruned copies used to be ``last-kfac-….ckpt`` beside ``last.ckpt``: the newest ``*last*`` file, so
    ``ckpt_path="last"`` resumed from pruned weights. They live in ``edited/`` now; resuming restores the original."""
    folder = tmp_path / "checkpoints"

    def callbacks() -> list:
        return [
            ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=-1),
            KFACFactors(layers=["fc*"], when="checkpoint"),
            KFACPruning(layers=["fc1", "fc2"], keep_fraction=0.05, when="checkpoint"),
        ]

    first = callbacks()
    fit(tmp_path, first, max_epochs=2)
    last = folder / "last.ckpt"
    copies = sorted((folder / EDITED_FOLDER).glob("last-*.ckpt"))
    assert copies and all(copy.stat().st_mtime >= last.stat().st_mtime for copy in copies)  # newer than last.ckpt
    assert last_checkpoints(folder) == {os.path.normpath(str(last))}
    saved = torch.load(last, weights_only=False)
    edited = torch.load(copies[0], weights_only=False)["state_dict"]
    assert not torch.equal(edited["fc1.weight"], saved["state_dict"]["fc1.weight"])  # a resume from it would show

    second, restored = callbacks(), RestoredWeights()
    fit(tmp_path, [*second, restored], max_epochs=3, seed=1, ckpt_path="last")
    assert restored.weights.keys() == saved["state_dict"].keys()
    for key, value in saved["state_dict"].items():  # the ORIGINAL weights of last.ckpt, not an edited copy's
        assert torch.equal(restored.weights[key], value), key
    pruning = second[2]
    assert pruning.state_key == first[2].state_key  # the resumed run finds its state
    restored_rows = saved["callbacks"][pruning.state_key]["rows"]
    assert restored_rows and [row.tag for row in pruning.rows[: len(restored_rows)]] == [
        row["tag"] for row in restored_rows
    ]
    assert len(pruning.rows) > len(restored_rows)  # and the resumed run pruned its own checkpoints (last.ckpt again)


def test_a_run_killed_mid_epoch_resumes_with_its_pruning_state(tmp_path):
    """Killed in the middle of epoch 1 after a mid-epoch checkpoint: the resumed run restores the original weights,
    the callback's rows, rewrites the edited copies of the ``last.ckpt`` it resumes from, and reports every row."""
    folder = tmp_path / "checkpoints"

    def callbacks() -> list:
        return [
            ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=-1, every_n_train_steps=3),
            SVDPruning(layers=["fc*"], energy=0.5, when="checkpoint"),
        ]

    first = callbacks()
    with pytest.raises(RuntimeError, match="killed at step 5"):
        fit(tmp_path, first, max_epochs=2, crash_at=5)  # 4 steps per epoch: killed inside epoch 1
    last = folder / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 3
    report = tmp_path / "run" / "version_0" / "pruning" / "pruning_report.json"
    assert len(json.loads(report.read_text())) == 2  # epoch=0-step=3.ckpt and last.ckpt

    second, restored = callbacks(), RestoredWeights()
    fit(tmp_path, [*second, restored], max_epochs=2, seed=1, ckpt_path="last")
    for key, value in saved["state_dict"].items():
        assert torch.equal(restored.weights[key], value), key
    pruning = second[1]
    rows = saved["callbacks"][pruning.state_key]["rows"]
    assert [row["source_checkpoint"] for row in rows] == [str(folder / "epoch=0-step=3.ckpt")]
    assert [row.source_checkpoint for row in pruning.rows[:1]] == [str(folder / "epoch=0-step=3.ckpt")]
    assert {Path(row.source_checkpoint).name for row in pruning.rows[1:]} >= {"epoch=1-step=6.ckpt", "last.ckpt"}
    copy = folder / EDITED_FOLDER / f"last-{pruning.requests[0].tag}.ckpt"
    final = torch.load(last, weights_only=False)["global_step"]
    assert final == 6 and torch.load(copy, weights_only=False)["global_step"] == final  # replaced, not refused
    assert len(json.loads(report.read_text())) == 2 + len(pruning.rows) - len(rows)  # nothing lost, nothing twice


# -- data-loss case 2: colliding names and TensorBoard steps -----------------------------------------------------------
def test_close_strengths_and_two_layer_sets_get_distinct_files_and_steps(tmp_path):
    """Tags used to keep three decimals and no layer set (0.0015 and 0.002, or two layer sets, wrote one file over
    the other) and TensorBoard steps were round(100·v). With the defaults (both at fit end, KFACFactors first) on a
    foreign module: four files, four rows, distinct steps holding the exact strengths."""
    sets = (["fc1"], ["fc1", "fc2"])
    pruning = [KFACPruning(layers=layers, keep_fraction=[0.0015, 0.002]) for layers in sets]
    trainer = fit(tmp_path, [KFACFactors(layers=["fc*"]), *pruning], max_epochs=1)
    folder = Path(trainer.log_dir) / "checkpoints"
    assert sorted(p.name for p in folder.glob("fit-end*.ckpt")) == ["fit-end.ckpt"]  # one fit-end save, shared
    rows = [row for callback in pruning for row in callback.rows]
    paths = [row.edited_checkpoint for row in rows]
    assert len(rows) == 4 and len(set(paths)) == 4 and all(Path(p).is_file() for p in paths)
    assert {Path(p).name for p in paths} == {
        f"fit-end-{EditRequest('kfac', layers, keep_fraction=value).tag}.ckpt"
        for layers in sets
        for value in (0.0015, 0.002)
    }
    for row in rows:
        payload = torch.load(row.edited_checkpoint, weights_only=False)[EDIT_KEY]
        assert (payload["keep_fraction"], list(payload["layers"])) == (row.keep_fraction, row.layers)
        assert set(row.before) == set(row.after) == {"val/loss", "val/acc"}  # the module's own validation metrics
    report = json.loads((Path(trainer.log_dir) / "pruning" / "pruning_report.json").read_text())
    assert sorted(r["edited_checkpoint"] for r in report) == sorted(paths)
    events = EventAccumulator(str(Path(trainer.log_dir)))
    events.Reload()
    for layers in sets:
        curve = f"prune/kfac/keep_fraction/L{layers_id(layers)}"
        assert sorted(e.step for e in events.Scalars(f"{curve}/val/acc")) == [0, 1500, 2000]
        assert [(e.step, e.value) for e in events.Scalars(f"{curve}/strength")] == [
            (1500, pytest.approx(0.0015)),
            (2000, pytest.approx(0.002)),
        ]


# -- data-loss case 3: existing files overwritten without a word -------------------------------------------------------
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    text = CONFIG.read_text().replace("embed_dim: 96", "embed_dim: 32").replace("depth: 6", "depth: 2")
    text = text.replace("    augment: none", "    augment: none\n    subset_size: 150\n    val_subset_size: 60")
    path.write_text(text.replace("num_heads: 3", "num_heads: 2"))
    return path


def config_checkpoint(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """(run config, a checkpoint of the model it builds), no training."""
    monkeypatch.chdir(tmp_path)  # the config's logger writes relative to the working directory
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": instantiate(config).model.state_dict(), "epoch": 0}, ckpt)
    return config, ckpt


def test_existing_reports_and_outputs_are_never_overwritten(tmp_path, monkeypatch):
    """``memcurve prune`` into a folder holding another report, ``memcurve edit --output <another checkpoint>`` and a
    pruning callback whose edited copy would land on a foreign file: each refused, the file untouched."""
    config, ckpt = config_checkpoint(tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / "pruning_report.json"
    foreign.write_text("[]  (someone else's report)")
    prune = ["prune", "--config", str(config), "--ckpt_path", str(ckpt), "--method", "[svd]", "--layers",
             "[model.head]", "--energy", "[0.5]", "--evaluate", "false", "--output_dir", str(out)]  # fmt: skip
    with pytest.raises(FileExistsError, match=r"--output_dir '.*out' already holds a report \(pruning_report\.json\)"):
        run(prune)
    assert foreign.read_text() == "[]  (someone else's report)" and sorted(out.iterdir()) == [foreign]
    rows = run([*prune, "--overwrite", "true"])  # told to
    assert len(rows) == 1 and len(json.loads(foreign.read_text())) == 1

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "mine": True}, other)
    digest = sha256(other)
    with pytest.raises(FileExistsError, match=r"output='.*other\.ckpt' already exists"):
        run(["edit", "--source", str(ckpt), "--output", str(other), "--method", "svd", "--layers", "[model.head]",
             "--energy", "0.5"])  # fmt: skip
    assert sha256(other) == digest

    PlainMLP.steps.clear()
    request = EditRequest("svd", ["fc1"], energy=0.5)
    edited = tmp_path / "run" / "version_0" / "checkpoints" / EDITED_FOLDER / f"fit-end-{request.tag}.ckpt"
    edited.parent.mkdir(parents=True)
    edited.write_bytes(b"a file this run did not write")
    with pytest.raises(FileExistsError, match=r"save_pruned \(an edited copy\)='.*fit-end-svd-e0\.5-L.*already exists"):
        fit(tmp_path, [SVDPruning(layers=["fc1"], energy=0.5)])
    assert edited.read_bytes() == b"a file this run did not write" and PlainMLP.steps == []  # refused in setup


# -- data-loss case 4: another model's factors accepted ----------------------------------------------------------------
def vit_factors(tmp_path: Path, **changes: Any) -> Path:
    from memcurve.lightning_modules import NoisyLabelClassifier

    kwargs = {"img_size": 8, "in_chans": 1, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2, **changes}
    other = NoisyLabelClassifier(model_kwargs=kwargs, memorization_eval_every_n_epochs=0)
    names = [f"model.blocks.{b}.mlp.fc{f}" for b in range(2) for f in (1, 2)]
    return eigen_file(tmp_path / "other.safetensors", other, names)


@pytest.mark.parametrize(
    ("command", "changes", "match"),
    [
        # A third block: every factor layer exists with its shape, only the parameter fingerprint tells them apart.
        ("prune", {"depth": 3}, r"other\.safetensors: model fingerprint .* of the checkpoint does not match"),
        ("compare", {"depth": 3}, r"other\.safetensors: model fingerprint .* of the checkpoint does not match"),
        # No module at all: the factor shapes against the checkpoint's own state dict.
        ("edit", {"embed_dim": 16}, r"other\.safetensors: layer 'model\.blocks\.0\.mlp\.fc1' weight has shape \(128, "
         r"32\) in the checkpoint, \(64, 16\) in the factor file"),
    ],
)  # fmt: skip
def test_factors_of_another_model_are_refused(tmp_path, monkeypatch, command, changes, match):
    config, ckpt = config_checkpoint(tmp_path, monkeypatch)
    factors = vit_factors(tmp_path, **changes)
    out = tmp_path / "out"
    if command == "edit":
        arguments = ["edit", "--source", str(ckpt), "--output", str(out / "edited.ckpt"), "--factors", str(factors),
                     "--layers", f"[{', '.join(VIT_LAYERS)}]", "--energy", "0.5"]  # fmt: skip
    else:
        arguments = [command, "--config", str(config), "--ckpt_path", str(ckpt), "--factors", str(factors),
                     "--method", "[kfac]", "--layers", f"[{', '.join(VIT_LAYERS)}]", "--energy", "[0.5]",
                     "--evaluate", "false", "--save", "true", "--output_dir", str(out)]  # fmt: skip
    with pytest.raises(FactorFileError, match=match):
        run(arguments)
    assert not out.exists() or not any(out.rglob("*.ckpt"))


# -- data-loss case 5: cheap checks only after the expensive work ------------------------------------------------------
def _file(tmp_path: Path) -> str:
    path = tmp_path / "not-a-folder"
    path.write_text("a file")
    return str(path)


def _fc1_factors(tmp_path: Path) -> str:
    torch.manual_seed(0)
    return str(eigen_file(tmp_path / "fc1.safetensors", PlainMLP(), ["fc1"]))


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("output_dir is a file", ValueError, r"output_dir='.*not-a-folder' is a file, not a folder"),
        ("latest without KFACFactors", ValueError, r"KFACPruning\(factors='latest'\) needs a KFACFactors callback"),
        ("KFACFactors after KFACPruning", ValueError, r"comes before its KFACFactors in callbacks; put KFACFactors"),
        ("KFACFactors at the wrong time", ValueError, r"KFACPruning\(when='checkpoint', factors='latest'\) needs "
         r"KFACFactors\(when='checkpoint'\)"),
        ("layers without factors (latest)", ValueError, r"\['fc2'\] have no factors: KFACFactors collects \['fc1'\]"),
        ("layers without factors (file)", ValueError, r"\['fc2'\] have no factors in factors='.*fc1\.safetensors'"),
        ("nothing to score with", ValueError, r"evaluate=True scores PlainMLP .* the run has no validation data"),
    ],
)  # fmt: skip
def test_cheap_checks_fail_in_setup_before_any_training_step(tmp_path, case, error, match):
    factors = KFACFactors(layers=["fc1"])
    callbacks = {
        "output_dir is a file": [SVDPruning(layers=["fc1"], energy=0.5, output_dir=_file(tmp_path))],
        "latest without KFACFactors": [KFACPruning(layers=["fc1"], energy=0.5)],
        "KFACFactors after KFACPruning": [KFACPruning(layers=["fc1"], energy=0.5), factors],
        "KFACFactors at the wrong time": [factors, KFACPruning(layers=["fc1"], energy=0.5, when="checkpoint")],
        "layers without factors (latest)": [factors, KFACPruning(layers=["fc*"], energy=0.5)],
        "layers without factors (file)": [KFACPruning(layers=["fc*"], energy=0.5, factors=_fc1_factors(tmp_path))],
        "nothing to score with": [SVDPruning(layers=["fc1"], energy=0.5)],
    }[case]
    PlainMLP.steps.clear()
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, callbacks)
    train, val = loaders()
    with pytest.raises(error, match=match):
        if case == "nothing to score with":
            trainer.fit(PlainMLP(), train)  # no validation loaders
        else:
            trainer.fit(PlainMLP(), train, val)
    assert PlainMLP.steps == []


def test_fsdp_sharded_checkpoints_are_refused_with_the_fix():
    """Under FSDP ``state_dict_type="sharded"`` Lightning bypasses CheckpointIO: pruning would silently never run."""
    with pytest.raises(ValueError, match=r"state_dict_type='sharded'.*use FSDPStrategy\(state_dict_type='full'\)"):
        check_checkpoint_strategy(FSDPStrategy(state_dict_type="sharded"))
    check_checkpoint_strategy(FSDPStrategy(state_dict_type="full"))
    check_checkpoint_strategy(DDPStrategy())


# -- copies follow their source; scoring leaves the live run alone ----------------------------------------------------
def test_edited_copies_follow_their_source_when_modelcheckpoint_removes_it(tmp_path):
    folder = tmp_path / "checkpoints"
    pruning = SVDPruning(layers=["fc1"], energy=[0.5, 0.9], when="checkpoint", evaluate=False)
    (folder / EDITED_FOLDER).mkdir(parents=True)
    bystander = folder / EDITED_FOLDER / "notes.txt"
    bystander.write_text("not a copy")
    fit(tmp_path, [ModelCheckpoint(dirpath=folder, save_top_k=1), pruning], max_epochs=3)  # keeps the newest only
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["epoch=2-step=12.ckpt"]
    assert sorted(p.name for p in (folder / EDITED_FOLDER).iterdir()) == sorted(
        [f"epoch=2-step=12-{request.tag}.ckpt" for request in pruning.requests] + ["notes.txt"]
    )
    assert len(pruning.rows) == 3 * 2  # the report keeps every row, also of the removed checkpoints


class WatchedPruning(SVDPruning):
    """Asserts around each prune that the live model, its mode and the run's logged metrics are untouched."""

    def prune(self, checkpoint: dict, path: Path) -> list:
        trainer = self._trainer
        module = trainer.lightning_module
        weights = {key: value.detach().clone() for key, value in module.state_dict().items()}
        modes = {name: child.training for name, child in module.named_modules()}
        metrics = {key: value.clone() for key, value in trainer.callback_metrics.items()}
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        rows = super().prune(checkpoint, path)
        assert all(torch.equal(value, weights[key]) for key, value in module.state_dict().items())
        assert {name: child.training for name, child in module.named_modules()} == modes
        assert trainer.callback_metrics.keys() == metrics.keys()
        assert all(torch.equal(value, metrics[key]) for key, value in trainer.callback_metrics.items())
        assert (torch.is_grad_enabled(), torch.is_inference_mode_enabled()) == (grad, inference)
        assert module.trainer is trainer
        return rows


def test_scoring_by_the_modules_validation_loop_does_not_disturb_the_live_run(tmp_path):
    """At checkpoint time (inside the fit, between epochs) and at fit end a separate Trainer validates copies of a
    foreign module: the run trains exactly as without pruning (same weights, same logged metrics)."""
    at_checkpoint = WatchedPruning(layers=["fc1", "fc2"], energy=0.5, when="checkpoint")
    at_fit_end = WatchedPruning(layers=["fc2"], keep_fraction=0.25)
    pruned = fit(tmp_path / "a", [at_checkpoint, at_fit_end], max_epochs=3, logger=CSVLogger(tmp_path / "a"))
    plain = fit(tmp_path / "b", [], max_epochs=3, logger=CSVLogger(tmp_path / "b"))
    assert pruned.current_epoch == plain.current_epoch == 3
    for key, value in plain.lightning_module.state_dict().items():
        assert torch.equal(pruned.lightning_module.state_dict()[key], value), key
    logged = [(Path(t.log_dir) / "metrics.csv").read_text() for t in (pruned, plain)]
    assert logged[0] == logged[1]
    # Every checkpoint the Trainer writes: one per epoch, then the fit-end checkpoint of the other callback.
    assert [Path(row.source_checkpoint).name for row in at_checkpoint.rows] == [
        "epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt", "fit-end.ckpt"
    ]  # fmt: skip
    assert [Path(row.source_checkpoint).name for row in at_fit_end.rows] == ["fit-end.ckpt"]
    for row in (*at_checkpoint.rows, *at_fit_end.rows):
        assert set(row.before) == set(row.after) == {"val/loss", "val/acc"}
    final = plain.validate(plain.lightning_module, loaders()[1], verbose=False)[0]
    assert at_fit_end.rows[0].before == pytest.approx(final)  # the unedited score is the module's own validation


def _fit_end_rows(tmp_path: Path, devices: int) -> list[dict]:
    folder = tmp_path / f"world{devices}"
    torch.manual_seed(0)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=0,  # no training step: both runs prune the same (initial) weights
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",  # fork: the children know this test module's classes
        default_root_dir=folder,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SVDPruning(layers=["fc*"], energy=0.5)],
    )
    trainer.fit(PlainMLP(), *loaders())
    return json.loads((folder / "pruning" / "pruning_report.json").read_text())


def test_two_gloo_processes_score_a_foreign_module_as_one_process(tmp_path):
    """Under DDP, rank zero alone validates the copies on the whole validation set (no distributed sampler, no
    metric sync waiting for the other rank): the figures of one process."""
    single = _fit_end_rows(tmp_path, devices=1)
    double = _fit_end_rows(tmp_path, devices=2)
    assert len(single) == len(double) == 1
    for key in ("before", "after"):
        assert set(single[0][key]) == set(double[0][key]) == {"val/loss", "val/acc"}
        assert double[0][key] == pytest.approx(single[0][key], abs=1e-6)
