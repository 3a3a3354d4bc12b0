"""The gradient unlearning baselines through the one edit pipeline: an edited copy beside the original with a report
row (steps, before/after), ``steps: auto`` under a perplexity budget (the largest count within it on the selection
split, as a brute force over the grid finds), reports old and new, the sweep's tables, ``memcurve compare --steps``,
the UnlearningPruning callback, and misconfiguration naming the argument, the value and what is allowed."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from memcurve.callbacks import UnlearningPruning
from memcurve.cli import EditSpec, run
from memcurve.data import CanaryTextDataModule
from memcurve.data.held_out import HeldOutSettings, held_out_size, split_held_out
from memcurve.editing import (
    EDIT_KEY,
    EDITED_FOLDER,
    EditRequest,
    EditRow,
    OutputGuard,
    Scorer,
    UnlearningSettings,
    apply_edit,
    edit_checkpoint,
    log_rows,
    markdown_table,
    plot_rows,
    read_report,
    write_report,
)
from memcurve.editing.auto import Budget, candidate_strengths, strongest_within
from memcurve.editing.protocol import AutoRequest, AutoSettings, Protocol, strength_requests
from memcurve.editing.request import layers_id
from memcurve.editing.sweep import budget_table, curve_table, plot_sweep, results_markdown
from memcurve.lightning_modules import CausalLMModule
from memcurve.tiny import TINY_OLMO2

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

CANARY_DATA = {  # tests/test_canary_text_datamodule.py's small canary data: 4 canaries planted >= 16 times
    "corpus_fraction": 0.03,
    "vocab_size": 320,
    "canaries_per_level": 2,
    "block_size": 48,
    "val_fraction": 0.1,
    "batch_size": 8,
    "eval_batch_size": 16,
}
PATTERNS = ["model.model.layers.*.mlp.gate_proj", "model.model.layers.*.mlp.up_proj"]
MLP = [f"model.model.layers.{i}.mlp.{name}_proj" for i in range(2) for name in ("gate", "up")]
SETTINGS = UnlearningSettings(lr=1e-2, batch_size=4, max_retain=16)  # a tiny model needs a large rate
UNLEARNING_OWNERS = "ga, graddiff, npo, simnpo and rmu"


def quiet(_: str) -> None:
    """The pipeline's log: silent here."""


def canary_data() -> CanaryTextDataModule:
    datamodule = CanaryTextDataModule(**CANARY_DATA)
    datamodule.setup("fit")
    return datamodule


def tiny_lm() -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(dict(TINY_OLMO2), prefix_shifts=[])


@pytest.fixture(scope="module")
def lm(one_thread):
    return tiny_lm(), canary_data()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- 1. the pipeline: an edited copy beside the original, a report row -------------------------------------------
