"""One comparison table of the memorization edits on one checkpoint: K-FAC, SVD and BalancedSubnet, as in the paper.

Every method runs through its pruning callback's ``prune_checkpoint`` on the same checkpoint and data; the unedited
model is scored once and shared by all rows. Writes, under ``--output-dir`` (default ``<ckpt folder>/../comparison``):
``comparison.md`` (the table: one row for the unedited model, one per method and setting, metric columns from the
module's ``report_metrics`` — the noisy-label ViT: val/acc, mem, GT, clean; the causal LM: its recall, perplexity
and nDCG columns), ``comparison.csv`` (the same rows, metric keys as columns), ``comparison.json`` (the full report
rows) and TensorBoard scalars ``compare/<method>/<metric>`` (step = the setting's index; ``compare/unedited/...`` at
0) plus the table as text. With ``--save`` the pruned checkpoints are written beside the original, as the callbacks
do. BalancedSubnet is told which examples are memorized (the module's ``balanced_subnet_data``); K-FAC and SVD are
not::

    python -m memcurve.compare --config configs/vit_digits_noisy.yaml --ckpt runs/.../checkpoints/last.ckpt \\
        --factors runs/.../kfac/kfac-final.safetensors --methods kfac,svd,balanced_subnet \\
        --layers 'model.blocks.*.mlp.fc2' --keep-fractions 0.004 --svd-keep-fractions 0.01 --bsn-ratios 0.0015
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memcurve.callbacks.checkpoint_pruning import (
    PruningRow,
    PruningSpec,
    _build_callback,
    load_for_pruning,
    report_columns,
)
from memcurve.curvature import select_linear_layers
from memcurve.utils.files import atomic_write

__all__ = ["METHOD_ALIASES", "comparison_rows", "comparison_table", "main", "parse_methods"]

# Accepted --methods names -> the report's method names.
METHOD_ALIASES = {
    "kfac": "kfac-kronecker",
    "kfac-kronecker": "kfac-kronecker",
    "kfac-separable": "kfac-separable",
    "svd": "svd",
    "balanced_subnet": "balanced_subnet",
    "bsn": "balanced_subnet",
}
REPORT_NAME = "comparison"


def parse_methods(text: str) -> list[str]:
    """``"kfac,svd,balanced_subnet"`` -> report method names, in order, without repeats."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--methods {text!r} is empty; choose from {sorted(METHOD_ALIASES)}")
    unknown = [name for name in names if name not in METHOD_ALIASES]
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {unknown}; choose from {sorted(METHOD_ALIASES)}")
    return list(dict.fromkeys(METHOD_ALIASES[name] for name in names))


def _patterns(text: str) -> list[str]:
    patterns = [pattern.strip() for pattern in text.split(",") if pattern.strip()]
    if not patterns:
        raise ValueError(f"--layers {text!r} names no layer pattern")
    return patterns


def _setting(row: PruningRow) -> str:
    if row.method == "balanced_subnet" and row.keep_fraction is not None:
        return f"ratio {1.0 - row.keep_fraction:.4g}"
    if row.energy is not None:
        return f"energy {row.energy:.3g}"
    return f"keep {row.keep_fraction:.4g}"


def comparison_rows(rows: Sequence[PruningRow], labels: Sequence[str], module: Any = None) -> list[dict[str, Any]]:
    """Flat records (unedited first): method, setting, layers, kept fraction, relative change, one key per metric."""
    columns = report_columns(rows, module)
    records = []
    if rows and rows[0].before:
        record = {"method": "unedited", "setting": "", "layers": "", "kept_fraction": 1.0, "relative_change": 0.0}
        records.append({**record, **{key: rows[0].before.get(key, math.nan) for key, _ in columns}})
    for row, label in zip(rows, labels):
        record = {
            "method": row.method,
            "setting": _setting(row),
            "layers": label,
            "kept_fraction": row.kept_pair_fraction,
            "relative_change": row.relative_change,
        }
        records.append({**record, **{key: row.after.get(key, math.nan) for key, _ in columns}})
        records[-1]["pruned_checkpoint"] = row.pruned_checkpoint or ""
    return records


