"""Factor collection at scale: tokens/s and peak memory next to plain training steps, and factor accuracy.

    python bench/scale.py [--device auto|cuda|cpu] [--preset auto|gpu|cpu|tiny] [--repeats 3] [--batches N]
                          [--batch-size B] [--seq-len T] [--json PATH]

An OLMo-2 built from config (no download) with the paper's layer choice scaled down — the gate and up projections
of the top three decoder layers (the 7B run tracks layers 23-25 of 32) — measured in separate processes so each
peak memory is its own:

* plain      forward + mean next-token cross-entropy + backward (weight gradients) over the batches: the
             training-step baseline
* kfac       memcurve's factor pass (``collect_sums``: eval mode, sampled Fisher, backward to the tracked layers'
             outputs only), float32 sums while the model runs in the bench dtype
* kfac_2pass the same with ``separate_passes`` (A from forwards only, then G): less factor memory, one more forward

and a correctness check: factors of the first two batches from the bench dtype and device against a CPU float64
run of the same model (empirical Fisher, so both runs use the same targets): the largest relative Frobenius error
over the layers, for A and for G.

GPU (``--device cuda``, the default when one is available): hidden 1024, 8 layers, intermediate 2816, bf16 model,
8 x 512 tokens per batch, 20 batches. Goal: kfac <= 1.2x plain. CPU: a scaled-down model (hidden 256, 4 layers,
float32 — bf16 matmuls are not representative on CPUs), 4 x 128 tokens, 4 batches; the figures printed are CPU
figures and say so (peak memory there: the growth of the max RSS after the model is built). ``--preset tiny``
(hidden 64, 4 layers, 2 batches of 2 x 32 tokens) only proves the script runs (``bench/gpu_check.py --rehearse``);
``--json PATH`` also writes every figure to PATH (what ``bench/gpu_check.py`` reads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("plain", "kfac", "kfac_2pass")
SETTINGS = {
    "gpu": {
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "intermediate_size": 2816,
        "num_attention_heads": 8,
        "vocab_size": 50304,
        "batch_size": 8,
        "seq_len": 512,
        "batches": 20,
        "dtype": "bfloat16",
    },
    "cpu": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 704,
        "num_attention_heads": 4,
        "vocab_size": 2048,
        "batch_size": 4,
        "seq_len": 128,
        "batches": 4,
        "dtype": "float32",
    },
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "vocab_size": 256,
        "batch_size": 2,
        "seq_len": 32,
        "batches": 2,
        "dtype": "float32",
    },
}
TOLERANCE = {"bfloat16": 5e-2, "float32": 1e-4}  # relative Frobenius error of A and G against CPU float64


def build(settings: dict, device: str, dtype: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, Olmo2Config

    torch.manual_seed(seed)
    config = Olmo2Config(
        vocab_size=settings["vocab_size"],
        hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        max_position_embeddings=max(2048, settings["seq_len"]),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=getattr(torch, dtype))
    generator = torch.Generator().manual_seed(seed + 1)
    batches = []
    for i in range(settings["batches"]):
        ids = torch.randint(
            2, settings["vocab_size"], (settings["batch_size"], settings["seq_len"]), generator=generator
        )
        index = torch.arange(settings["batch_size"]) + i * settings["batch_size"]
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "index": index})
    top = settings["num_hidden_layers"]
    layers = [f"model.layers.{i}.mlp.{p}_proj" for i in range(top - 3, top) for p in ("gate", "up")]
    return model, batches, layers


def adapter():
    from memcurve.lightning_modules.causal_lm import CausalLMFisherAdapter

    class HFAdapter(CausalLMFisherAdapter):
        """A bare HF model returns an output object: take its logits."""

        def logits(self, model, batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    return HFAdapter()


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_plain(model, batches, layers) -> None:
    import torch.nn.functional as F

    model.train()
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        ids = batch["input_ids"]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)


def run_kfac(model, batches, layers, separate: bool = False) -> None:
    from memcurve.curvature import FactorSettings, collect_sums

    settings = FactorSettings(drop_last_position=True, dtype="float32")
    passes = [("A",), ("G",)] if separate else [("A", "G")]
    for factors in passes:
        collect_sums(model, batches, layers, settings, adapter=adapter(), factors=factors)


def measure(method: str, device: str, settings: dict, repeats: int) -> dict:
    """In a fresh process: median seconds over ``repeats`` after a warm-up, tokens/s and peak memory."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    model, batches, layers = build(settings, device, settings["dtype"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    function = {"plain": run_plain, "kfac": run_kfac, "kfac_2pass": lambda m, b, names: run_kfac(m, b, names, True)}[
        method
    ]
    function(model, batches[:2], layers)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function(model, batches, layers)
        synchronize(device)
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak, kind = torch.cuda.max_memory_allocated(), "cuda max allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, "max RSS above the built model"
    tokens = sum(b["input_ids"].numel() for b in batches)
    seconds = statistics.median(times)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "peak_bytes": peak,
        "peak_kind": kind,
    }


