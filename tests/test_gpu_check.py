"""bench/gpu_check.py: one line without CUDA, synthetic CIFAR that memcurve reads, the table, the carried wheels."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from memcurve.data.sources import load_image_source

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
SKIP_FOLDERS = {"tests", "runs", "build", ".venv", ".gpu-wheels", "__pycache__", ".git"}


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


# -- no GPU: one line, exit 0 ---------------------------------------------------------------------------------------
def test_without_cuda_one_line_and_exit_zero(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "--results-dir", str(tmp_path / "results")],
        env=child_env(CUDA_VISIBLE_DEVICES="", OUT=str(out)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    lines = process.stdout.splitlines()
    assert len(lines) == 1, process.stdout
    assert "no GPU available" in lines[0] and "not measured" in lines[0]
    assert not (tmp_path / "results").exists() and not any(out.iterdir())  # nothing measured, nothing written


def test_makefile_targets_run_the_script():
    process = subprocess.run(
        ["make", "-n", "gpu-wheels", "gpu-check"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert process.returncode == 0, process.stderr
    assert "bench/gpu_check.py --download-wheels" in process.stdout
    assert process.stdout.count("bench/gpu_check.py") == 2
    assert ".gpu-wheels/" in (REPO / ".gitignore").read_text().splitlines()


# -- synthetic CIFAR-10 ----------------------------------------------------------------------------------------------
def test_synthetic_cifar10_is_read_by_memcurve_cifar10_source(tmp_path):
    folder = gpu_check.write_synthetic_cifar10(tmp_path, per_batch=30, test=20, seed=1)
    assert folder == tmp_path / "cifar-10-batches-py"
    written = [pickle.loads((folder / f"data_batch_{i}").read_bytes())["labels"] for i in range(1, 6)]
    with pytest.raises(RuntimeError, match="checksum"):  # torchvision's md5 check rejects them on their own
        load_image_source("cifar10", root=str(tmp_path))
    with gpu_check.synthetic_cifar_checksums():
        splits = load_image_source("cifar10", root=str(tmp_path))
    assert splits.num_classes == 10 and splits.in_chans == 3 and splits.image_size == 32
    assert splits.class_names == list(gpu_check.CIFAR_CLASSES)
    assert len(splits.train) == 150 and len(splits.val) == 20
    assert splits.train_labels.tolist() == [label for labels in written for label in labels]
    image, label = splits.train[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and label == splits.train_labels[7]
    # Class structure: the nearest class mean of the training images labels the test images.
    train = torch.stack([splits.train[i][0] for i in range(len(splits.train))]).flatten(1)
    test = torch.stack([splits.val[i][0] for i in range(len(splits.val))]).flatten(1)
    means = torch.stack([train[splits.train_labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(test, means).argmin(1)
    assert float((predicted == splits.val_labels).float().mean()) >= 0.9
    assert torch.unique(splits.train_labels).numel() == 10


# -- the table and the driver ---------------------------------------------------------------------------------------
def test_table_renders_failed_and_skipped_rows():
    rows = [
        gpu_check.Row("scale", "ok", 12.3, "kfac 1.10x plain"),
        gpu_check.Row("fsdp", "failed", 4.0, "failed: RuntimeError: a | b\nsecond line"),
        gpu_check.Row("vit_cifar10", "skipped", 0.0, "skipped: 3 s of the 480 s budget left"),
    ]
    table = gpu_check.format_table(["title"], rows, 99.6).splitlines()
    assert table[0] == "title" and table[2] == "| step | status | seconds | result |"
    assert table[4] == "| scale | ok | 12 | kfac 1.10x plain |"
    assert table[5] == "| fsdp | **failed** | 4 | failed: RuntimeError: a \\| b second line |"
    assert table[6].startswith("| vit_cifar10 | **skipped** | 0 |")
    assert table[-1] == "| total | 1/3 ok | 100 | wall time of the whole check |"


def test_last_error_line():
    traceback = "Traceback (most recent call last):\n  File 'x.py', line 1\nValueError: bad value\n\n"
    assert gpu_check.last_error_line(traceback) == "ValueError: bad value"
    nested = "torch.OutOfMemoryError: CUDA out of memory\nscale bench: worker 'kfac' failed with exit code 1\n"
    assert gpu_check.last_error_line(nested) == "torch.OutOfMemoryError: CUDA out of memory"
    assert gpu_check.last_error_line("step 1\nstep 2\n") == "step 2"
    assert gpu_check.last_error_line("") == "no output"


def test_a_failing_step_is_a_row_and_the_next_one_still_runs(tmp_path, monkeypatch):
    def step_command(step, rehearse, work):
        result = work / f"{step}.json"
        code = "raise ValueError('boom')" if step == "scale" else f"open({str(result)!r}, 'w').write('{{\"x\": 3}}')"
        return [sys.executable, "-c", code], result

    monkeypatch.setattr(gpu_check, "step_command", step_command)
    monkeypatch.setitem(gpu_check.SUMMARIES, "fsdp", lambda record: f"x is {record['x']}")
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    code = gpu_check.run_check(rehearse=True, steps=["scale", "fsdp"], budget=100, results_dir=tmp_path / "r")
    assert code == 1
    record = json.loads((tmp_path / "r" / "gpu_check_rehearsal.json").read_text())
    assert [(row["step"], row["status"]) for row in record["rows"]] == [("scale", "failed"), ("fsdp", "ok")]
    assert record["rows"][0]["result"] == "failed: ValueError: boom" and record["rows"][1]["result"] == "x is 3"
    table = (tmp_path / "r" / "gpu_check_rehearsal.md").read_text()
    assert "| scale | **failed** |" in table and "| total | 1/2 ok |" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "gpu_check_rehearsal.json",
        "gpu_check_rehearsal.log",
        "gpu_check_rehearsal.md",
    ]


# -- the carried wheels ---------------------------------------------------------------------------------------------
def optional_imports(tree: ast.AST) -> set[int]:
    """ids of the import statements inside ``try: ... except ImportError`` (optional by their own declaration)."""
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            caught = [h.type for h in node.handlers if h.type is not None]
            names = {n.id for t in caught for n in ast.walk(t) if isinstance(n, ast.Name)}
            if names & {"ImportError", "ModuleNotFoundError"}:
                optional |= {id(n) for statement in node.body for n in ast.walk(statement)}
    return optional


def imported_top_level_modules() -> set[str]:
    """Top-level modules imported (absolutely) anywhere in memcurve and its bench/docs scripts, tests excluded, except
    imports guarded by ``except ImportError``."""
    modules = set()
    for path in REPO.rglob("*.py"):
        if SKIP_FOLDERS & set(path.relative_to(REPO).parts):
            continue
        tree = ast.parse(path.read_text())
        optional = optional_imports(tree)
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    local = {p.stem for p in (REPO / "bench").glob("*.py")} | {"memcurve", "__future__"}
    return {m for m in modules if m not in sys.stdlib_module_names and m not in local}


def declared_requirements() -> set[str]:
    """Distributions pyproject.toml asks for: the core dependencies and the lm and bench extras (not dev)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["lm"]
    lines += project["optional-dependencies"]["bench"]
    from packaging.requirements import Requirement

    return {gpu_check.normalize(Requirement(line).name) for line in lines}


