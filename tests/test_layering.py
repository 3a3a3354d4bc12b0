"""The house has floors that only look down, and no import cycles.

Floors, top to bottom: ``cli``/``train`` → ``callbacks``, ``lightning_modules`` → ``editing`` → ``data``, ``metrics``
→ ``curvature`` → ``adapters``, ``utils``. ``curvature`` imports neither Lightning nor transformers; a model never
imports the analysis callbacks; no function-level import of memcurve hides a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
FLOORS = {  # a package may import memcurve modules of its own floor or below
    "cli": 5,
    "train": 5,
    "callbacks": 4,
    "lightning_modules": 4,
    "editing": 3,
    "data": 2,
    "metrics": 2,
    "curvature": 1,
    "adapters": 0,
    "utils": 0,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(("memcurve", *parts))


def sources() -> dict[str, Path]:
    files = [p for p in ROOT.glob("*.py")] + [p for folder in FLOORS for p in (ROOT / folder).glob("*.py")]
    return {module_name(p): p for p in files if p.exists()}


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported memcurve module, inside a function)`` for every import of ``path``."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, in_function))
                found.extend((f"{child.module}.{alias.name}", in_function) for alias in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_curvature_imports_neither_lightning_nor_transformers():
    for path in (ROOT / "curvature").glob("*.py"):
        for name, _ in imports(path):
            assert not name.startswith(("lightning", "pytorch_lightning", "transformers")), f"{path.name}: {name}"
    code = "import sys, memcurve.curvature; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('lightning', 'pytorch_lightning', 'transformers')))"  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded


def test_models_do_not_import_the_callbacks():
    for path in (ROOT / "lightning_modules").glob("*.py"):
        for name, _ in imports(path):
            assert not name.startswith("memcurve.callbacks"), f"{path.name} imports {name}"


@pytest.mark.parametrize("module", sorted(sources()))
def test_floors_only_look_down_and_no_function_level_memcurve_import(module):
    path = sources()[module]
    own = floor(module)
    for name, in_function in imports(path):
        if not name.startswith("memcurve."):
            continue
        assert not in_function, f"{module} imports {name} inside a function (hides an import cycle)"
        target = floor(name)
        if own is not None and target is not None:
            assert target <= own, f"{module} (floor {own}) imports {name} (floor {target}), a higher floor"
        if module not in ("memcurve.train",):
            assert not name.startswith(("memcurve.cli", "memcurve.train")), f"{module} imports the entry point"


def test_no_import_cycles():
    modules = sources()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for name, _ in imports(path):
            while name and name not in modules:  # "memcurve.curvature.load_factors" -> "memcurve.curvature"
                name = name.rpartition(".")[0]
            if name and name != module and name != "memcurve":
                edges.add(name)
        graph[module] = edges
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