def comparison_table(rows: Sequence[PruningRow], labels: Sequence[str], module: Any = None) -> str:
    """Markdown: one line for the unedited model, one per method and setting; metric headers from report_columns."""
    columns = report_columns(rows, module)
    header = ["method", "setting", "layers", "kept", "rel. change", *(name for _, name in columns)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for record in comparison_rows(rows, labels, module):
        cells = [
            record["method"],
            record["setting"] or "–",
            record["layers"] or "–",
            f"{record['kept_fraction']:.4%}",
            f"{record['relative_change']:.3f}",
            *(f"{record[key]:.3f}" for key, _ in columns),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m memcurve.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config: builds the model and the data")
    parser.add_argument(
        "--ckpt",
        default=None,
        help="the checkpoint to edit (never modified); default: the config's model as built (then --output-dir is "
        "required, and --factors for K-FAC)",
    )
    parser.add_argument("--factors", default=None, help="KFACFactors file (default: the one the checkpoint records)")
    parser.add_argument(
        "--methods",
        default="kfac,svd,balanced_subnet",
        help=f"comma-separated, from {sorted(METHOD_ALIASES)} (kfac = kfac-kronecker, bsn = balanced_subnet)",
    )
    parser.add_argument("--layers", required=True, help="comma-separated layer patterns, one group for every method")
    parser.add_argument("--bsn-layers", default=None, help="BalancedSubnet's layer patterns (default: --layers)")
    group = parser.add_argument_group("K-FAC and SVD")
    group.add_argument("--energies", nargs="*", type=float, default=[], help="K-FAC: fractions of Σκ to keep")
    group.add_argument("--keep-fractions", nargs="*", type=float, default=[], help="K-FAC: fractions of pairs kept")
    group.add_argument(
        "--svd-energies",
        nargs="*",
        type=float,
        default=None,
        help="SVD: fractions of Σσ² to keep (without --svd-energies and --svd-keep-fractions: K-FAC's settings)",
    )
    group.add_argument(
        "--svd-keep-fractions",
        nargs="*",
        type=float,
        default=None,
        help="SVD: fractions of singular directions to keep",
    )
    group = parser.add_argument_group("BalancedSubnet (defaults: the paper's best setting)")
    group.add_argument("--bsn-ratios", nargs="+", type=float, default=[0.0015], help="fractions of weights pruned")
    group.add_argument("--bsn-retain-weight", type=float, default=0.7, help="w of −(1 − w)·L_forget + w·L_retain")
    group.add_argument("--bsn-epochs", type=int, default=5)
    group.add_argument("--bsn-lr", type=float, default=0.3)
    group.add_argument("--bsn-momentum", type=float, default=0.9)
    group.add_argument("--bsn-weight-decay", type=float, default=5e-4)
    group.add_argument("--bsn-batch-size", type=int, default=64)
    group.add_argument("--bsn-max-forget", type=int, default=None, help="at most this many forget examples")
    group.add_argument("--bsn-max-retain", type=int, default=None, help="at most this many retain examples")
    group.add_argument("--bsn-score-init", default="kaiming", choices=["kaiming", "magnitude"])
    group.add_argument("--bsn-seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="report folder (default: <ckpt folder>/../comparison)")
    parser.add_argument("--save", action="store_true", help="also write the pruned checkpoints")
    return parser


def _callbacks(args: argparse.Namespace, methods: list[str]) -> list[tuple[str, list[str], Any]]:
    """``(layers label, patterns, callback)`` per method; every argument is validated before anything is loaded."""
    layers, bsn_layers = _patterns(args.layers), _patterns(args.bsn_layers or args.layers)
    plans = []
    for method in methods:
        if method.startswith("kfac-"):
            if not args.energies and not args.keep_fractions:
                raise ValueError(f"{method} needs --energies and/or --keep-fractions")
            if args.ckpt is None and args.factors is None:
                raise ValueError("without --ckpt, K-FAC needs --factors")
            specs = [PruningSpec(method, energy=value) for value in args.energies]
            specs += [PruningSpec(method, keep_fraction=value) for value in args.keep_fractions]
            plans.append((args.layers, layers, _build_callback(method, layers, specs, args.factors, args.save)))
        elif method == "svd":
            energies, fractions = args.svd_energies or [], args.svd_keep_fractions or []
            if args.svd_energies is None and args.svd_keep_fractions is None:  # no SVD settings: K-FAC's
                energies, fractions = args.energies, args.keep_fractions
            if not energies and not fractions:
                raise ValueError("svd needs --svd-energies / --svd-keep-fractions (or K-FAC's --energies ...)")
            specs = [PruningSpec(method, energy=value) for value in energies]
            specs += [PruningSpec(method, keep_fraction=value) for value in fractions]
            plans.append((args.layers, layers, _build_callback(method, layers, specs, None, args.save)))
        else:
            callback = _build_callback(
                method, bsn_layers, [], None, args.save,
                ratio=args.bsn_ratios, retain_weight=args.bsn_retain_weight, epochs=args.bsn_epochs, lr=args.bsn_lr,
                momentum=args.bsn_momentum, weight_decay=args.bsn_weight_decay, batch_size=args.bsn_batch_size,
                max_forget=args.bsn_max_forget, max_retain=args.bsn_max_retain, score_init=args.bsn_score_init,
                seed=args.bsn_seed,
            )  # fmt: skip
            plans.append((args.bsn_layers or args.layers, bsn_layers, callback))
    return plans


def main(argv: Sequence[str] | None = None) -> list[PruningRow]:
    """Run every method on one checkpoint and write one comparison table; returns the report rows."""
    args = _parser().parse_args(argv)
    methods = parse_methods(args.methods)
    if args.ckpt is None and args.output_dir is None:
        raise ValueError("without --ckpt (editing the config's model as built) give --output-dir")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        raise FileNotFoundError(f"--ckpt '{args.ckpt}' does not exist")
    if args.factors is not None and not Path(args.factors).is_file():
        raise FileNotFoundError(f"--factors '{args.factors}' does not exist")
    plans = _callbacks(args, methods)
    module, datamodule, checkpoint, ckpt_path = load_for_pruning(args.config, args.ckpt, args.output_dir)

    rows: list[PruningRow] = []
    labels: list[str] = []
    before: dict[str, float] | None = None  # the unedited model is scored once, by the first method
    for label, patterns, callback in plans:
        callback.layer_names = select_linear_layers(module, patterns)
        new_rows = callback.prune_checkpoint(checkpoint, ckpt_path, module, datamodule, before=before)
        before = before if before is not None else (new_rows[0].before if new_rows else None)
        rows += new_rows
        labels += [label] * len(new_rows)

    output_dir = Path(args.output_dir) if args.output_dir else ckpt_path.parent.parent / REPORT_NAME
    write_comparison(output_dir, rows, labels, module)
    table = comparison_table(rows, labels, module)
    print(table)
    print(f"table: {output_dir / (REPORT_NAME + '.md')}, csv: {output_dir / (REPORT_NAME + '.csv')}")
    return rows


def write_comparison(output_dir: Path, rows: Sequence[PruningRow], labels: Sequence[str], module: Any = None) -> None:
    """``comparison.{md,csv,json}`` and the TensorBoard scalars ``compare/<method>/<metric>`` under ``output_dir``."""
    table = comparison_table(rows, labels, module)
    atomic_write(output_dir / f"{REPORT_NAME}.md", lambda tmp: tmp.write_text(table + "\n"))
    records = comparison_rows(rows, labels, module)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for record in records for key in record)))
    writer.writeheader()
    writer.writerows(records)
    atomic_write(output_dir / f"{REPORT_NAME}.csv", lambda tmp: tmp.write_text(buffer.getvalue()))
    payload = json.dumps([{**asdict(row), "label": label} for row, label in zip(rows, labels)], indent=1)
    atomic_write(output_dir / f"{REPORT_NAME}.json", lambda tmp: tmp.write_text(payload))

    from torch.utils.tensorboard import SummaryWriter

    tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
    columns = report_columns(rows, module)
    if rows and rows[0].before:
        for key, _ in columns:
            tensorboard.add_scalar(f"compare/unedited/{key}", rows[0].before.get(key, math.nan), 0)
    steps: dict[str, int] = {}
    for row in rows:
        step = steps[row.method] = steps.get(row.method, -1) + 1
        for key, value in row.after.items():
            tensorboard.add_scalar(f"compare/{row.method}/{key}", value, step)
        tensorboard.add_scalar(f"compare/{row.method}/kept_fraction", row.kept_pair_fraction, step)
    tensorboard.add_text("compare/table", table)
    tensorboard.close()


if __name__ == "__main__":
    main()
