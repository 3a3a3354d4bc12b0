"""The held-out protocol of one checkpoint: choose an edit's strength on the selection split, report it on the test.

:class:`Protocol` holds the two scorers of :mod:`memcurve.data.held_out`'s roles and the budget:

* ``selection`` scores through the module's validation loop on the selection split alone, with no DataModule lent:
  it cannot read the memorized set, the training data or the test split (the memorization pass of memcurve's
  classifier and the LM's canary recall do not run without a DataModule). Only the budget's metric is used.
* ``test`` scores the unedited and the edited weights for the report: the module's ``evaluation_metrics`` on a
  DataModule whose validation data is the test split (memorization on the memorized set, held-out cost on the
  test split), or, without ``evaluation_metrics``, its validation loop on the test split (DataModule lent).

An :class:`AutoRequest` (``energy: auto``, ``keep_fraction: auto``, ``ratio: auto``, ``steps: auto``) becomes the
strongest :class:`EditRequest` within the budget on the selection split (:func:`memcurve.editing.auto.strongest_within`,
bisection over :func:`~memcurve.editing.auto.candidate_strengths`); every selection score measured (the sweep's grid
points too) is remembered per method, layer set and strength kind and enters the monotonicity check. A step count of
an unlearning method is evaluated by running that many steps from the checkpoint (each candidate is its own run; the
runs are prefixes of one trajectory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from memcurve.curvature.storage import StoredFactors
from memcurve.data.held_out import HeldOutSplits, HeldOutView, subset_loader
from memcurve.editing.auto import AUTO, Budget, candidate_strengths, strongest_within
from memcurve.editing.methods import BalancedSubnetSettings, apply_edit
from memcurve.editing.request import (
    EDIT_METHODS,
    EditRequest,
    layer_patterns,
    layers_id,
    requests_for,
    strength_kinds,
)
from memcurve.editing.scoring import Scorer, scores_by_validation, validation_dataloaders
from memcurve.editing.unlearning import UnlearningSettings
from memcurve.utils.arguments import check_choice

__all__ = ["AutoRequest", "AutoSettings", "Protocol", "single_validation_loader", "strength_requests"]

_LETTER = {"energy": "e", "keep_fraction": "k", "ratio": "r", "steps": "s"}


@dataclass(frozen=True)
class AutoSettings:
    """The strengths ``auto`` may choose from (:func:`~memcurve.editing.auto.candidate_strengths`)."""

    resolution: float = 0.02
    """Neighbouring candidates are a factor 1 + resolution apart (0.02: ~9 evaluations over four decades)."""
    minimum: float = 1e-4
    """Strongest energy / keep fraction, and weakest BalancedSubnet ratio, considered."""
    max_ratio: float = 0.5
    """Strongest BalancedSubnet ratio considered."""
    min_steps: int = 1
    """Fewest unlearning steps considered (the weakest edit of the unlearning methods)."""
    max_steps: int = 100
    """Most unlearning steps considered (the strongest); candidates are integers, 2% apart once that exceeds a step."""

    def __post_init__(self) -> None:
        candidate_strengths("keep_fraction", self.minimum, None, self.resolution)  # validates all four
        candidate_strengths("ratio", self.minimum, self.max_ratio, self.resolution)
        candidate_strengths("steps", self.min_steps, self.max_steps, self.resolution)

    def candidates(self, kind: str) -> list[float] | list[int]:
        if kind == "steps":
            return candidate_strengths(kind, self.min_steps, self.max_steps, self.resolution)
        return candidate_strengths(kind, self.minimum, self.max_ratio if kind == "ratio" else None, self.resolution)


@dataclass(frozen=True)
class AutoRequest:
    """An edit whose strength (of ``kind``) is chosen on the selection split under a budget."""

    method: str
    layers: tuple[str, ...] = field(default=())
    kind: str = "keep_fraction"

    def __post_init__(self) -> None:
        check_choice("method", self.method, EDIT_METHODS)
        object.__setattr__(self, "layers", layer_patterns(self.layers))
        allowed = strength_kinds(self.method)
        if self.kind not in allowed:
            raise ValueError(f"method={self.method!r} takes {' or '.join(allowed)}: auto; got {self.kind}: auto")

    def request(self, value: float | int) -> EditRequest:
        return EditRequest(self.method, self.layers, **{self.kind: value})

    @property
    def tag(self) -> str:
        return f"{self.method}-{_LETTER[self.kind]}{AUTO}-L{layers_id(self.layers)}"

    @property
    def key(self) -> tuple[str, tuple[str, ...], str]:
        return self.method, self.layers, self.kind


def strength_requests(
    method: str,
    layers: str | Sequence[str],
    *,
    energy: Any = None,
    keep_fraction: Any = None,
    ratio: Any = None,
    steps: Any = None,
) -> list[EditRequest | AutoRequest]:
    """:func:`~memcurve.editing.request.requests_for`, where a strength may also be ``"auto"`` (one
    :class:`AutoRequest` of that kind, chosen under a budget)."""
    values = {"energy": energy, "keep_fraction": keep_fraction, "ratio": ratio, "steps": steps}
    autos = [AutoRequest(method, layer_patterns(layers), kind) for kind, value in values.items() if value == AUTO]
    fixed = {kind: (None if value == AUTO else value) for kind, value in values.items()}
    if autos and all(value is None or value == [] for value in fixed.values()):
        return autos
    return autos + requests_for(method, layers, **fixed)


def single_validation_loader(module: nn.Module, datamodule: Any = None, trainer: Any = None) -> Any:
    """The run's one validation loader (what the roles split): a DataModule's unaugmented ``evaluation_dataloader``
    when it has one, else the loader a scorer would validate on."""
    if callable(getattr(datamodule, "evaluation_dataloader", None)):
        return datamodule.evaluation_dataloader("val", shard=False)
    loaders = validation_dataloaders(trainer, datamodule)
    if len(loaders) != 1:
        raise ValueError(
            f"the held-out protocol splits one validation loader; {type(module).__name__}'s run has {len(loaders)}"
        )
    return loaders[0]


class Protocol:
    """Selection and test scorers of one checkpoint's run, the splits and the budget (see the module docstring).

    Args:
        module: the LightningModule (copied by the scorers, never modified).
        datamodule: the run's DataModule (may be None when the loaders were given to ``fit``).
        splits: the held-out roles (``split_held_out`` over the validation set's size).
        budget: the budget of ``auto`` requests (None: only fixed strengths, each still scored on both splits).
        trainer: the live Trainer, if any (device, precision, validation data).
        auto: the candidate strengths.
    """

    def __init__(
        self,
        module: nn.Module,
        datamodule: Any,
        splits: HeldOutSplits,
        budget: Budget | None = None,
        *,
        trainer: Any = None,
        auto: AutoSettings = AutoSettings(),
    ) -> None:
        loader = single_validation_loader(module, datamodule, trainer)
        if len(loader.dataset) != splits.size:
            raise ValueError(
                f"the held-out splits cover {splits.size} examples but the validation set has {len(loader.dataset)}: "
                "they were made for other data"
            )
        self.splits, self.budget, self.auto = splits, budget, auto
        self.selection = Scorer(module, None, trainer, loaders=[subset_loader(loader, splits.indices("selection"))])
        test = subset_loader(loader, splits.indices("test"))
        if scores_by_validation(module):
            self.test = Scorer(module, datamodule, trainer, loaders=[test])
        else:
            self.test = Scorer(module, HeldOutView(datamodule, splits.indices("test")), trainer)
        self.measured: dict[tuple[str, tuple[str, ...], str], dict[float, dict[str, float]]] = {}

    # -- selection scores ----------------------------------------------------------------------------------------
    def selection_before(self, original: Mapping[str, Any]) -> dict[str, float]:
        scores = self.selection.before(original)
        if self.budget is not None and self.budget.metric not in scores:
            raise ValueError(
                f"budget metric {self.budget.metric!r} is not among the metrics the validation loop logs on the "
                f"selection split: {sorted(scores)}; set the budget's metric to one of them"
            )
        return scores

    def score_selection(
        self, request: EditRequest, state_dict: Mapping[str, Any], original: Mapping[str, Any]
    ) -> dict[str, float]:
        """Selection-split scores of an edited state dict, remembered for the monotonicity check."""
        kind, value = request.strength
        scores = self.selection(state_dict, original)
        self.measured.setdefault((request.method, request.layers, kind), {})[value] = scores
        return scores

    def selection_record(self, scores: Mapping[str, float], original: Mapping[str, Any]) -> dict[str, Any]:
        """What a report row says about the selection split: the budget's metric before/after and its cost."""
        before = self.selection_before(original)
        record: dict[str, Any] = {"split": self.splits.name}
        metrics = [self.budget.metric] if self.budget is not None else sorted(scores)
        for metric in metrics:
            record[f"before {metric}"] = before.get(metric, math.nan)
            record[f"after {metric}"] = scores.get(metric, math.nan)
        if self.budget is not None:
            record["cost"] = self.budget.cost(before[self.budget.metric], scores.get(self.budget.metric, math.nan))
        return record

    # -- auto ----------------------------------------------------------------------------------------------------
    def choose(
        self,
        auto: AutoRequest,
        original: Mapping[str, Any],
        layer_names: Sequence[str],
        *,
        factors: StoredFactors | None,
        module: nn.Module,
        datamodule: Any = None,
        bsn: BalancedSubnetSettings | None = None,
        unlearning: UnlearningSettings | None = None,
        log: Callable[[str], None] = print,
    ) -> tuple[EditRequest, dict[str, Any]]:
        """The strongest request of ``auto`` within the budget on the selection split, and the record of the search
        (budget, chosen value, whether any candidate was within, points evaluated, monotonicity). When even the
        weakest candidate is outside the budget, that weakest request is returned with ``within: False``."""
        if self.budget is None:
            raise ValueError(f"{auto.tag}: an auto strength needs a budget (max_accuracy_drop or max_perplexity_ratio)")
        budget = self.budget
        base = self.selection_before(original)[budget.metric]
        memory = self.measured.setdefault(auto.key, {})

        def cost_of(value: float) -> float:
            if value not in memory:
                request = auto.request(value)
                result = apply_edit(
                    request,
                    original,
                    layer_names,
                    factors=factors,
                    module=module,
                    datamodule=datamodule,
                    bsn=bsn,
                    unlearning=unlearning,
                )
                self.score_selection(request, result.state_dict, original)
            return budget.cost(base, memory[value].get(budget.metric, math.nan))

        candidates = self.auto.candidates(auto.kind)
        known = {value: budget.cost(base, s.get(budget.metric, math.nan)) for value, s in memory.items()}
        result = strongest_within(candidates, cost_of, budget.limit, known=known)
        within = result.value is not None
        value = result.value if within else candidates[0]
        record = {
            "budget": budget.label,
            "budget_metric": budget.metric,
            "budget_limit": budget.limit,
            "budget_kind": budget.kind,
            "kind": auto.kind,
            "chosen": value,
            "within": within,
            "selection_cost": cost_of(value),
            "evaluated": [[v, c, w] for v, c, w in result.evaluated],
            "monotone": result.monotone,
            "violations": [list(pair) for pair in result.violations],
        }
        note = "" if result.monotone else f"; cost not monotone at {len(result.violations)} measured pairs"
        chosen = f"{auto.kind} {value!r}" if within else f"none within (weakest {auto.kind} {value!r})"
        log(
            f"memcurve: {auto.tag}: {budget.label} on the selection split -> {chosen}, selection cost "
            f"{budget.format_cost(record['selection_cost'])} after {len(result.evaluated)} evaluations{note}"
        )
        return auto.request(value), record
