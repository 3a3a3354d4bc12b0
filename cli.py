"""The ``memcurve`` command: training and every analysis, one flag vocabulary, ``--config`` and ``--print_config``.

    memcurve fit      --config configs/vit_digits_noisy.yaml [--trainer.max_epochs=50 ...]       (LightningCLI)
    memcurve validate --config configs/vit_digits_noisy.yaml --ckpt_path runs/.../last.ckpt
    memcurve factors  --config RUN.yaml --ckpt_path CKPT --layers '[model.blocks.*.mlp.fc2]' --settings.position cls
    memcurve factors  --model HF_FOLDER_OR_HUB_ID --text TEXT --layers '[model.model.layers.*.mlp.up_proj]' \\
                      --output_dir DIR                      (a pretrained causal LM, no Lightning config, no canaries)
    memcurve probe    --config RUN.yaml --ckpt_path CKPT --factors FACTORS --layers '[...]'
    memcurve prune    --config RUN.yaml --ckpt_path CKPT --method '[kfac, svd]' --layers '[...]' --energy '[0.6, 0.8]'
    memcurve compare  --config RUN.yaml --ckpt_path CKPT --config EDITS.yaml   (edits: a list of method, layers,
                      energy / keep_fraction / ratio / steps; e.g. kfac, svd, bsn and npo, each at its own strengths)
    memcurve compare  --config RUN.yaml --ckpt_path CKPT --method '[npo, rmu]' --layers '[...]' --steps '[10, 40]' \
                      --unlearning.lr 1e-4            (the gradient unlearning baselines: their strength is --steps)
    memcurve edit     --source HF_FOLDER_OR_CKPT --output OUT --factors FACTORS --layers '[...]' --energy 0.6

``--config RUN.yaml`` is a run config (``configs/*.yaml`` or the ``config.yaml`` a run saved beside its logs): the
analysis commands build its model, data and Trainer — precision, strategy, devices and limits included — and run
their callback through ``trainer.validate``. The names of the analysis flags are the arguments of the callbacks
(``KFACFactors``, ``BandActivationProbe``, ``KFACPruning`` / ``SVDPruning`` / ``BalancedSubnetPruning`` /
``UnlearningPruning``) and of :class:`memcurve.editing.EditRequest`; every command accepts more ``--config`` files
of its own flags (YAML) and prints its resolved configuration with ``--print_config``.
"""

from __future__ import annotations

import csv
import inspect
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.tensorboard import SummaryWriter

from memcurve.adapters import sequential_loader
from memcurve.callbacks import BandActivationProbe, KFACFactors
from memcurve.callbacks.checkpoint_pruning import CheckpointPruning
from memcurve.curvature.memory_plan import MemoryPlanError
from memcurve.curvature.settings import DEFAULT_SETTINGS, FactorSettings
from memcurve.curvature.storage import load_factors
from memcurve.curvature.tracker import select_linear_layers
from memcurve.data.held_out import HeldOutSettings, HeldOutSplits, held_out_size, split_held_out, subset_loader
from memcurve.data.text_datamodule import TextDataModule
from memcurve.editing import (
    EDIT_METHODS,
    UNLEARNING_METHODS,
    BalancedSubnetSettings,
    EditRequest,
    EditRow,
    OutputGuard,
    Scorer,
    UnlearningSettings,
    edit_checkpoint,
    log_rows,
    plot_rows,
    report_columns,
    report_markdown,
    write_report,
)
from memcurve.editing.auto import AUTO, Budget
from memcurve.editing.hf import edit_hf_model, edit_lightning_checkpoint
from memcurve.editing.protocol import (
    AutoRequest,
    AutoSettings,
    Protocol,
    single_validation_loader,
    strength_requests,
)
from memcurve.editing.request import STRENGTH_KINDS, strength_kinds
from memcurve.editing.skills import memorized_min_level, plot_skills
from memcurve.editing.sweep import budget_table, curve_table, plot_sweep, results_markdown, sweep_points
from memcurve.lightning_modules import CausalLMModule
from memcurve.utils.arguments import check_choice
from memcurve.utils.files import atomic_write, check_output_folder

__all__ = ["COMMANDS", "EditSpec", "MemcurveCLI", "instantiate", "main", "run"]

SUMMARY_TAGS = (
    "val/acc",
    "mem/noised_acc",
    "mem/gt_recovery",
    "mem/clean_train_acc",
    "mem/strict",
    "mem/loose",
    "control/strict",
    "val/perplexity",
    "train/loss",
)
TRAINER_COMMANDS = ("fit", "validate", "test")
# Field docstrings of the settings dataclasses become the help of their flags.
set_parsing_settings(docstring_parse_attribute_docstrings=True)
# Callback arguments the analysis commands set themselves (they run the callback once, through trainer.validate).
FIXED = {"when", "every_n_epochs", "adapter"}