def test_wheels_cover_what_memcurve_needs_and_the_image_lacks():
    distributions = importlib.metadata.packages_distributions()
    available = set(gpu_check.IMAGE_PACKAGES) | {gpu_check.normalize(n) for n, _, _ in gpu_check.GPU_WHEELS}
    modules = imported_top_level_modules()
    assert {"torch", "lightning", "jsonargparse"} <= modules  # the scan sees memcurve's imports
    unmet_modules = {
        module: names
        for module in modules
        if not ({gpu_check.normalize(n) for n in distributions.get(module, [module])} & available)
        for names in [distributions.get(module, [module])]
    }
    assert unmet_modules == {}
    declared = declared_requirements()
    lacking = declared - set(gpu_check.IMAGE_PACKAGES)
    assert lacking, "pyproject asks for nothing the image lacks: the image list or the parsing is wrong"
    assert lacking <= available, f"not carried: {sorted(lacking - available)}"


def test_wheels_requirements_are_met_on_the_gpu_machine():
    """What the listed packages require, read from the installed ones' metadata (and from .gpu-wheels/ when filled),
    is in the image or in the list."""
    requires = {}
    for name, _, _ in gpu_check.GPU_WHEELS:
        try:
            requires[name] = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (kronfluence outside `make bench`); checked below from its wheel if any
    assert "jsonargparse" in requires  # memcurve.cli needs it, so it is installed wherever the tests run
    folder = gpu_check.WHEELS_DIR
    if (folder / gpu_check.WHEELS_STAMP).is_file():
        files = gpu_check.wheel_files(folder)
        expected = {gpu_check.normalize(n): v for n, v, _ in gpu_check.GPU_WHEELS}
        assert {n: gpu_check.wheel_distribution(p.name)[1] for n, p in files.items()} == expected
        requires.update({name: gpu_check.wheel_requirements(path) for name, path in files.items()})
    available = set(gpu_check.IMAGE_PACKAGES) | {gpu_check.normalize(n) for n, _, _ in gpu_check.GPU_WHEELS}
    assert gpu_check.unmet_requirements(requires, available, gpu_check.WHEEL_EXTRAS) == {}
    signatures = gpu_check.unmet_requirements({"jsonargparse": requires["jsonargparse"]}, gpu_check.IMAGE_PACKAGES, {})
    assert signatures == {}  # the base package alone needs nothing; its `signatures` extra does:
    assert gpu_check.unmet_requirements(
        {"jsonargparse": requires["jsonargparse"]}, gpu_check.IMAGE_PACKAGES, gpu_check.WHEEL_EXTRAS
    )