def test_edit_checkpoint_writes_an_unlearned_copy_beside_the_original(lm, tmp_path):
    module, datamodule = lm
    source = tmp_path / "checkpoints" / "last.ckpt"
    source.parent.mkdir()
    torch.save({"state_dict": module.state_dict(), "epoch": 3}, source)
    digest = sha256(source)
    checkpoint = torch.load(source, weights_only=False)
    original = {key: value.clone() for key, value in checkpoint["state_dict"].items()}
    request = EditRequest("npo", PATTERNS, steps=2)
    lines: list[str] = []
    guard = OutputGuard()
    (row,) = edit_checkpoint(
        checkpoint,
        source,
        [request],
        module=module,
        datamodule=datamodule,
        unlearning=SETTINGS,
        scorer=Scorer(module, datamodule),
        guard=guard,
        log=lines.append,
    )
    # The row: the method and its step count, every weight of the four layers kept (changed, none removed).
    assert (row.method, row.steps, row.energy, row.keep_fraction, row.ratio) == ("npo", 2, None, None, None)
    assert (row.kind, row.strength, row.setting, row.tag) == ("steps", 2, "steps 2", request.tag)
    assert row.tag == f"npo-s2-L{layers_id(PATTERNS)}" and row.layer_names == MLP
    assert row.kept_pairs == row.total_pairs == sum(original[f"{name}.weight"].numel() for name in MLP)
    assert row.kept_fraction == 1.0 and row.relative_change > 0
    assert {"mem/strict", "control/strict", "val/perplexity", "val/ndcg@10"} <= set(row.before) == set(row.after)
    assert row.after["val/perplexity"] != row.before["val/perplexity"]
    # The copy: in its own folder beside the original, which is untouched (file, dict and tensors).
    path = source.parent / EDITED_FOLDER / f"last-{request.tag}.ckpt"
    assert row.edited_checkpoint == str(path) and row.source_checkpoint == str(source)
    assert sha256(source) == digest and sorted(p.name for p in source.parent.iterdir()) == [EDITED_FOLDER, "last.ckpt"]
    assert all(torch.equal(checkpoint["state_dict"][key], original[key]) for key in original)
    edited = torch.load(path, weights_only=False)
    assert edited["epoch"] == 3 and edited[EDIT_KEY]["source"] == str(source)
    assert (edited[EDIT_KEY]["method"], edited[EDIT_KEY]["steps"]) == ("npo", 2)
    trained = {f"{name}.weight" for name in MLP}
    changed = {key for key, value in edited["state_dict"].items() if not torch.equal(value, original[key])}
    assert changed == trained
    # One training line (first -> last step losses) and the summary.
    assert any(line.startswith(f"memcurve: {request.tag}: unlearning (2 steps) loss forget ") for line in lines), lines
    assert any(line.startswith("memcurve: npo steps 2 on 4 layers: relative weight change") for line in lines)
    # A file this run did not write is never replaced; the same run may rewrite its own.
    with pytest.raises(FileExistsError, match=r"already exists and was not written by this run"):
        edit_checkpoint(
            checkpoint, source, [request], module=module, datamodule=datamodule, unlearning=SETTINGS, log=quiet
        )
    (again,) = edit_checkpoint(
        checkpoint, source, [request], module=module, datamodule=datamodule, unlearning=SETTINGS, guard=guard, log=quiet
    )
    assert again.edited_checkpoint == str(path) and sha256(source) == digest
    # The report: written, read back, tabled.
    write_report(tmp_path / "report", [row])
    (read,) = read_report(tmp_path / "report")
    assert read == row
    assert "| npo | steps 2 | 100.0000% |" in markdown_table([row], [("val/perplexity", "ppl")])


def test_unlearning_requests_are_checked_before_any_work(lm):
    module, datamodule = lm
    checkpoint = {"state_dict": module.state_dict()}
    request = EditRequest("ga", PATTERNS, steps=1)
    with pytest.raises(ValueError, match="method 'ga' needs the datamodule: it trains on its forget/retain data"):
        edit_checkpoint(checkpoint, "model.ckpt", [request], module=module, save=False, log=quiet)
    with pytest.raises(TypeError, match=r"unlearning must be an UnlearningSettings, not dict"):
        edit_checkpoint(
            checkpoint, "model.ckpt", [request], module=module, datamodule=datamodule, unlearning={"lr": 1}, log=quiet
        )
    rmu = EditRequest("rmu", PATTERNS, steps=1)
    with pytest.raises(ValueError, match=r"rmu_layer='model\.nope' is not a module of CausalLMModule"):
        edit_checkpoint(
            checkpoint,
            "model.ckpt",
            [rmu],
            module=module,
            datamodule=datamodule,
            unlearning=UnlearningSettings(rmu_layer="model.nope"),
            save=False,
            log=quiet,
        )
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"method 'ga' needs Sequential\.balanced_subnet_data"):
        edit_checkpoint(
            {"state_dict": plain.state_dict()},
            "model.ckpt",
            [EditRequest("ga", ["0"], steps=1)],
            module=plain,
            datamodule=datamodule,
            save=False,
            log=quiet,
        )


