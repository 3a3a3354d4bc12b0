"""How much does collecting K-FAC factors cost, next to plain training steps and to kronfluence?

    python bench/kfac_overhead.py [--repeats 5] [--device cpu|cuda|auto] [--no-kronfluence] [--models M ...]
                                  [--examples N] [--json PATH]

For a tiny ViT (embed 96, depth 6) and a wider one (embed 384, depth 6), both on the same 1,500 digits images
(8x8, patch 2: 17 tokens), each measured in its own subprocess so peak memory is per method:

* plain        forward + mean cross-entropy + backward over all batches (the training-step baseline)
* memcurve     ``collect_factors``: expand mode, sampled Fisher, every nn.Linear layer, every token
* memcurve_cls the same with ``position="cls"`` (CLS token only, the paper's ViT setting; head excluded)
* kronfluence  ``Analyzer.fit_covariance_matrices`` (KFAC strategy, sampled labels) on a deep copy of the model;
               it also writes its factors to disk, as it always does (pip install kronfluence; bench only)

Each time is the median of ``--repeats`` runs after one warm-up; the ratios are printed side by side. The
goal: memcurve <= 1.15x plain and faster than kronfluence. Also times the energy-threshold selector on
4096 x 11008 spectra (goal < 1 s). ``--device cuda`` runs every method on the GPU (kronfluence too);
``--models`` / ``--examples`` measure fewer models or the first N images only; ``--json PATH`` also writes the
figures to PATH (what ``bench/gpu_check.py`` reads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "vit-96x6": {"embed_dim": 96, "depth": 6, "num_heads": 3},
    "vit-384x6": {"embed_dim": 384, "depth": 6, "num_heads": 6},
}
METHODS = ("plain", "memcurve", "memcurve_cls", "kronfluence")


def build(model_key: str, device: str, examples: int | None = None):
    import timm
    import torch

    from memcurve.data import NoisyLabelDataModule

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, num_classes=10, **MODELS[model_key]
    ).to(device)
    datamodule = NoisyLabelDataModule(source="digits", val_size=297, eval_batch_size=128)
    datamodule.setup("fit")
    batches = [(batch["image"].to(device), batch["label"].to(device)) for batch in datamodule.memorization_dataloader()]
    if examples is not None:  # the first ``examples`` images, in the same batches
        kept, left = [], examples
        for images, labels in batches:
            if left <= 0:
                break
            kept.append((images[:left], labels[:left]))
            left -= len(images[:left])
        batches = kept
    return model, batches


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_plain(model, batches) -> None:
    import torch.nn.functional as F

    for images, labels in batches:
        F.cross_entropy(model(images), labels).backward()
        model.zero_grad(set_to_none=True)


def run_memcurve(model, batches, position: str = "all") -> None:
    from torch import nn

    from memcurve.adapters import ClassificationAdapter
    from memcurve.curvature import FactorSettings, collect_factors

    layers = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if position == "cls":  # the head sees one pooled vector per image, which has no CLS position
        layers = [name for name in layers if name != "head"]
    adapter = ClassificationAdapter(0, 1, None)
    settings = FactorSettings(position=position)
    collect_factors(model, batches, layers, settings, adapter=adapter, reduce_across_ranks=False)


def run_memcurve_cls(model, batches) -> None:
    run_memcurve(model, batches, position="cls")


def kronfluence_runner(model, batches, device: str):
    import copy

    import torch
    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    class SampledClassification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            images, labels = batch
            logits = model(images)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach().double(), -1), 1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    wrapped = prepare_model(copy.deepcopy(model), SampledClassification())
    dataset = TensorDataset(torch.cat([b[0] for b in batches]).cpu(), torch.cat([b[1] for b in batches]).cpu())
    output_dir = tempfile.mkdtemp(prefix="kronfluence-bench-")
    analyzer = Analyzer(
        "bench",
        model=wrapped,
        task=SampledClassification(),
        cpu=device == "cpu",
        disable_model_save=True,
        output_dir=output_dir,
        disable_tqdm=True,
    )
    arguments = FactorArguments(strategy="kfac")

    def run() -> None:
        analyzer.fit_covariance_matrices(
            "bench",
            dataset,
            per_device_batch_size=len(batches[0][0]),
            factor_args=arguments,
            overwrite_output_dir=True,
        )

    return run


def measure(model_key: str, method: str, repeats: int, device: str, examples: int | None = None) -> dict:
    """Run in a fresh process: median seconds of ``repeats`` runs after a warm-up, and peak memory."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model, batches = build(model_key, device, examples)
    if method == "kronfluence":
        run = kronfluence_runner(model, batches, device)
    else:
        function = {"plain": run_plain, "memcurve": run_memcurve, "memcurve_cls": run_memcurve_cls}[method]

        def run() -> None:
            function(model, batches)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"seconds": statistics.median(times), "peak_mib": peak, "examples": sum(len(b[0]) for b in batches)}