# -- fit / validate / test -----------------------------------------------------------------------------------------
class _CommandCLI(LightningCLI):
    """A LightningCLI handed its arguments by ``memcurve``: they ARE the command line, so Lightning's warning about
    ``args`` given beside ``sys.argv`` (printed on every console invocation) does not apply."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            super().parse_arguments(parser, args)


class MemcurveCLI(_CommandCLI):
    """LightningCLI that prints a run summary (final metrics, files, before/after edit tables) after fitting."""

    @rank_zero_only
    def after_fit(self) -> None:
        trainer = self.trainer
        metrics = trainer.callback_metrics
        lines = [f"memcurve: finished {trainer.current_epoch} epochs"]
        for tag in SUMMARY_TAGS:
            if tag in metrics and not math.isnan(float(metrics[tag])):
                lines.append(f"  {tag:<22} {float(metrics[tag]):.4f}")
        for callback in trainer.callbacks:
            for path in getattr(callback, "saved_paths", [])[-1:]:
                lines.append(f"  {type(callback).__name__ + ':':<22} {path}")
        lines.append(f"  logs and checkpoints:  {trainer.log_dir}")
        if trainer.logger is not None:
            lines.append(f"  view them with:        tensorboard --logdir {trainer.logger.save_dir}")
        for callback in trainer.callbacks:
            if isinstance(callback, CheckpointPruning) and callback.rows:
                lines += ["", f"{type(callback).__name__}, before/after on the same data:"]
                lines.append(report_markdown(callback.rows, trainer.lightning_module))
        print("\n".join(lines), flush=True)


def run_trainer_command(argv: Sequence[str]) -> MemcurveCLI:
    """``memcurve fit|validate|test ...``: the LightningCLI of any LightningModule / DataModule by ``class_path``."""
    return MemcurveCLI(
        subclass_mode_model=True, subclass_mode_data=True, save_config_kwargs={"overwrite": True}, args=list(argv)
    )


# -- the analysis commands on a run config -----------------------------------------------------------------------
class _RunCLI(_CommandCLI):
    """Parses a run config (model, data, trainer) plus a command's own flags; instantiates, runs nothing."""

    def __init__(self, prog: str, add_flags: Callable[[LightningArgumentParser], None], argv: Sequence[str]) -> None:
        self._prog, self._add_flags = prog, add_flags
        super().__init__(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
            parser_kwargs={"prog": prog, "description": COMMANDS[prog.split()[-1]]},
            args=list(argv),
            run=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="the run's checkpoint (never modified)")
        parser.add_argument("--weights_only", type=bool | None, default=None, help="(of a saved fit config; unused)")
        self._add_flags(parser)

    def before_instantiate_classes(self) -> None:
        # Cheap path checks before the model is built (a pretrained model may take minutes to load).
        config = self.config
        _check_ckpt(config.get("ckpt_path"))
        factors = config.get("factors")
        if isinstance(factors, str) and factors != "latest" and not Path(factors).is_file():
            raise FileNotFoundError(f"--factors {factors!r} does not exist (a KFACFactors file or *.index.json)")
        if isinstance(config.get("output_dir"), str):
            check_output_folder("--output_dir", config["output_dir"])


def _run_cli(command: str, add_flags: Callable[[LightningArgumentParser], None], argv: Sequence[str]) -> _RunCLI:
    return _RunCLI(f"memcurve {command}", add_flags, argv)