# -- 2. auto over steps under a perplexity budget -----------------------------------------------------------------
def test_auto_steps_is_the_largest_count_within_the_budget_on_the_selection_split(lm):
    module, datamodule = lm
    original = module.state_dict()
    splits = split_held_out(held_out_size(datamodule), HeldOutSettings(), seed=0)
    auto = AutoSettings(min_steps=1, max_steps=8)
    grid = auto.candidates("steps")
    assert grid == [1, 2, 3, 4, 5, 6, 7, 8]
    # Brute force: every grid point on the selection split (its own protocol, so nothing is remembered).
    brute = Protocol(module, datamodule, splits, Budget(max_perplexity_ratio=1.5))
    base = brute.selection_before(original)["val/perplexity"]
    costs = {}
    for steps in grid:
        result = apply_edit(
            EditRequest("ga", PATTERNS, steps=steps), original, MLP, module=module, datamodule=datamodule,
            unlearning=SETTINGS,
        )  # fmt: skip
        costs[steps] = brute.selection(result.state_dict, original)["val/perplexity"] / base
    values = [costs[steps] for steps in grid]
    assert all(a < b for a, b in itertools.pairwise(values)), f"gradient ascent's cost should rise with steps: {costs}"
    limit = (costs[4] + costs[5]) / 2
    assert limit >= 1
    expected = max(steps for steps in grid if costs[steps] <= limit)
    assert expected == 4

    budget = Budget(max_perplexity_ratio=limit)
    protocol = Protocol(module, datamodule, splits, budget, auto=auto)
    (row,) = edit_checkpoint(
        {"state_dict": original},
        "model.ckpt",
        [AutoRequest("ga", PATTERNS, "steps")],
        module=module,
        datamodule=datamodule,
        unlearning=SETTINGS,
        protocol=protocol,
        save=False,
        log=quiet,
    )
    assert row.steps == expected and row.auto["chosen"] == expected and row.auto["within"]
    assert row.kind == "steps" and row.tag == EditRequest("ga", PATTERNS, steps=expected).tag
    assert row.auto["kind"] == "steps" and row.auto["monotone"] and row.auto["budget"] == budget.label
    evaluated = {steps: (cost, within) for steps, cost, within in row.auto["evaluated"]}
    assert len(evaluated) <= math.ceil(math.log2(len(grid) + 1))  # bisection, not the whole grid
    for steps, (cost, within) in evaluated.items():  # each run from the checkpoint: the brute force's cost
        assert cost == pytest.approx(costs[steps], rel=1e-6) and within == (costs[steps] <= limit)
    assert (expected + 1) in evaluated and not evaluated[expected + 1][1]  # its stronger neighbour: outside
    assert row.selection["cost"] == pytest.approx(costs[expected], rel=1e-6) and row.selection["split"] == splits.name
    assert "test_cost" in row.selection and "mem/strict" in row.after  # reported on the test split and the canaries


def test_steps_candidates_are_an_ascending_integer_grid():
    default = candidate_strengths("steps")
    assert default[0] == 1 and default[-1] == 100 and default == sorted(set(default))
    assert all(isinstance(value, int) for value in default)
    wide = candidate_strengths("steps", 1, 5000, 0.1)
    assert wide[:5] == [1, 2, 3, 4, 5] and wide[-1] == 5000
    assert all(b - a == 1 or b / a <= 1.1 + 1 / a for a, b in itertools.pairwise(wide))  # 10% apart, rounded
    for boundary in range(len(wide) + 1):  # the bisection returns exactly the boundary on this grid too
        result = strongest_within(wide, lambda value, b=boundary: float(wide.index(value) >= b), limit=0.5)
        assert result.index == (boundary - 1 if boundary else None)
    assert AutoSettings(min_steps=2, max_steps=5).candidates("steps") == [2, 3, 4, 5]
    for overrides, message in [
        ({"min_steps": 0}, r"auto range \[0, 100\] of steps must be integers with 1 <= minimum < maximum"),
        ({"min_steps": 5, "max_steps": 5}, r"auto range \[5, 5\] of steps"),
        ({"max_steps": 10.5}, r"auto range \[1, 10.5\] of steps must be integers"),
    ]:
        with pytest.raises(ValueError, match=message):
            AutoSettings(**overrides)