def time_selector() -> float:
    import torch

    from memcurve.curvature import threshold_for_energy

    generator = torch.Generator().manual_seed(0)
    mu = torch.rand(4096, generator=generator, dtype=torch.float64).pow(8).sort(descending=True).values
    lam = torch.rand(11008, generator=generator, dtype=torch.float64).pow(8).sort(descending=True).values
    threshold_for_energy(mu, lam, 0.6)
    times = []
    for energy in (0.5, 0.6, 0.9, 0.99, 0.999):
        start = time.perf_counter()
        threshold_for_energy(mu, lam, energy)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--no-kronfluence", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to measure")
    parser.add_argument("--examples", type=int, default=None, help="measure the first N images only (default: all)")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.examples is not None and args.examples < 1:
        parser.error(f"--examples {args.examples} must be a positive number of images")
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(measure(*args.worker, args.repeats, device, args.examples)))
        return
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    methods = [m for m in METHODS if not (m == "kronfluence" and args.no_kronfluence)]
    if "kronfluence" in methods:
        try:
            import kronfluence  # noqa: F401
        except ImportError:
            print("kronfluence is not installed (pip install kronfluence); measuring without it")
            methods.remove("kronfluence")
    import torch

    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, device {device} ({name}), median of {args.repeats} runs after a warm-up; "
        "each method in its own process"
    )
    header = f"{'model':<11} {'method':<12} {'seconds':>8} {'x plain':>8} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    record: dict = {"device": device, "device_name": name, "torch": torch.__version__, "models": {}}
    for model_key in args.models:
        results = {}
        for method in methods:
            command = [
                sys.executable,
                __file__,
                "--worker",
                model_key,
                method,
                "--repeats",
                str(args.repeats),
                "--device",
                device,
            ]
            if args.examples is not None:
                command += ["--examples", str(args.examples)]
            process = subprocess.run(command, capture_output=True, text=True)
            if process.returncode != 0:
                sys.stderr.write(process.stdout[-4000:] + process.stderr[-8000:])
                raise SystemExit(f"kfac_overhead: {model_key} {method} failed with exit code {process.returncode}")
            results[method] = json.loads(process.stdout.strip().splitlines()[-1])
            results[method]["x_plain"] = results[method]["seconds"] / results["plain"]["seconds"]
            print(
                f"{model_key:<11} {method:<12} {results[method]['seconds']:>8.3f} {results[method]['x_plain']:>7.2f}x "
                f"{results[method]['peak_mib']:>9.0f}",
                flush=True,
            )
        record["models"][model_key] = results
        if "kronfluence" in results:
            speedup = results["kronfluence"]["seconds"] / results["memcurve"]["seconds"]
            results["kronfluence"]["memcurve_speedup"] = speedup
            print(
                f"{model_key:<11} memcurve is {speedup:.2f}x faster than kronfluence "
                f"({results['memcurve']['examples']} examples x 17 tokens)"
            )
    record["selector_ms"] = time_selector() * 1000
    print(f"threshold selector, 4096 x 11008 spectra (45M pairs): {record['selector_ms']:.1f} ms (goal < 1000 ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