def _callback_flags(callback: type, skip: set[str]) -> Callable[[LightningArgumentParser], None]:
    """The callback's own arguments at the top level (``--layers``, ``--settings.position`` ...)."""

    def add(parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(callback, nested_key=None, skip=skip, as_group=True)

    return add


def _build_callback(callback: type, config: Any, skip: set[str], **fixed: Any) -> Any:
    names = [name for name in inspect.signature(callback).parameters if name not in skip]
    return callback(**{name: config[name] for name in names if name in config}, **fixed)


def _check_ckpt(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt_path {path!r} does not exist")


def _written(command: str, callback: Any, trainer: pl.Trainer) -> Path:
    """The file the callback wrote in ``trainer.validate`` (global rank zero; ``Path()`` on the other ranks)."""
    if not trainer.is_global_zero:
        return Path()
    if not getattr(callback, "saved_paths", None):
        raise RuntimeError(
            f"memcurve {command}: nothing was written: trainer.validate ran no validation batch (the analysis runs at "
            f"the end of validation); limit_val_batches={trainer.limit_val_batches!r} must allow at least one"
        )
    return Path(callback.saved_paths[-1])


def _hf_factors_requested(argv: Sequence[str]) -> bool:
    """``--text`` on the command line or in a ``--config`` file: the direct HF path of ``memcurve factors``."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--text" or arg.startswith("--text="):
            return True
        config = arg.removeprefix("--config=") if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        if config is not None and Path(config).is_file():
            settings = yaml.safe_load(Path(config).read_text())
            if isinstance(settings, dict) and "text" in settings:
                return True
    return False


def run_factors(argv: Sequence[str]) -> Path:
    """``memcurve factors``: K-FAC factors of a run's checkpoint (or, with ``--text``, of a pretrained HF model)."""
    if _hf_factors_requested(argv):
        return run_hf_factors(argv)
    return _run_analysis("factors", KFACFactors, argv)


def run_probe(argv: Sequence[str]) -> Path:
    """``memcurve probe``: band activations of a run's checkpoint for given factors."""
    return _run_analysis("probe", BandActivationProbe, argv)


def _run_analysis(command: str, callback_class: type, argv: Sequence[str]) -> Path:
    """The analysis callback, built from the command's flags, run once through the run config's ``trainer.validate``
    (paths were checked before the model was built: ``_RunCLI.before_instantiate_classes``)."""
    cli = _run_cli(command, _callback_flags(callback_class, FIXED), argv)
    callback = _build_callback(callback_class, cli.config_init, FIXED, when="validate")
    cli.trainer.callbacks.append(callback)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"), verbose=False)
    path = _written(command, callback, cli.trainer)
    if cli.trainer.is_global_zero:
        print(f"memcurve {command}: {path}")
    return path


# -- prune / compare -----------------------------------------------------------------------------------------------
@dataclass
class EditSpec:
    """One method on one layer set at one or more strengths (each value gives one :class:`EditRequest`)."""

    method: str
    """``kfac``, ``kfac-separable``, ``svd``, ``bsn``, or an unlearning baseline: ``ga``, ``graddiff``, ``npo``,
    ``simnpo``, ``rmu``."""
    layers: list[str]
    """Module-name patterns (globs or ``re:<regex>``) of the linear layers to edit."""
    energy: list[float] | Literal["auto"] = field(default_factory=list)
    """Fractions of the spectrum energy to keep (Σκ for K-FAC, Σσ² for SVD), each in (0, 1]; or ``auto``."""
    keep_fraction: list[float] | Literal["auto"] = field(default_factory=list)
    """Fractions of directions (eigen-pairs or singular directions) to keep, each in (0, 1]; or ``auto``."""
    ratio: list[float] | Literal["auto"] = field(default_factory=list)
    """BalancedSubnet: fractions of each layer's weights to prune, each in (0, 1); or ``auto``."""
    steps: list[int] | Literal["auto"] = field(default_factory=list)
    """The unlearning baselines: numbers of unlearning steps, each a positive integer; or ``auto``."""

    def requests(self) -> list[EditRequest | AutoRequest]:
        """One request per value; ``auto`` gives one :class:`AutoRequest` (the strength chosen under a budget)."""
        return strength_requests(
            self.method,
            self.layers,
            energy=self.energy,
            keep_fraction=self.keep_fraction,
            ratio=self.ratio,
            steps=self.steps,
        )

    @property
    def kind(self) -> str:
        """The strength kind of this spec (``auto`` searches over it in ``memcurve sweep``)."""
        kinds = strength_kinds(self.method)
        if len(kinds) == 1:  # bsn: ratio; the unlearning methods: steps
            return kinds[0]
        return "keep_fraction" if self.keep_fraction and not self.energy else "energy"


def _edit_flags(parser: LightningArgumentParser) -> None:
    parser.add_argument(
        "--factors",
        type=str | None,
        default=None,
        help="KFACFactors file or *.index.json (default: the file the checkpoint records)",
    )
    parser.add_argument(
        "--edits",
        type=list[EditSpec],
        default=[],
        help="edits as a list (YAML): method, layers, energy / keep_fraction / ratio / steps lists",
    )
    parser.add_argument(
        "--method",
        type=list[str],
        default=[],
        help="shorthand: these methods on --layers at the given strengths (one EditSpec each)",
    )
    parser.add_argument("--layers", type=list[str], default=[], help="layer patterns of the shorthand")
    parser.add_argument("--energy", type=list[float] | Literal["auto"], default=[], help="strengths of the shorthand")
    parser.add_argument(
        "--keep_fraction", type=list[float] | Literal["auto"], default=[], help="strengths of the shorthand"
    )
    parser.add_argument(
        "--ratio", type=list[float] | Literal["auto"], default=[], help="BalancedSubnet strengths of the shorthand"
    )
    parser.add_argument(
        "--steps",
        type=list[int] | Literal["auto"],
        default=[],
        help=f"step counts of the shorthand's unlearning methods {UNLEARNING_METHODS}",
    )
    parser.add_argument("--bsn", type=BalancedSubnetSettings, default=BalancedSubnetSettings())
    parser.add_argument(
        "--unlearning",
        type=UnlearningSettings,
        default=UnlearningSettings(),
        help="the unlearning baselines' settings (method and steps come from --method / --steps or --edits)",
    )
    parser.add_argument(
        "--budget",
        type=Budget | None,
        default=None,
        help="held-out protocol: the budget of auto strengths, e.g. {max_accuracy_drop: 0.01}",
    )
    parser.add_argument(
        "--held_out",
        type=HeldOutSettings | None,
        default=None,
        help="held-out protocol: split the validation set into selection and test (implied by --budget)",
    )
    parser.add_argument("--auto", type=AutoSettings, default=AutoSettings(), help="candidate strengths of auto")
    parser.add_argument("--evaluate", type=bool, default=True, help="score the unedited and the edited weights")
    parser.add_argument("--save", type=bool, default=False, help="also write the edited checkpoints")
    parser.add_argument(
        "--output_dir", type=str | None, default=None, help="report folder (default: beside the checkpoint folder)"
    )
    parser.add_argument(
        "--overwrite",
        type=bool,
        default=False,
        help="replace an existing report (and edited checkpoints) in --output_dir; without it they are refused",
    )


def _strength_owners(kind: str) -> str:
    """``kfac, kfac-separable and svd``: the methods whose strength is ``kind``."""
    owners = [method for method in EDIT_METHODS if kind in strength_kinds(method)]
    return ", ".join(owners[:-1]) + " and " + owners[-1] if len(owners) > 1 else owners[0]


def _requests(config: Any) -> list[EditRequest | AutoRequest]:
    specs = list(config["edits"])
    given = {kind: config[kind] for kind in STRENGTH_KINDS if config[kind]}
    if config["method"]:
        if not config["layers"]:
            raise ValueError("--method needs --layers (the layer patterns to edit)")
        for method in config["method"]:
            check_choice("method", method, EDIT_METHODS)
            kinds = strength_kinds(method)
            strengths = {k: v if v == AUTO else list(v) for k, v in given.items() if k in kinds}
            if not strengths:
                others = "; ".join(f"--{k} {v!r} is for {_strength_owners(k)}" for k, v in given.items())
                raise ValueError(
                    f"method={method!r} needs at least one {' or '.join(kinds)} value; got none"
                    + (f" ({others})" if others else "")
                )
            specs.append(EditSpec(method, list(config["layers"]), **strengths))
        taken = {kind for method in config["method"] for kind in strength_kinds(method)}
        for kind, value in given.items():
            if kind not in taken:
                raise ValueError(
                    f"--{kind} {value!r} is the strength of {_strength_owners(kind)}; none of --method "
                    f"{list(config['method'])} takes it (they take {' / '.join(sorted(taken))})"
                )
    elif config["layers"] or given:
        raise ValueError(
            "--layers/--energy/--keep_fraction/--ratio/--steps are the shorthand of --method: give --method too"
        )
    if not specs:
        raise ValueError("nothing to edit: give --edits '[{method: kfac, layers: [...], energy: [0.6]}]' or --method")
    requests = [request for spec in specs for request in spec.requests()]
    tags = [request.tag for request in requests]
    repeated = sorted({tag for tag in tags if tags.count(tag) > 1})
    if repeated:
        raise ValueError(f"the same edit is requested twice: {repeated}")
    return requests


def load_run_checkpoint(module: pl.LightningModule, datamodule: Any, ckpt_path: str | None) -> dict[str, Any]:
    """Load ``ckpt_path`` into ``module`` (or take the weights the config builds), set the data up and check it
    against the label noise the checkpoint recorded; returns the checkpoint dict."""
    if ckpt_path is not None:
        _check_ckpt(ckpt_path)
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        module.load_state_dict(checkpoint["state_dict"])
    else:  # the weights the config builds (a pretrained hub model)
        checkpoint = {"state_dict": module.state_dict()}
    if datamodule is not None:
        datamodule.setup("fit")
        saved_noise = checkpoint.get(type(datamodule).__qualname__)
        if saved_noise:
            datamodule.load_state_dict(saved_noise)  # the noise of the run must match (clear error otherwise)
    return checkpoint


def run_edits(command: str, argv: Sequence[str]) -> list[EditRow]:
    """``memcurve prune`` / ``memcurve compare``: every requested edit of one checkpoint through the edit pipeline,
    one report (``<name>.json/.csv/.md/.png`` and TensorBoard under ``--output_dir``).

    Refused before the checkpoint is loaded: an ``--output_dir`` that is a file or not writable, and one that
    already holds a report (unless ``--overwrite true``, which also lets edited checkpoints be replaced). Scores:
    the module's ``evaluation_metrics`` or, without one, its own validation loop on the DataModule's
    ``val_dataloader`` (:mod:`memcurve.editing.scoring`)."""
    cli = _run_cli(command, _edit_flags, argv)
    config = cli.config_init
    requests = _requests(config)
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is None and config["output_dir"] is None:
        raise ValueError("without --ckpt_path (editing the config's model as built) give --output_dir")
    name = {"prune": "pruning_report", "compare": "comparison"}[command]
    source = Path(ckpt_path) if ckpt_path else Path(config["output_dir"]) / "model.ckpt"
    output_dir = Path(config["output_dir"]) if config["output_dir"] else source.parent.parent / name
    check_output_folder("--output_dir", output_dir)
    report = output_dir / f"{name}.json"
    if report.exists() and not config["overwrite"]:
        raise FileExistsError(
            f"--output_dir {str(output_dir)!r} already holds a report ({report.name}) that this run did not write; "
            "choose another --output_dir or pass --overwrite true"
        )
    budget, held_out = config["budget"], config["held_out"]
    _check_unlearning_flags(config["unlearning"], "--unlearning")
    if any(isinstance(r, AutoRequest) for r in requests) and budget is None:
        raise ValueError("an auto strength needs --budget (e.g. --budget.max_accuracy_drop 0.01)")
    if (budget is not None or held_out is not None) and not config["evaluate"]:
        raise ValueError("--budget / --held_out score the edits on held-out splits: they need --evaluate true")
    module, datamodule = cli.model, cli.datamodule
    checkpoint = load_run_checkpoint(module, datamodule, ckpt_path)
    factors = config["factors"] or checkpoint.get("kfac_factors", {}).get("path")
    protocol = None
    if budget is not None or held_out is not None:
        held_out = held_out or HeldOutSettings()
        splits = split_held_out(held_out_size(datamodule), held_out, seed=_run_seed(cli.config))
        splits.save(output_dir / "held_out_splits.json", config["overwrite"], "--output_dir")
        protocol = Protocol(module, datamodule, splits, budget, trainer=cli.trainer, auto=config["auto"])
        print(f"memcurve {command}: {splits.name} -> {output_dir / 'held_out_splits.json'}")
    rows = edit_checkpoint(
        checkpoint,
        source,
        requests,
        module=module,
        datamodule=datamodule,
        factors=factors,
        bsn=config["bsn"],
        unlearning=config["unlearning"],
        scorer=Scorer(module, datamodule, cli.trainer) if config["evaluate"] and protocol is None else None,
        protocol=protocol,
        save=config["save"],
        output_folder=output_dir / "checkpoints" if config["save"] else None,
        guard=OutputGuard(overwrite=config["overwrite"]),
    )
    write_report(output_dir, rows, name, append=False)
    table = report_markdown(rows, module)
    atomic_write(output_dir / f"{name}.md", lambda tmp: tmp.write_text(table + "\n"))
    writer = SummaryWriter(str(output_dir / "tensorboard"))
    log_rows(writer, rows, prefix=command)
    writer.add_text(f"{command}/table", table)
    if config["evaluate"]:
        figure = plot_rows(rows, module)
        atomic_write(output_dir / f"{name}.png", lambda tmp: figure.savefig(tmp, format="png", dpi=120))
        writer.add_figure(f"{command}/figure", figure)
        skills = plot_skills(rows, memorized_min_level(module), title=name)
        if skills is not None:  # a model trained with the perturbation suite: retention per skill category
            atomic_write(output_dir / f"{name}_skills.png", lambda tmp: skills.savefig(tmp, format="png", dpi=120))
            writer.add_figure(f"{command}/skills", skills)
    writer.close()
    print(table)
    print(f"memcurve {command}: report {output_dir / (name + '.csv')}, table {output_dir / (name + '.md')}")
    return rows


def _check_unlearning_flags(settings: UnlearningSettings, argument: str) -> None:
    """The unlearning settings of a command hold everything but the method and the step count, which each edit
    gives (``--method`` / ``--steps`` or ``--edits``): a value set there would be silently replaced, so it is
    refused."""
    default = UnlearningSettings()
    for name in ("method", "steps"):
        value = getattr(settings, name)
        if value != getattr(default, name):
            raise ValueError(
                f"{argument}.{name}={value!r}: each edit gives its own {name} (--method / --steps, or --edits); "
                f"leave {argument}.{name} out"
            )


def _run_seed(config: Any) -> int:
    """The run's seed (``seed_everything``), the default seed of its held-out split."""
    seed = config.get("seed_everything")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(
            f"seed_everything={seed!r}: the held-out split is seeded by the run's seed; set seed_everything to an "
            "integer in the run config or give --held_out.seed"
        )
    return seed


# -- sweep: curves over seeds under the held-out protocol ----------------------------------------------------------
@dataclass
class BudgetGrid:
    """The budgets of a sweep: one kind, several limits (each gives one ``auto`` choice per method and seed)."""

    max_accuracy_drop: list[float] = field(default_factory=list)
    """Largest drops of the metric (higher is better), e.g. [0.005, 0.01, 0.02] = half a point, one, two."""
    max_perplexity_ratio: list[float] = field(default_factory=list)
    """Largest ratios of the metric (lower is better), e.g. [1.05, 1.10, 1.15]."""
    metric: str | None = None
    """The budget's metric (default ``val/acc`` for drops, ``val/perplexity`` for ratios)."""

    def budgets(self) -> list[Budget]:
        if bool(self.max_accuracy_drop) == bool(self.max_perplexity_ratio):
            raise ValueError(
                "--budgets takes exactly one of max_accuracy_drop (e.g. [0.005, 0.01, 0.02]) and max_perplexity_ratio "
                f"(e.g. [1.05, 1.1, 1.15]); got {self.max_accuracy_drop!r} and {self.max_perplexity_ratio!r}"
            )
        if self.max_accuracy_drop:
            return [Budget(max_accuracy_drop=v, metric=self.metric) for v in sorted(self.max_accuracy_drop)]
        return [Budget(max_perplexity_ratio=v, metric=self.metric) for v in sorted(self.max_perplexity_ratio)]


DEFAULT_SEED_OVERRIDES = [
    "--seed_everything={seed}",
    "--data.init_args.seed={seed}",
    "--trainer.logger.init_args.version=seed{seed}",
]
MEMORIZATION_METRICS = ("mem/noised_acc", "mem/strict")
DEFAULT_HELD_OUT, DEFAULT_AUTO, DEFAULT_BSN = HeldOutSettings(), AutoSettings(), BalancedSubnetSettings()
DEFAULT_UNLEARNING = UnlearningSettings()


def sweep(
    run_config: str,
    edits: list[EditSpec],
    output_dir: str,
    budgets: BudgetGrid,
    seeds: list[int] | None = None,
    checkpoints: str | None = None,
    train_missing: bool = False,
    seed_overrides: list[str] | None = None,
    held_out: HeldOutSettings = DEFAULT_HELD_OUT,
    factor_data: Literal["train", "held_out"] = "train",
    factor_settings: FactorSettings = DEFAULT_SETTINGS,
    factors: str | None = None,
    auto: AutoSettings = DEFAULT_AUTO,
    bsn: BalancedSubnetSettings = DEFAULT_BSN,
    unlearning: UnlearningSettings = DEFAULT_UNLEARNING,
    memorization_metric: str | None = None,
    title: str | None = None,
    overwrite: bool = False,
    oracles: str | None = None,
    oracle_config: str | None = None,
) -> dict[int, list[EditRow]]:
    """Memorization against held-out cost for every edit over a grid of strengths, and the strength ``auto`` chooses
    at each budget, for one checkpoint or one per seed, under the held-out protocol.

    Per seed: the run config with the seed's overrides is built and its checkpoint loaded; the validation set is
    split into the protocol's roles (``held_out_splits.json``); K-FAC factors are collected on ``factor_data``
    (``train``: the training set, unaugmented; ``held_out``: the factor role of the validation set); every grid
    strength is scored on the selection split, the test split and the memorized set; then, per budget, each edit's
    strength is chosen on the selection split alone (bisection) and scored the same way. Outputs in
    ``output_dir``: ``seed<s>/`` (report rows, splits, factors), ``sweep.csv`` (every point), ``budgets.md`` (the
    budget table, mean ± sd over seeds), ``sweep.png`` (the curves), ``results.md`` and TensorBoard.

    Args:
        run_config: the run's config (``configs/protocol/*.yaml``); its model, data and Trainer are built per seed.
        edits: the methods, layer sets and grid strengths (lists; the grid's kind is the kind ``auto`` searches).
        output_dir: the sweep's folder (refused if it holds a sweep, unless ``overwrite``).
        budgets: the budgets (one kind, several limits).
        seeds: train/evaluate these seeds (None: the run config as it is, with ``checkpoints`` one file).
        checkpoints: the checkpoint of each seed, ``{seed}`` filled in (e.g.
            ``runs/protocol/vit_digits_augmented/seed{seed}/checkpoints/last.ckpt``).
        train_missing: train a seed whose checkpoint is missing (``memcurve fit`` with the seed's overrides).
        seed_overrides: command-line overrides of the run config per seed, ``{seed}`` filled in (default: the seed
            of ``seed_everything`` and of the data, and the logger version ``seed<s>``).
        held_out: how the validation set is split (seed: the run's seed unless given).
        factor_data: where the factors come from: ``train`` or the ``held_out`` factor role.
        factor_settings: the factor pass (``FactorSettings``).
        factors: an existing factor file per seed (``{seed}`` filled in) instead of collecting one.
        auto: the candidate strengths of ``auto``; bsn: BalancedSubnet's settings.
        unlearning: the unlearning baselines' settings (each edit gives the method; the grid and ``auto`` the
            steps).
        memorization_metric: the memorized-set metric (default: ``mem/noised_acc`` or ``mem/strict``).
        title: the figure's title (default: the run config's name).
        overwrite: replace an existing sweep in ``output_dir``.
        oracles: the never-trained oracle's checkpoint of each seed, ``{seed}`` filled in (the same stream without
            the memorized set; the module must have ``set_oracle``, e.g. CausalLMModule): every score then carries
            the distance to it (``oracle/forget_quality``, ``oracle/privleak``), and the oracle itself is scored
            on the same splits as the target row of the tables and the figure.
        oracle_config: the oracle's run config, to train a missing oracle with ``train_missing`` (the seed
            overrides as for the run).
    """
    started = time.perf_counter()
    budget_list = budgets.budgets()
    if not edits:
        raise ValueError("--edits is empty: give the methods, layers and grid strengths to sweep")
    requests = [request for spec in edits for request in spec.requests()]
    if any(isinstance(r, AutoRequest) for r in requests):
        raise ValueError("--edits of a sweep take grid strengths (lists); auto runs at every budget by itself")
    _check_unlearning_flags(unlearning, "--unlearning")
    if factor_data == "held_out" and held_out.factor_fraction <= 0:
        raise ValueError("--factor_data held_out needs --held_out.factor_fraction > 0 (the factor role's share)")
    if not Path(run_config).is_file():
        raise FileNotFoundError(f"--run_config {run_config!r} does not exist")
    if seeds is not None and (checkpoints is None or "{seed}" not in checkpoints):
        raise ValueError(f"--seeds needs --checkpoints with a {{seed}} field; got {checkpoints!r}")
    if seeds is None and checkpoints is None:
        raise ValueError("give --checkpoints (one checkpoint, or a pattern with {seed} and --seeds)")
    if oracles is not None and seeds is not None and "{seed}" not in oracles:
        raise ValueError(f"--oracles needs a {{seed}} field with --seeds; got {oracles!r}")
    if oracle_config is not None and not Path(oracle_config).is_file():
        raise FileNotFoundError(f"--oracle_config {oracle_config!r} does not exist")
    output = Path(output_dir)
    check_output_folder("--output_dir", output)
    if (output / "sweep.csv").exists() and not overwrite:
        raise FileExistsError(
            f"--output_dir {output_dir!r} already holds a sweep (sweep.csv); choose another or pass --overwrite true"
        )
    overrides = DEFAULT_SEED_OVERRIDES if seed_overrides is None else seed_overrides
    rows_by_seed: dict[int, list[EditRow]] = {}
    oracle_rows: dict[int, EditRow] = {}
    split_names: dict[int, str] = {}
    training_seconds = 0.0
    module = None
    for seed in seeds if seeds is not None else [None]:
        seed_argv = [o.format(seed=seed) for o in overrides] if seed is not None else []
        ckpt = checkpoints.format(seed=seed) if seed is not None else checkpoints
        training_seconds += _train_missing(
            "--checkpoints", ckpt, run_config if train_missing else None, seed_argv, f"seed {seed}",
            "pass --train_missing true to train it",
        )  # fmt: skip
        cli = _run_cli("sweep", lambda parser: None, ["--config", run_config, *seed_argv])
        module, datamodule = cli.model, cli.datamodule
        oracle_state = None
        if oracles is not None:
            if not callable(getattr(module, "set_oracle", None)):  # before an oracle is trained for nothing
                raise TypeError(f"--oracles: {type(module).__name__} has no set_oracle(state_dict) to score against")
            oracle_ckpt = oracles.format(seed=seed) if seed is not None else oracles
            training_seconds += _train_missing(
                "--oracles", oracle_ckpt, oracle_config if train_missing else None, seed_argv,
                f"the oracle of seed {seed}", "pass --train_missing true and --oracle_config to train it",
            )  # fmt: skip
            oracle_state = torch.load(oracle_ckpt, map_location="cpu", weights_only=False)["state_dict"]
        checkpoint = load_run_checkpoint(module, datamodule, ckpt)
        if oracle_state is not None:
            module.set_oracle(oracle_state)  # before the scorers copy the module
        run_seed = _run_seed(cli.config)
        key = run_seed if seed is None else seed
        folder = output / f"seed{key}"
        folder.mkdir(parents=True, exist_ok=True)
        splits = split_held_out(held_out_size(datamodule), held_out, seed=run_seed)
        splits.save(folder / "held_out_splits.json", overwrite, "--output_dir")
        split_names[key] = splits.name
        print(f"memcurve sweep: seed {key}: {ckpt}; {splits.name}")
        factor_path = None
        if any(r.method in ("kfac", "kfac-separable") for r in requests):
            factor_path = factors.format(seed=key) if factors else None
            if factor_path is None:
                layers = sorted({p for r in requests if r.method.startswith("kfac") for p in r.layers})
                factor_path = _sweep_factors(
                    module, datamodule, splits, factor_data, layers, factor_settings, folder / "kfac.safetensors"
                )
        protocol = Protocol(module, datamodule, splits, budget_list[0], trainer=cli.trainer, auto=auto)
        common = {"module": module, "datamodule": datamodule, "factors": factor_path, "save": False}
        common |= {"bsn": bsn, "unlearning": unlearning}
        rows = edit_checkpoint(checkpoint, ckpt, requests, protocol=protocol, **common)
        for budget in budget_list:
            protocol.budget = budget
            autos = [AutoRequest(spec.method, tuple(spec.layers), spec.kind) for spec in edits]
            rows += edit_checkpoint(checkpoint, ckpt, autos, protocol=protocol, **common)
        write_report(folder, rows, "sweep", append=False)
        rows_by_seed[key] = rows
        if oracle_state is not None:
            oracle_rows[key] = oracle_row(protocol, checkpoint["state_dict"], oracle_state, oracle_ckpt, budget_list)
            write_report(folder, [oracle_rows[key]], "oracle", append=False)
    memorization = memorization_metric or next(
        (m for m in MEMORIZATION_METRICS if m in next(iter(rows_by_seed.values()))[0].before), None
    )
    if memorization is None:
        raise ValueError(
            f"no memorization metric among the scores; give --memorization_metric (one of "
            f"{sorted(next(iter(rows_by_seed.values()))[0].before)})"
        )
    seconds = time.perf_counter() - started
    meta = {
        "run_config": run_config,
        "seeds": sorted(rows_by_seed),
        "splits": {str(seed): name for seed, name in split_names.items()},
        "memorization_metric": memorization,
        "budget_metric": budget_list[0].metric,
        "budget_kind": budget_list[0].kind,
        "budgets": [budget.limit for budget in budget_list],
        "seconds": seconds - training_seconds,  # the sweep itself
        "training_seconds": training_seconds,  # seeds it trained first (train_missing)
        "title": title or Path(run_config).stem,
        "oracles": oracles,
    }
    _write_sweep(output, rows_by_seed, budget_list, memorization, module, meta, oracle_rows)
    print(f"memcurve sweep: {len(rows_by_seed)} seeds in {seconds / 60:.1f} min -> {output / 'results.md'}")
    return rows_by_seed


def _sweep_factors(
    module: pl.LightningModule,
    datamodule: Any,
    splits: HeldOutSplits,
    factor_data: str,
    layers: list[str],
    settings: FactorSettings,
    path: Path,
) -> Path:
    """The K-FAC factors of the sweep's checkpoint on ``factor_data``, written to ``path`` (reused when a file
    there loads and matches the model: the sweep wrote it for this checkpoint)."""
    if path.is_file():
        stored = load_factors(path, module)
        if all(name in stored.layers for name in select_linear_layers(module, layers)):
            print(f"memcurve sweep: reusing {path}")
            return path
        raise FileExistsError(f"{path} holds factors of other layers; remove it or choose another --output_dir")
    validation = single_validation_loader(module, datamodule)
    if factor_data == "held_out":
        loader = subset_loader(validation, splits.indices("factors"))
    elif callable(getattr(datamodule, "memorization_dataloader", None)):
        loader = datamodule.memorization_dataloader()  # the training set, unaugmented, in order
    else:
        loader = sequential_loader(datamodule.train_dataloader())
    callback = KFACFactors(
        layers,
        settings=settings,
        dataloader=lambda trainer: loader,
        when="validate",
        output_dir=str(path.parent),
        filename=path.name,
        log_spectra=False,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        callbacks=[callback],
    )
    # One validation batch (an example of the factor data itself; its scores are discarded) carries the callback.
    trainer.validate(module, dataloaders=subset_loader(loader, [0]), verbose=False)
    return path


def _train_missing(argument: str, ckpt: str, config: str | None, argv: list[str], what: str, fix: str) -> float:
    """Train ``ckpt`` (``memcurve fit --config config`` with the seed's ``argv``) when it is missing; refused
    (naming ``argument`` and the ``fix``) without a ``config`` to train it with. Returns the training seconds."""
    if Path(ckpt).is_file():
        return 0.0
    if config is None:
        raise FileNotFoundError(f"{argument}: {ckpt!r} does not exist ({fix})")
    print(f"memcurve sweep: training {what}: memcurve fit --config {config} {' '.join(argv)}")
    started = time.perf_counter()
    run_trainer_command(["fit", "--config", config, *argv])
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"{argument}: training {what} did not write {ckpt!r}")
    return time.perf_counter() - started


def oracle_row(
    protocol: Protocol,
    original: dict[str, Any],
    oracle: dict[str, Any],
    oracle_ckpt: str,
    budgets: list[Budget],
) -> EditRow:
    """The never-trained oracle scored like an edit of ``original``: test split and memorized set (``after``, with
    ``before`` the unedited model's), the selection split's cost under the first budget; no strength."""
    started = time.perf_counter()
    selection = protocol.selection(oracle, original)
    saved_budget, protocol.budget = protocol.budget, budgets[0]
    record = protocol.selection_record(selection, original)
    protocol.budget = saved_budget
    return EditRow(
        method="oracle",
        layers=[],
        energy=None,
        keep_fraction=None,
        ratio=None,
        tag="oracle",
        layer_names=[],
        kept_pairs=0,
        total_pairs=0,
        kept_fraction=math.nan,
        relative_change=math.nan,
        source_checkpoint=oracle_ckpt,
        edited_checkpoint=None,
        seconds=time.perf_counter() - started,
        before=protocol.test.before(original),
        after=protocol.test(oracle, original),
        selection=record,
    )


def _write_sweep(
    output: Path,
    rows_by_seed: dict[int, list[EditRow]],
    budgets: list[Budget],
    memorization: str,
    module: Any,
    meta: dict[str, Any],
    oracle_rows: dict[int, EditRow] | None = None,
) -> None:
    """``sweep.csv``, ``curves.csv``, ``budgets.{md,json}``, ``sweep.png``, ``sweep_meta.json``, ``results.md`` and
    TensorBoard of a sweep."""
    splits, title = {int(seed): name for seed, name in meta["splits"].items()}, meta["title"]
    points = sweep_points(rows_by_seed, budgets[0])
    _write_csv(output / "sweep.csv", points)
    curves = curve_table(rows_by_seed, budgets[0], memorization)
    _write_csv(output / "curves.csv", [_flat_mean_sd(c) for c in curves])
    metrics = report_columns(next(iter(rows_by_seed.values())), module)
    oracles = oracle_rows or {}
    table = results_markdown(rows_by_seed, budgets, memorization, metrics, splits, oracles=oracles)
    atomic_write(output / "budgets.md", lambda tmp: tmp.write_text(table + "\n"))
    records = budget_table(rows_by_seed, budgets, memorization, metrics, oracles=oracles)
    atomic_write(output / "budgets.json", lambda tmp: tmp.write_text(json.dumps(records, indent=1)))
    atomic_write(output / "sweep_meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    figure = plot_sweep(rows_by_seed, budgets, memorization, title, oracles=oracles)
    atomic_write(output / "sweep.png", lambda tmp: figure.savefig(tmp, format="png", dpi=130))
    writer = SummaryWriter(str(output / "tensorboard"))
    for point in points:
        if point["auto_budget"]:
            continue
        curve = f"sweep/{point['method']}/{point['kind']}/seed{point['seed']}"
        step = round(point["strength"] * 1_000_000)
        for key in ("test_cost", "selection_cost", memorization, "kept_fraction"):
            writer.add_scalar(f"{curve}/{key}", point[key], step)
    writer.add_text("sweep/budgets", table)
    writer.add_figure("sweep/figure", figure)
    writer.close()
    results = [f"# {title}: held-out protocol", "", table, "", f"![curves]({output.name}/sweep.png)"]
    atomic_write(output / "results.md", lambda tmp: tmp.write_text("\n".join(results) + "\n"))
    print(table)


def _flat_mean_sd(record: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, tuple):
            flat[f"{key} mean"], flat[f"{key} sd"] = value
        else:
            flat[key] = value
    return flat


def _write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(k for r in records for k in r)))
    writer.writeheader()
    writer.writerows(records)
    atomic_write(path, lambda tmp: tmp.write_text(buffer.getvalue()))