def test_auto_requests_take_steps_for_the_unlearning_methods_only():
    assert strength_requests("npo", PATTERNS, steps="auto") == [AutoRequest("npo", PATTERNS, "steps")]
    assert strength_requests("rmu", PATTERNS, steps=[1, 4]) == [
        EditRequest("rmu", PATTERNS, steps=1),
        EditRequest("rmu", PATTERNS, steps=4),
    ]
    auto = AutoRequest("simnpo", PATTERNS, "steps")
    assert auto.tag == f"simnpo-sauto-L{layers_id(PATTERNS)}" and auto.request(7) == EditRequest(
        "simnpo", PATTERNS, steps=7
    )
    with pytest.raises(ValueError, match=r"method='npo' takes steps: auto; got energy: auto"):
        AutoRequest("npo", PATTERNS, "energy")
    with pytest.raises(ValueError, match=r"method='svd' takes energy or keep_fraction: auto; got steps: auto"):
        AutoRequest("svd", PATTERNS, "steps")
    with pytest.raises(ValueError, match=r"method='bsn' takes ratio: auto; got steps: auto"):
        AutoRequest("bsn", PATTERNS, "steps")
    assert EditSpec("npo", PATTERNS, steps=[2, 8]).kind == "steps"
    assert EditSpec("ga", PATTERNS, steps="auto").requests() == [AutoRequest("ga", PATTERNS, "steps")]
    with pytest.raises(ValueError, match=r"steps=3 is the strength of the gradient unlearning methods .*; svd takes"):
        EditSpec("svd", PATTERNS, steps=[3]).requests()
    with pytest.raises(ValueError, match=r"method='npo' takes steps .*; got energy=0.5"):
        EditSpec("npo", PATTERNS, energy=[0.5]).requests()


# -- 3. reports: old rows load, new rows table, plot and log ------------------------------------------------------
def row(method: str, seed: int = 0, auto: dict | None = None, **strength) -> EditRow:
    value = next(iter(strength.values()))
    scale = value if "steps" in strength else 1 / value
    return EditRow(
        method=method,
        layers=list(PATTERNS),
        energy=strength.get("energy"),
        keep_fraction=None,
        ratio=None,
        steps=strength.get("steps"),
        tag=f"{method}-{value}",
        layer_names=list(MLP),
        kept_pairs=10,
        total_pairs=10,
        kept_fraction=1.0,
        relative_change=0.1,
        source_checkpoint="model.ckpt",
        edited_checkpoint=None,
        seconds=1.0,
        before={"mem/strict": 1.0, "val/perplexity": 10.0},
        after={"mem/strict": 1.0 - 0.01 * scale - 0.01 * seed, "val/perplexity": 10.0 + 0.1 * scale},
        selection={"cost": 1.0 + 0.01 * scale},
        auto=auto or {},
    )


def test_old_report_rows_without_steps_load_and_new_rows_join_them(tmp_path):
    old = asdict(row("kfac", energy=0.6))
    del old["steps"]  # a report written before the unlearning methods
    (tmp_path / "pruning_report.json").write_text(json.dumps([old]))
    (loaded,) = read_report(tmp_path)
    assert loaded.steps is None and (loaded.kind, loaded.strength, loaded.setting) == ("energy", 0.6, "energy 0.6")
    new = row("npo", steps=3)
    write_report(tmp_path, [new])
    rows = read_report(tmp_path)
    assert [(r.method, r.kind, r.strength) for r in rows] == [("kfac", "energy", 0.6), ("npo", "steps", 3)]
    with open(tmp_path / "pruning_report.csv") as handle:
        records = list(csv.DictReader(handle))
    assert [record["steps"] for record in records] == ["", "3"]
    table = markdown_table(rows, [("mem/strict", "strict")])
    assert "| kfac | energy 0.6 |" in table and "| npo | steps 3 |" in table
    autos = [row("npo", steps=5, auto={"budget": "val/perplexity ≤ 1.1×", "within": True})]
    assert "| npo | steps auto = 5 (val/perplexity ≤ 1.1×) |" in markdown_table(autos, [("mem/strict", "strict")])
    assert plot_rows(rows).axes[0].get_xlabel() == "strength (energy, keep fraction, ratio or steps)"

    class Recorder:
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.scalars.append((tag, value, step))

        def flush(self) -> None:
            pass

    recorder = Recorder()
    log_rows(recorder, rows)
    curve = f"prune/npo/steps/L{layers_id(PATTERNS)}"
    assert (f"{curve}/strength", 3, 3_000_000) in recorder.scalars
    assert [step for tag, _, step in recorder.scalars if tag == f"{curve}/mem/strict"] == [0, 3_000_000]