def test_unmet_requirements_follows_markers_and_extras():
    requires = {
        "A_pkg": [
            "b>=1",
            "c; python_version < '3.11'",
            "d; extra == 'x'",
            "a-pkg[y]; extra == 'x'",
            "e; extra == 'y'",
            "f; extra == 'z'",
        ]
    }
    assert gpu_check.unmet_requirements(requires, {"b"}) == {}
    assert gpu_check.unmet_requirements(requires, {"b"}, {"a-pkg": ["x"]}) == {
        "a-pkg": ["d; extra == 'x'", "e; extra == 'y'"]
    }
    older = {**gpu_check.TARGET_MARKERS, "python_version": "3.10"}
    assert gpu_check.unmet_requirements(requires, {"b"}, markers=older) == {"a-pkg": ["c; python_version < '3.11'"]}


def fake_wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n")
    return path


def test_download_wheels_is_idempotent_and_keeps_one_version(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: calls.append(a))
    for name, version, _ in gpu_check.GPU_WHEELS:
        fake_wheel(tmp_path, name, version)
    stale = fake_wheel(tmp_path, "jsonargparse", "4.0.0")
    assert gpu_check.download_wheels(tmp_path) == 0
    assert not stale.exists() and calls == []  # nothing missing: no download
    assert (tmp_path / gpu_check.WHEELS_STAMP).read_text() == gpu_check.stamp_text()
    assert gpu_check.download_wheels(tmp_path) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"gpu-wheels: {tmp_path} is up to date")
    next(tmp_path.glob("rapidfuzz-*.whl")).unlink()  # a missing wheel is downloaded again
    with pytest.raises(SystemExit, match="lacks"):  # (the fake pip downloads nothing)
        gpu_check.download_wheels(tmp_path)
    assert len(calls) == 1 and "rapidfuzz==" in " ".join(calls[0][0])


# -- the whole check, rehearsed on the CPU -------------------------------------------------------------------------
@pytest.mark.slow
def test_rehearsal_runs_every_step(tmp_path):
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "--rehearse", "--results-dir", str(tmp_path)],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    record = json.loads((tmp_path / "gpu_check_rehearsal.json").read_text())
    assert [row["step"] for row in record["rows"]] == list(gpu_check.STEPS)
    assert all(row["status"] == "ok" for row in record["rows"]), process.stdout[-4000:]
    assert process.returncode == 0
    assert "| total | 5/5 ok |" in (tmp_path / "gpu_check_rehearsal.md").read_text()