# -- the direct Hugging Face path --------------------------------------------------------------------------------
def hf_factors(
    model: str,
    text: str,
    layers: list[str],
    output_dir: str,
    settings: FactorSettings = DEFAULT_SETTINGS,
    filename: str = "kfac.safetensors",
    block_size: int = 512,
    max_documents: int | None = None,
    max_blocks: int | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    accelerator: str = "auto",
    devices: int | str = 1,
    precision: str | None = None,
) -> Path:
    """K-FAC factors of a pretrained causal LM on plain text, with no Lightning config and no canaries.

    Args:
        model: a HF model folder (``save_pretrained``) or hub id; its tokenizer is used.
        text: a ``.txt`` / ``.jsonl`` file, a folder of them, or ``hf:<dataset>[:<config>]``.
        layers: patterns of the layers, named as in the LightningModule: ``model.<HF name>``
            (e.g. ``model.model.layers.*.mlp.up_proj``).
        output_dir: folder of the factor file (``memcurve edit`` reads it).
        settings: the factor pass (:class:`~memcurve.curvature.settings.FactorSettings`).
        filename: name of the factor file.
        block_size: tokens per block (batches: ``settings.batch_size`` blocks, default 8); max_documents: read at most
            this many documents; max_blocks: use a seeded random subset of at most this many blocks.
        dtype: dtype the model is loaded in; revision, trust_remote_code: passed to ``from_pretrained``.
        accelerator, devices, precision: of the Trainer that runs the pass.
    """
    module = CausalLMModule(model=model, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    data = TextDataModule(
        text=text,
        tokenizer=model,
        block_size=block_size,
        batch_size=settings.batch_size or 8,
        max_documents=max_documents,
        max_blocks=max_blocks,
    )
    callback = KFACFactors(
        layers, settings=settings, dataloader="train", when="validate", output_dir=output_dir, filename=filename
    )
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        callbacks=[callback],
    )
    trainer.validate(module, datamodule=data, verbose=False)
    path = Path(callback.saved_paths[-1])
    if trainer.is_global_zero:
        print(f"memcurve factors: {path}")
    return path