def test_sweep_tables_run_the_unlearning_curves_weakest_first():
    budget = Budget(max_perplexity_ratio=1.1)
    chosen = {"budget": budget.label, "budget_limit": 1.1, "kind": "steps", "within": True, "monotone": True}
    rows_by_seed = {
        seed: [
            row("svd", seed, energy=0.9),
            row("svd", seed, energy=0.5),
            row("npo", seed, steps=8),
            row("npo", seed, steps=2),
            row("npo", seed, steps=5, auto={**chosen, "chosen": 5, "selection_cost": 1.05}),
        ]
        for seed in (0, 1)
    }
    curves = curve_table(rows_by_seed, budget, "mem/strict")
    assert [(c["method"], c["kind"], c["strength"]) for c in curves] == [
        ("npo", "steps", 2),  # more steps = stronger: ascending
        ("npo", "steps", 8),
        ("svd", "energy", 0.9),  # less energy = stronger: descending
        ("svd", "energy", 0.5),
    ]
    (unedited, npo) = budget_table(rows_by_seed, [budget], "mem/strict")
    assert unedited["method"] == "unedited" and (npo["method"], npo["kind"], npo["seeds"]) == ("npo", "steps", 2)
    assert npo["strength"] == (5, 0.0)
    markdown = results_markdown(rows_by_seed, [budget], "mem/strict", [("mem/strict", "strict")], {})
    assert "| NPO | 1.100× | steps 5 ± 0 |" in markdown, markdown
    plot_sweep(rows_by_seed, [budget], "mem/strict", "tiny")
    # An edit that breaks the model (perplexity ×1e10) does not squeeze the view: it stays within 4× the budget.
    broken = row("npo", 0, steps=80)
    broken.after["val/perplexity"] = 1e11
    rows_by_seed[0].append(broken)
    left, right = plot_sweep(rows_by_seed, [budget], "mem/strict", "tiny").axes[0].get_xlim()
    assert 0.9 < left < 1.0 and 1.1 < right <= 1.0 + 4 * 0.1 + 1e-9


# -- 4. memcurve compare / prune ----------------------------------------------------------------------------------
def lm_config(folder: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": "memcurve.lightning_modules.CausalLMModule",
            "init_args": {"model": dict(TINY_OLMO2), "prefix_shifts": []},
        },
        "data": {"class_path": "memcurve.data.CanaryTextDataModule", "init_args": dict(CANARY_DATA)},
    }
    path = folder / "tiny_lm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


YAML_PATTERNS = f"[{', '.join(PATTERNS)}]"
UNLEARNING_FLAGS = ["--unlearning.lr", "0.01", "--unlearning.batch_size", "4", "--unlearning.max_retain", "16"]