def check(device: str, settings: dict) -> dict:
    """Largest relative Frobenius error of A and G (bench dtype on ``device`` vs float64 on the CPU), 2 batches."""
    import torch

    from memcurve.curvature import FactorSettings, collect_sums

    results = {}
    for where, dev, dtype, sums in (
        ("bench", device, settings["dtype"], "float32"),
        ("reference", "cpu", "float64", "float64"),
    ):
        model, batches, layers = build(settings, dev, dtype)
        pass_settings = FactorSettings(fisher="empirical", drop_last_position=True, dtype=sums)
        local = collect_sums(model, batches[:2], layers, pass_settings, adapter=adapter())
        results[where] = {n: s.normalize(n) for n, s in local.items()}
    errors = {"A": 0.0, "G": 0.0}
    for name, reference in results["reference"].items():
        got = results["bench"][name]
        for factor in ("A", "G"):
            want = getattr(reference, factor)
            diff = getattr(got, factor).double().cpu() - want
            errors[factor] = max(errors[factor], float(torch.linalg.matrix_norm(diff) / torch.linalg.matrix_norm(want)))
    return errors


def run_worker(command: list[str]) -> dict:
    """Run one worker process; its last stdout line is its JSON result. A failing worker stops the bench with its
    error output."""
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        sys.stderr.write(process.stdout[-4000:] + process.stderr[-8000:])
        raise SystemExit(f"scale bench: worker {command[3]!r} failed with exit code {process.returncode}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument(
        "--preset", default="auto", choices=("auto", *SETTINGS), help="model and data sizes (auto: by device)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset if args.preset != "auto" else ("gpu" if device.startswith("cuda") else "cpu")
    settings = dict(SETTINGS[preset])
    for key in ("batches", "batch_size", "seq_len"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.worker:
        result = (
            check(device, settings) if args.worker == "check" else measure(args.worker, device, settings, args.repeats)
        )
        print(json.dumps(result))
        return

    import torch

    from memcurve.curvature import plan_memory
    from memcurve.curvature.memory_plan import format_bytes

    label = "GPU" if device.startswith("cuda") else "CPU (scaled down; CPU figures, not GPU ones)"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(
        f"memcurve scale bench on {label}: {name}; torch {torch.__version__}; OLMo-2 hidden {settings['hidden_size']}, "
        f"{settings['num_hidden_layers']} layers, intermediate {settings['intermediate_size']}, {settings['dtype']} "
        f"weights, float32 sums; {settings['batches']} batches of {settings['batch_size']} x {settings['seq_len']} "
        f"tokens; tracked: gate+up of the top 3 layers; median of {args.repeats} runs, each method in its own process"
    )
    d, f = settings["hidden_size"], settings["intermediate_size"]
    top = settings["num_hidden_layers"]
    dims = {f"model.layers.{i}.mlp.{p}_proj": (d, f) for i in range(top - 3, top) for p in ("gate", "up")}
    plan = plan_memory(dims, dict.fromkeys(dims, 0), world_size=1)
    print(f"factor memory plan: sums {format_bytes(plan.ranks[0].collect)}, owner peak {format_bytes(plan.peak)}")
    header = f"{'method':<11} {'seconds':>8} {'tokens/s':>10} {'x plain':>8} {'peak memory':>12}"
    print(header)
    print("-" * len(header))
    sizes = []
    for key in ("batches", "batch_size", "seq_len"):
        sizes += [f"--{key.replace('_', '-')}", str(settings[key])]
    common = ["--device", device, "--preset", preset, *sizes]
    results = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--worker", method, "--repeats", str(args.repeats), *common]
        results[method] = result = run_worker(command)
        ratio = result["seconds"] / results["plain"]["seconds"]
        print(
            f"{method:<11} {result['seconds']:>8.3f} {result['tokens_per_s']:>10,.0f} {ratio:>7.2f}x "
            f"{format_bytes(result['peak_bytes']):>12}",
            flush=True,
        )
    ratio = results["kfac"]["seconds"] / results["plain"]["seconds"]
    print(
        f"kfac / plain = {ratio:.2f}x (goal <= 1.2x{' on a GPU' if not device.startswith('cuda') else ''}); "
        f"peak memory is {results['kfac']['peak_kind']}"
    )
    errors = run_worker([sys.executable, __file__, "--worker", "check", *common])
    tolerance = TOLERANCE[settings["dtype"]]
    verdict = "OK" if max(errors.values()) <= tolerance else "ABOVE TOLERANCE"
    print(
        f"factors vs CPU float64 (2 batches, empirical Fisher): max relative error A {errors['A']:.2e}, "
        f"G {errors['G']:.2e} (tolerance {tolerance:g} for {settings['dtype']} weights): {verdict}"
    )
    if args.json:
        record = {
            "device": device,
            "device_name": name,
            "torch": torch.__version__,
            "preset": preset,
            "settings": settings,
            "repeats": args.repeats,
            "methods": results,
            "kfac_over_plain": ratio,
            "kfac_2pass_over_plain": results["kfac_2pass"]["seconds"] / results["plain"]["seconds"],
            "goal": 1.2,
            "factor_errors": errors,
            "tolerance": tolerance,
            "factors_ok": verdict == "OK",
            "memory_plan": {"sums_bytes": plan.ranks[0].collect, "owner_peak_bytes": plan.peak},
        }
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