def edit(
    source: str,
    output: str,
    layers: list[str],
    factors: str | None = None,
    method: str = "kfac",
    energy: float | None = None,
    keep_fraction: float | None = None,
    dtype: str = "auto",
    prefix: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_shard_size: str = "5GB",
    hf_output_dir: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Edit a HF model folder / hub id into a new ``save_pretrained`` folder (with its tokenizer and
    ``memcurve_edit.json``), or a Lightning checkpoint (``*.ckpt``) into a new checkpoint; layer by layer.

    Args:
        source: a HF model folder or hub id, or a Lightning checkpoint file (never modified).
        output: the new folder (HF) or checkpoint file; an existing one is refused unless ``overwrite``.
        layers: patterns of the layers to edit (HF names or factor names).
        factors: a KFACFactors file or ``*.index.json`` (not for ``method=svd``).
        method: ``kfac``, ``kfac-separable`` or ``svd``.
        energy, keep_fraction: exactly one: the fraction of Σκ (Σσ²) or of the directions kept.
        dtype: dtype to load a HF model in (``auto``: the checkpoint's); prefix: factor name = prefix + HF name.
        revision, trust_remote_code, max_shard_size: of ``from_pretrained`` / ``save_pretrained``.
        hf_output_dir: for a checkpoint of a CausalLMModule, also save the edited model as a HF folder.
        overwrite: replace an existing output.
    """
    common = {"energy": energy, "keep_fraction": keep_fraction, "method": method}
    looks_local = source.endswith(".ckpt") or source.startswith((".", "/", "~")) or Path(source).suffix != ""
    if looks_local and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"--source {source!r} does not exist (a HF model folder or hub id, or a .ckpt file)")
    if Path(source).is_file():
        record = edit_lightning_checkpoint(
            source, factors, layers, output=output, hf_output_dir=hf_output_dir, overwrite=overwrite, **common
        )
    else:
        record = edit_hf_model(
            source,
            factors,
            layers,
            output_dir=output,
            dtype=dtype,
            prefix=prefix,
            revision=revision,
            trust_remote_code=trust_remote_code,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            **common,
        )
    fraction = record["kept_pairs"] / record["total_pairs"] if record["total_pairs"] else float("nan")
    print(
        f"memcurve edit: {method} on {len(record['layers'])} layers: kept {record['kept_pairs']:,} of "
        f"{record['total_pairs']:,} directions ({fraction:.2%}) -> {output}"
    )
    return record


def _function_command(command: str, function: Callable[..., Any], argv: Sequence[str]) -> Any:
    parser = ArgumentParser(prog=f"memcurve {command}", description=function.__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(function)
    config = parser.parse_args(list(argv))
    values = parser.instantiate_classes(config).as_dict()
    values.pop("config", None)
    values = {k: v for k, v in values.items() if not k.startswith("__")}
    return function(**values)


def run_hf_factors(argv: Sequence[str]) -> Path:
    return _function_command("factors", hf_factors, argv)


def run_edit(argv: Sequence[str]) -> dict[str, Any]:
    return _function_command("edit", edit, argv)


# -- entry point --------------------------------------------------------------------------------------------------
COMMANDS = {
    "fit": "train a model (LightningCLI; any LightningModule/DataModule by class_path)",
    "validate": "validate a checkpoint (LightningCLI)",
    "test": "test a checkpoint (LightningCLI)",
    "factors": "collect K-FAC factors of a run's checkpoint, or of a pretrained HF causal LM on text (--text)",
    "probe": "band activations of memorized vs other examples in the K-FAC and SVD bases",
    "prune": "sweep edits (methods x strengths x layer sets) of one checkpoint: report, table, figure",
    "compare": "K-FAC, SVD, BalancedSubnet and unlearning baselines side by side on one checkpoint: one table",
    "sweep": "memorization against held-out cost over strengths and seeds; auto strengths at budgets (held-out)",
    "edit": "edit a HF model folder or a Lightning checkpoint into a new one, layer by layer",
}
_RUNNERS: dict[str, Callable[[Sequence[str]], Any]] = {
    "fit": lambda argv: run_trainer_command(["fit", *argv]),
    "validate": lambda argv: run_trainer_command(["validate", *argv]),
    "test": lambda argv: run_trainer_command(["test", *argv]),
    "factors": run_factors,
    "probe": run_probe,
    "prune": lambda argv: run_edits("prune", argv),
    "compare": lambda argv: run_edits("compare", argv),
    "sweep": lambda argv: _function_command("sweep", sweep, argv),
    "edit": run_edit,
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: memcurve <command> [--config FILE] [--print_config] [flags]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "memcurve <command> --help lists a command's flags; --debug shows the traceback of an error."]
    return "\n".join(lines)


# What a user can cause and fix: printed as one line (``--debug`` or MEMCURVE_DEBUG=1 show the traceback). Any
# other exception is memcurve's own fault and keeps its traceback.
USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    MemoryPlanError,
)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: ``memcurve <command> ...`` (``argv`` defaults to the command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MEMCURVE_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    try:
        run(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        message = " ".join(str(error).split())  # one line, whatever the exception's formatting
        print(f"memcurve {argv[0] if argv else ''}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: Sequence[str]) -> Any:
    """Run one command and return what it produced (the CLI object, the factor path, the report rows, ...)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    command, rest = argv[0], argv[1:]
    if command not in _RUNNERS:
        print(f"memcurve: unknown command {command!r}; choose one of {tuple(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    return _RUNNERS[command](rest)


def instantiate(config: str | Path) -> LightningCLI:
    """The model, datamodule and Trainer of a run config (a source config or the ``config.yaml`` a run saved
    beside its logs); nothing is run."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(config)!r} does not exist")
    settings = yaml.safe_load(path.read_text()) or {}
    if not isinstance(settings, dict):
        raise TypeError(f"--config {str(config)!r} is not a YAML mapping of LightningCLI settings")
    return _run_cli("validate", lambda parser: None, ["--config", str(path)])


if __name__ == "__main__":
    main()