def test_compare_runs_unlearning_methods_beside_the_others(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "comparison"
    rows = run(
        ["compare", "--config", str(lm_config(tmp_path)), "--method", "[svd, npo]", "--layers", YAML_PATTERNS,
         "--energy", "[0.5]", "--steps", "[2]", *UNLEARNING_FLAGS, "--output_dir", str(output), "--save", "true"]
    )  # fmt: skip
    requests = [EditRequest("svd", PATTERNS, energy=0.5), EditRequest("npo", PATTERNS, steps=2)]
    assert [(r.method, r.kind, r.strength) for r in rows] == [("svd", "energy", 0.5), ("npo", "steps", 2)]
    assert [r.tag for r in rows] == [request.tag for request in requests]
    assert all(r.before == rows[0].before and r.after["val/perplexity"] != r.before["val/perplexity"] for r in rows)
    assert [r.edited_checkpoint for r in rows] == [
        str(output / "checkpoints" / f"model-{request.tag}.ckpt") for request in requests
    ]
    assert torch.load(rows[1].edited_checkpoint, weights_only=False)[EDIT_KEY]["steps"] == 2
    table = (output / "comparison.md").read_text()
    assert "| svd | energy 0.5 |" in table and "| npo | steps 2 |" in table, table
    with open(output / "comparison.csv") as handle:
        assert [record["steps"] for record in csv.DictReader(handle)] == ["", "2"]
    events = EventAccumulator(str(next((output / "tensorboard").glob("events.out.tfevents.*"))))
    events.Reload()
    curve = f"compare/npo/steps/L{layers_id(PATTERNS)}"
    assert [event.step for event in events.Scalars(f"{curve}/val/perplexity")] == [0, 2_000_000]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (["--method", "[svd]", "--steps", "[3]"], ValueError,
         rf"method='svd' needs at least one energy or keep_fraction value; got none \(--steps \[3\] is for "
         rf"{UNLEARNING_OWNERS}\)"),
        (["--method", "[npo]", "--energy", "[0.5]"], ValueError,
         r"method='npo' needs at least one steps value; got none \(--energy \[0.5\] is for kfac, kfac-separable and "
         r"svd\)"),
        (["--method", "[svd]", "--energy", "[0.5]", "--steps", "[3]"], ValueError,
         rf"--steps \[3\] is the strength of {UNLEARNING_OWNERS}; none of --method \['svd'\] takes it \(they take "
         r"energy / keep_fraction\)"),
        (["--method", "[npo]", "--steps", "[2]", "--ratio", "[0.1]"], ValueError,
         r"--ratio \[0.1\] is the strength of bsn; none of --method \['npo'\] takes it \(they take steps\)"),
        (["--edits", "[{method: svd, layers: [x], steps: [3]}]"], ValueError,
         r"steps=3 is the strength of the gradient unlearning methods \('ga', .*\); svd takes energy or keep_fraction"),
        (["--edits", "[{method: rmu, layers: [x], ratio: [0.1]}]"], ValueError,
         r"method='rmu' takes steps .*; got energy=None, keep_fraction=None, ratio=0.1, steps=None"),
        (["--method", "[npo]", "--steps", "[0]"], ValueError, r"steps=0 must be a positive integer"),
        (["--method", "[npo, npo]", "--steps", "[2]"], ValueError, r"the same edit is requested twice"),
        (["--method", "[dpo]", "--steps", "[2]"], ValueError, r"method='dpo' is not supported; choose one of"),
        (["--steps", "[2]"], ValueError, r"--steps are the shorthand of --method: give --method too"),
        (["--method", "[npo]", "--steps", "auto"], ValueError, r"an auto strength needs --budget"),
        (["--method", "[npo]", "--steps", "[2]", "--unlearning.method", "rmu"], ValueError,
         r"--unlearning\.method='rmu': each edit gives its own method \(--method / --steps, or --edits\)"),
        (["--method", "[npo]", "--steps", "[2]", "--unlearning.steps", "50"], ValueError,
         r"--unlearning\.steps=50: each edit gives its own steps"),
        (["--method", "[npo]", "--steps", "[2]", "--unlearning.lr", "0"], ValueError,
         r"lr=0.0 must be a finite number > 0"),
    ],
)  # fmt: skip
def test_compare_misconfiguration_names_the_argument(tmp_path, arguments, error, message):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"")  # never loaded: the arguments are checked first
    base = ["compare", "--config", str(lm_config(tmp_path)), "--ckpt_path", str(ckpt)]
    base += ["--output_dir", str(tmp_path / "out")]
    if "--method" in arguments:
        base += ["--layers", YAML_PATTERNS]
    with pytest.raises(error, match=message):
        run(base + arguments)
    assert not (tmp_path / "out").exists()


def sweep_config(folder: Path, **changes) -> Path:
    settings = {
        "run_config": str(lm_config(folder)),
        "edits": [
            {"method": "svd", "layers": PATTERNS, "energy": [0.5, 0.9]},
            {"method": "npo", "layers": PATTERNS, "steps": [2, 8]},
        ],
        "output_dir": "sweep",
        "budgets": {"max_perplexity_ratio": [1.05, 1.1]},
        "checkpoints": "model.ckpt",
        "auto": {"min_steps": 1, "max_steps": 8},
        "unlearning": {"lr": 0.01, "batch_size": 4},
        **changes,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_sweep_takes_unlearning_methods_and_their_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run(["sweep", "--config", str(sweep_config(tmp_path)), "--unlearning.max_retain", "16", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["unlearning"]["lr"] == 0.01 and printed["unlearning"]["max_retain"] == 16
    assert printed["auto"]["max_steps"] == 8
    specs = [EditSpec(**edit) for edit in printed["edits"]]
    assert [spec.kind for spec in specs] == ["energy", "steps"]
    assert [request.tag for request in specs[1].requests()] == [
        EditRequest("npo", PATTERNS, steps=steps).tag for steps in (2, 8)
    ]

    def no_work(*args, **kwargs):
        raise AssertionError("a model was built or trained before the input was checked")

    monkeypatch.setattr("memcurve.cli.run_trainer_command", no_work)
    monkeypatch.setattr("memcurve.cli._run_cli", no_work)
    for changes, message in [
        ({"unlearning": {"method": "rmu"}}, r"--unlearning\.method='rmu': each edit gives its own method"),
        ({"edits": [{"method": "npo", "layers": PATTERNS, "steps": "auto"}]}, r"--edits of a sweep take grid"),
        ({"edits": [{"method": "npo", "layers": PATTERNS, "energy": [0.5]}]}, r"method='npo' takes steps"),
    ]:
        with pytest.raises(ValueError, match=message):
            run(["sweep", "--config", str(sweep_config(tmp_path, **changes))])
    assert not (tmp_path / "sweep").exists()


# -- 5. the callback ----------------------------------------------------------------------------------------------
def test_unlearning_pruning_edits_the_fit_end_checkpoint(tmp_path):
    module = tiny_lm()
    pruning = UnlearningPruning(PATTERNS, method="graddiff", steps=[1, 2], settings=SETTINGS)
    assert pruning.settings.method == "graddiff" and pruning.unlearning_settings() is pruning.settings
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="run"),
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning],
    )
    trainer.fit(module, datamodule=CanaryTextDataModule(**CANARY_DATA))
    folder = Path(trainer.log_dir) / "checkpoints"
    original = torch.load(folder / "fit-end.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(value, original[key]) for key, value in module.state_dict().items())  # live model kept
    requests = [EditRequest("graddiff", PATTERNS, steps=steps) for steps in (1, 2)]
    records = json.loads((Path(trainer.log_dir) / "pruning" / "pruning_report.json").read_text())
    assert [(r["method"], r["steps"], r["tag"]) for r in records] == [
        ("graddiff", request.steps, request.tag) for request in requests
    ]
    for request, record in zip(requests, records):
        path = folder / EDITED_FOLDER / f"fit-end-{request.tag}.ckpt"
        assert record["edited_checkpoint"] == str(path)
        edited = torch.load(path, weights_only=False)
        assert edited[EDIT_KEY]["steps"] == request.steps
        changed = {key for key, value in edited["state_dict"].items() if not torch.equal(value, original[key])}
        assert changed == {f"{name}.weight" for name in MLP}
        assert record["after"]["val/perplexity"] != record["before"]["val/perplexity"]
    events = EventAccumulator(str(next(Path(trainer.log_dir).glob("events.out.tfevents.*"))))
    events.Reload()
    curve = f"prune/graddiff/steps/L{layers_id(PATTERNS)}"
    assert [event.step for event in events.Scalars(f"{curve}/val/perplexity")] == [0, 1_000_000, 2_000_000]


def test_unlearning_pruning_misconfiguration(lm):
    module, datamodule = lm
    for kwargs, error, message in [
        ({"method": "dpo"}, ValueError, r"method='dpo' is not supported; choose one of \('ga', 'graddiff', 'npo'"),
        ({"steps": 0}, ValueError, r"steps=0 must be a positive integer"),
        ({"steps": 2.5}, ValueError, r"steps=2.5 must be a positive integer"),
        ({"steps": []}, ValueError, r"method='npo' needs at least one steps value; got none"),
        ({"steps": [2, 2]}, ValueError, r"the same edit is requested twice"),
        ({"steps": "auto"}, ValueError, r"choose their strength under a budget; pass budget="),
        ({"settings": {"lr": 1.0}}, TypeError, r"settings must be an UnlearningSettings, not dict"),
    ]:
        with pytest.raises(error, match=message):
            UnlearningPruning(**{"layers": PATTERNS, **kwargs})
    pruning = UnlearningPruning(PATTERNS, method="ga", steps=2)
    with pytest.raises(TypeError, match=r"method 'ga' needs Linear\.balanced_subnet_data"):
        pruning.setup(SimpleNamespace(datamodule=datamodule), torch.nn.Linear(2, 2), "fit")
    with pytest.raises(ValueError, match=r"UnlearningPruning\(method='ga'\) needs a DataModule"):
        pruning.setup(SimpleNamespace(datamodule=None), module, "fit")
    rmu = UnlearningPruning(PATTERNS, method="rmu", steps=2, settings=UnlearningSettings(rmu_layer="model.nope"))
    with pytest.raises(ValueError, match=r"rmu_layer='model\.nope' is not a module of CausalLMModule"):
        rmu.setup(SimpleNamespace(datamodule=datamodule), module, "fit")


def test_sweep_scores_every_row_and_the_never_trained_oracle_against_it(tmp_path, monkeypatch):
    """A real one-checkpoint sweep with an oracle: every score carries the distance to the oracle, the oracle is a
    row of its own (scored on the same splits) in the tables and the figure."""
    monkeypatch.chdir(tmp_path)
    for name, seed in (("model.ckpt", 0), ("oracle.ckpt", 1)):  # the oracle: another model (here: another init)
        torch.manual_seed(seed)
        torch.save({"state_dict": CausalLMModule(dict(TINY_OLMO2), prefix_shifts=[]).state_dict()}, tmp_path / name)
    edits = [{"method": "svd", "layers": PATTERNS, "energy": [0.5, 0.9]}]
    config = sweep_config(tmp_path, edits=edits, oracles="oracle.ckpt", held_out={"selection_fraction": 0.5})
    run(["sweep", "--config", str(config)])
    rows = json.loads((tmp_path / "sweep" / "seed0" / "sweep.json").read_text())
    assert rows and all({"oracle/forget_quality", "oracle/privleak"} <= set(row["after"]) for row in rows)
    (oracle,) = json.loads((tmp_path / "sweep" / "seed0" / "oracle.json").read_text())
    assert oracle["method"] == "oracle" and oracle["after"]["oracle/ks"] == 0.0  # the oracle against itself
    assert oracle["after"]["val/perplexity"] != oracle["before"]["val/perplexity"]
    records = json.loads((tmp_path / "sweep" / "budgets.json").read_text())
    assert [r["method"] for r in records[:2]] == ["unedited", "oracle"]
    assert records[1]["mem/strict"][0] == oracle["after"]["mem/strict"]
    table = (tmp_path / "sweep" / "budgets.md").read_text()
    assert "| never-trained oracle |" in table and "forget quality" in table and "PrivLeak" in table
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
