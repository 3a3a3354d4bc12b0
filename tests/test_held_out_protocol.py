"""The held-out protocol: ``auto`` strengths chosen by bisection under a budget on the selection split alone, seeded
disjoint splits saved with their sha256, blindness of the choice to the memorized set and to the test split, the
pipeline's report rows, ``memcurve sweep`` end to end and the pruning callbacks' ``auto`` strengths."""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, TensorDataset

from memcurve.callbacks import BalancedSubnetPruning, KFACFactors, KFACPruning, SVDPruning
from memcurve.cli import run
from memcurve.curvature import FactorSettings
from memcurve.data import NoisyLabelDataModule
from memcurve.data.held_out import (
    ROLES,
    HeldOutSettings,
    HeldOutSplits,
    HeldOutView,
    held_out_size,
    split_held_out,
    subset_loader,
)
from memcurve.editing import EditRequest
from memcurve.editing.auto import Budget, candidate_strengths, strongest_within
from memcurve.editing.pipeline import edit_checkpoint
from memcurve.editing.protocol import AutoRequest, AutoSettings, Protocol, strength_requests
from memcurve.lightning_modules import NoisyLabelClassifier

CONFIG = Path(__file__).parents[1] / "configs" / "vit_digits_noisy.yaml"
TINY_VIT_KWARGS = {"img_size": 8, "in_chans": 1, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2}
LAYERS = ["model.blocks.*.mlp.fc2"]
DATA = {"val_size": 297, "subset_size": 300, "val_subset_size": 120, "batch_size": 50, "eval_batch_size": 120}
KINDS = ("keep_fraction", "energy", "ratio")


def quiet(_: str) -> None:
    """The pipeline's log: silent here."""


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


# -- 1. auto maths ------------------------------------------------------------------------------------------------
def step_cost(candidates: list[float], boundary: int, calls: list[float]):
    """Cost 0 for the first ``boundary`` candidates (weakest first), 1 from there on; every call recorded."""
    position = {value: i for i, value in enumerate(candidates)}

    def cost(value: float) -> float:
        calls.append(value)
        return 0.0 if position[value] < boundary else 1.0

    return cost


@pytest.mark.parametrize("kind", KINDS)
def test_strongest_within_returns_exactly_the_boundary_candidate(kind):
    candidates = candidate_strengths(kind)
    n = len(candidates)
    for boundary in range(n + 1):  # 0: none within ... n: all within
        calls: list[float] = []
        result = strongest_within(candidates, step_cost(candidates, boundary, calls), limit=0.5)
        if boundary == 0:
            assert result.value is None and result.index is None, boundary
        else:
            assert result.index == boundary - 1 and result.value == candidates[boundary - 1], boundary
        assert len(calls) == len(set(calls)), f"boundary {boundary}: a value was evaluated twice: {calls}"
        assert [v for v, _, _ in result.evaluated] == calls  # in the order evaluated
        assert all(within == (cost <= 0.5) for _, cost, within in result.evaluated)
        assert result.monotone and result.violations == []
        if result.value is not None:  # the returned value was measured within the budget
            assert (result.value, 0.0, True) in result.evaluated
        if result.index is not None and result.index + 1 < n:  # its stronger neighbour was measured outside
            assert (candidates[result.index + 1], 1.0, False) in result.evaluated
    all_within = strongest_within(candidates, lambda value: 0.0, limit=0.5)
    assert all_within.value == candidates[-1]  # the strongest


@pytest.mark.parametrize("kind", KINDS)
def test_bisection_evaluates_at_most_ceil_log2_n_plus_one_times(kind):
    """Binary search with virtual ends: at most ceil(log2(n + 1)) evaluations, never more than ceil(log2 n) + 1."""
    candidates = candidate_strengths(kind)
    bound = math.ceil(math.log2(len(candidates) + 1))
    counts = {}
    for boundary in range(len(candidates) + 1):
        calls: list[float] = []
        strongest_within(candidates, step_cost(candidates, boundary, calls), limit=0.5)
        counts[boundary] = len(calls)
    worst = {boundary: count for boundary, count in counts.items() if count > bound}
    assert not worst, f"{len(worst)} boundaries need more than {bound} evaluations, e.g. {list(worst.items())[:3]}"


def test_small_candidate_lists_and_nan_costs():
    for n in range(1, 12):
        candidates = [1.0 - i / 20 for i in range(n)]
        for boundary in range(n + 1):
            calls: list[float] = []
            result = strongest_within(candidates, step_cost(candidates, boundary, calls), limit=0.5)
            assert result.index == (boundary - 1 if boundary else None), (n, boundary)
            assert len(calls) == len(set(calls))
    candidates = candidate_strengths("keep_fraction", minimum=0.01, resolution=0.1)
    for boundary in (1, 7, len(candidates) - 1):  # NaN costs from the boundary on: outside the budget
        result = strongest_within(candidates, lambda v, b=boundary: 0.0 if candidates.index(v) < b else math.nan, 0.5)
        assert result.index == boundary - 1
    assert strongest_within(candidates, lambda value: math.nan, limit=0.5).value is None
    with pytest.raises(ValueError, match="at least one candidate"):
        strongest_within([], lambda value: 0.0, limit=0.5)


def test_non_monotone_costs_are_reported():
    candidates = candidate_strengths("keep_fraction", minimum=0.01, resolution=0.1)  # 1.0 ... 0.01
    weaker, stronger = candidates[2], candidates[9]
    known = {weaker: 0.4, stronger: 0.1}  # the stronger edit costs less: not monotone
    result = strongest_within(candidates, lambda value: 0.0, limit=0.5, known=known)
    assert not result.monotone
    assert (weaker, stronger) in result.violations
    assert result.value == candidates[-1]  # the choice itself still comes from the measured points
    assert strongest_within(candidates, lambda value: 0.0, limit=0.5, known=known, tolerance=0.5).monotone
    # Evaluated points that break monotonicity are caught too (ratio: larger = stronger).
    ratios = candidate_strengths("ratio", minimum=0.01, maximum=0.5, resolution=0.1)
    first = (len(ratios) - 1) // 2  # the bisection's first probe
    result = strongest_within(ratios, lambda value: 0.3 if value == ratios[first] else 0.0, limit=0.5)
    assert result.value == ratios[-1] and not result.monotone
    assert (ratios[first], ratios[-1]) in result.violations
    monotone = strongest_within(ratios, lambda value: value, limit=0.1, known={ratios[3]: ratios[3]})
    assert monotone.monotone and monotone.value <= 0.1 < ratios[monotone.index + 1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("minimum", "maximum", "resolution"), [(1e-4, None, 0.02), (0.01, 0.4, 0.3)])
def test_candidate_strengths_run_weakest_to_strongest(kind, minimum, maximum, resolution):
    values = candidate_strengths(kind, minimum, maximum, resolution)
    top = maximum if maximum is not None else (0.5 if kind == "ratio" else 1.0)
    if kind == "ratio":  # larger = stronger: ascending
        assert values[0] == minimum and values[-1] == top
        pairs = list(itertools.pairwise(values))
    else:  # smaller = stronger: descending, from the identity edit
        assert values[0] == top and values[-1] == minimum
        pairs = [(b, a) for a, b in itertools.pairwise(values)]
    assert all(1 < high / low <= (1 + resolution) * (1 + 1e-9) for low, high in pairs), pairs[:3]
    assert len(values) == len(set(values)) >= 2


def test_candidate_strengths_and_auto_settings_refuse_bad_ranges():
    with pytest.raises(ValueError, match="strength kind='rank'"):
        candidate_strengths("rank")
    with pytest.raises(ValueError, match="auto resolution=0"):
        candidate_strengths("energy", resolution=0)
    with pytest.raises(ValueError, match=r"auto range \[0.5, 0.2\]"):
        candidate_strengths("energy", minimum=0.5, maximum=0.2)
    with pytest.raises(ValueError, match=r"auto range \[0.1, 1.0\] of ratio"):
        candidate_strengths("ratio", minimum=0.1, maximum=1.0)
    with pytest.raises(ValueError, match="auto resolution=-1"):
        AutoSettings(resolution=-1)
    settings = AutoSettings(resolution=0.5, minimum=0.01, max_ratio=0.3)
    assert settings.candidates("ratio") == candidate_strengths("ratio", 0.01, 0.3, 0.5)
    assert settings.candidates("energy") == candidate_strengths("energy", 0.01, None, 0.5)


def test_budget_takes_exactly_one_valid_limit():
    for arguments in ({}, {"max_accuracy_drop": 0.01, "max_perplexity_ratio": 1.1}):
        with pytest.raises(ValueError, match=r"exactly one of max_accuracy_drop .* and max_perplexity_ratio"):
            Budget(**arguments)
    for value in (-0.01, 1.0, math.nan, True, "0.01"):
        with pytest.raises(ValueError, match=r"max_accuracy_drop=.* must be a number in \[0, 1\)"):
            Budget(max_accuracy_drop=value)
    for value in (0.99, math.inf, False):
        with pytest.raises(ValueError, match=r"max_perplexity_ratio=.* must be a number >= 1"):
            Budget(max_perplexity_ratio=value)
    with pytest.raises(ValueError, match="budget metric=''"):
        Budget(max_accuracy_drop=0.01, metric="")

    drop = Budget(max_accuracy_drop=0.01)
    assert (drop.metric, drop.kind, drop.limit) == ("val/acc", "drop", 0.01)
    assert drop.cost(0.9, 0.85) == pytest.approx(0.05)
    assert drop.within(0.9, 0.89) and drop.within(0.9, 0.95) and not drop.within(0.9, 0.88)
    assert not drop.within(0.9, math.nan)
    assert drop.label == "val/acc drop ≤ 0.01" and drop.format_cost(0.007) == "0.7 pt"
    ratio = Budget(max_perplexity_ratio=1.1)
    assert (ratio.metric, ratio.kind, ratio.limit) == ("val/perplexity", "ratio", 1.1)
    assert ratio.cost(10.0, 11.0) == pytest.approx(1.1)
    assert ratio.within(10.0, 11.0) and ratio.within(10.0, 9.0) and not ratio.within(10.0, 11.5)
    assert not ratio.within(10.0, math.nan)
    assert Budget(max_perplexity_ratio=1.2, metric="val/ppl").metric == "val/ppl"


# -- 2. splits ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "selection", "factors"), [(297, 0.5, 0.0), (120, 0.3, 0.2), (10, 0.5, 0.25)])
def test_split_held_out_is_a_seeded_disjoint_cover(size, selection, factors):
    settings = HeldOutSettings(selection_fraction=selection, factor_fraction=factors)
    splits = split_held_out(size, settings, seed=0)
    parts = [splits.indices(role) for role in ROLES]
    assert sorted(i for part in parts for i in part) == list(range(size))  # disjoint and covering
    assert all(list(part) == sorted(part) for part in parts)
    num_factors = len(splits.indices("factors"))
    assert abs(num_factors - factors * size) <= 0.5
    assert abs(len(splits.indices("selection")) - selection * (size - num_factors)) <= 0.5
    assert len(splits.indices("test")) >= 1 and len(splits.indices("selection")) >= 1
    assert split_held_out(size, settings, seed=0) == splits  # deterministic
    others = [split_held_out(size, settings, seed=seed) for seed in (1, 2, 3)]
    assert all(other.indices("selection") != splits.indices("selection") for other in others)
    assert len({other.sha256 for other in others} | {splits.sha256}) == 4
    # A seed in the settings is the split's seed whatever the run's seed.
    seeded = HeldOutSettings(selection_fraction=selection, factor_fraction=factors, seed=3)
    assert split_held_out(size, seeded, seed=0).roles == others[2].roles
    with pytest.raises(ValueError, match="must be seeded"):
        split_held_out(size, settings)


def test_split_json_round_trip_and_tampering():
    splits = split_held_out(120, HeldOutSettings(selection_fraction=0.4, factor_fraction=0.1), seed=7)
    record = json.loads(json.dumps(splits.to_json()))
    again = HeldOutSplits.from_json(record)
    assert again.to_json() == splits.to_json() and again.sha256 == splits.sha256 == record["sha256"]
    assert again.roles == splits.roles and (again.size, again.seed) == (120, 7)
    assert splits.sha256[:8] in splits.name and "selection 43" in splits.name
    # Swap one example between selection and test: still a disjoint cover, but not what the hash names.
    tampered = json.loads(json.dumps(record))
    a, b = tampered["roles"]["selection"][0], tampered["roles"]["test"][0]
    tampered["roles"]["selection"][0], tampered["roles"]["test"][0] = b, a
    with pytest.raises(ValueError, match="sha256 is missing or does not match its indices"):
        HeldOutSplits.from_json(tampered)
    unsigned = {key: value for key, value in record.items() if key != "sha256"}
    with pytest.raises(ValueError, match="sha256 is missing"):
        HeldOutSplits.from_json(unsigned)
    shared = json.loads(json.dumps(record))
    shared["roles"]["test"].append(shared["roles"]["selection"][0])
    with pytest.raises(ValueError, match="shares examples"):
        HeldOutSplits.from_json(shared)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"selection_fraction": 0}, r"held_out\.selection_fraction=0 must be in \(0, 1\)"),
        ({"selection_fraction": 1}, r"held_out\.selection_fraction=1 must be in \(0, 1\)"),
        ({"selection_fraction": math.nan}, r"held_out\.selection_fraction=nan must be a number"),
        ({"factor_fraction": 1}, r"held_out\.factor_fraction=1 must be in \[0, 1\)"),
        ({"factor_fraction": -0.1}, r"held_out\.factor_fraction=-0\.1 must be in \[0, 1\)"),
        ({"seed": -1}, r"held_out\.seed=-1 must be an integer >= 0"),
        ({"seed": 1.5}, r"held_out\.seed=1\.5 must be an integer"),
    ],
)
def test_bad_held_out_settings_name_the_field(arguments, message):
    with pytest.raises(ValueError, match=message):
        HeldOutSettings(**arguments)


def test_a_split_leaving_a_role_empty_is_refused():
    with pytest.raises(ValueError, match="leaves 2 for selection and 0 for test"):
        split_held_out(2, HeldOutSettings(selection_fraction=0.9), seed=0)
    with pytest.raises(ValueError, match="held-out size=1"):
        split_held_out(1, HeldOutSettings(), seed=0)


def test_subset_loader_yields_exactly_the_chosen_examples_in_order():
    loader = DataLoader(TensorDataset(torch.arange(20) * 10), batch_size=3, shuffle=True)
    chosen = [5, 2, 19, 0, 7]
    subset = subset_loader(loader, chosen)
    batches = [batch[0] for batch in subset]
    assert [len(batch) for batch in batches] == [3, 2]  # the loader's batch size, nothing dropped
    assert torch.cat(batches).tolist() == [10 * i for i in chosen]
    assert torch.cat([batch[0] for batch in subset]).tolist() == [10 * i for i in chosen]  # not shuffled
    with pytest.raises(TypeError, match="needs a torch DataLoader"):
        subset_loader([1, 2, 3], [0])


def test_held_out_view_gives_one_role_of_the_validation_set():
    datamodule = digits()
    splits = split_held_out(held_out_size(datamodule), HeldOutSettings(), seed=0)
    assert held_out_size(datamodule) == 120
    view = HeldOutView(datamodule, splits.indices("test"))
    read = [int(i) for batch in view.evaluation_dataloader("val") for i in batch["index"]]
    assert read == list(splits.indices("test"))
    assert [int(i) for batch in view.val_dataloader() for i in batch["index"]] == read
    train = [int(i) for batch in view.evaluation_dataloader("train", shard=False) for i in batch["index"]]
    assert train == list(range(300))  # the memorized set is the DataModule's
    assert view.train_eval_set is datamodule.train_eval_set and view.role == "test"


# -- 3. blindness of the choice -------------------------------------------------------------------------------------
def digits() -> NoisyLabelDataModule:
    datamodule = NoisyLabelDataModule(**DATA)
    datamodule.setup("fit")
    return datamodule


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, one_thread) -> tuple[NoisyLabelClassifier, Path]:
    """A tiny digits ViT fitted for 30 epochs on 300 images (about 3 s), with K-FAC factors of its fc2 layers."""
    folder = tmp_path_factory.mktemp("fitted")
    pl.seed_everything(0, verbose=False)
    model = NoisyLabelClassifier(
        model_kwargs=dict(TINY_VIT_KWARGS), lr=3e-3, warmup_epochs=0, memorization_eval_every_n_epochs=0
    )
    factors = KFACFactors(LAYERS, settings=FactorSettings(position="cls"), when="fit_end", output_dir=str(folder))
    trainer = pl.Trainer(
        max_epochs=30,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[factors],
    )
    trainer.fit(model, datamodule=NoisyLabelDataModule(**DATA))
    return model, Path(factors.saved_paths[-1])


class Reads:
    """Which examples are read, by which scorer (the phase), from which dataset."""

    def __init__(self) -> None:
        self.phase = "none"
        self.records: list[tuple[str, str, int]] = []

    @contextlib.contextmanager
    def during(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def indices(self, phase: str, dataset: str) -> list[int]:
        return [i for p, d, i in self.records if (p, d) == (phase, dataset)]


class Recording(Dataset):
    def __init__(self, base: Dataset, name: str, reads: Reads) -> None:
        self.base, self.name, self.reads = base, name, reads

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        self.reads.records.append((self.reads.phase, self.name, int(index)))
        return self.base[index]


class InPhase:
    """A scorer whose reads are recorded under ``phase``."""

    def __init__(self, scorer, reads: Reads, phase: str) -> None:
        self.scorer, self.reads, self.phase = scorer, reads, phase

    def __call__(self, *args):
        with self.reads.during(self.phase):
            return self.scorer(*args)

    def before(self, *args):
        with self.reads.during(self.phase):
            return self.scorer.before(*args)

    def __getattr__(self, name: str):
        return getattr(self.scorer, name)


class Replaced(Dataset):
    """The validation set with the examples ``indices`` replaced by random images and labels."""

    def __init__(self, base: Dataset, indices, seed: int) -> None:
        self.base = base
        generator = torch.Generator().manual_seed(seed)
        shape = base[0]["image"].shape
        self.replaced = {
            int(i): (torch.randn(shape, generator=generator), int(torch.randint(10, (), generator=generator)))
            for i in indices
        }

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        item = self.base[index]
        if int(index) in self.replaced:
            image, label = self.replaced[int(index)]
            label = torch.tensor(label, dtype=item["label"].dtype)
            item = dict(item, image=image, label=label, true_label=label)
        return item


def permute_memorized_labels(datamodule: NoisyLabelDataModule) -> None:
    """Shuffle the (noised) training labels: another memorized set, the same held-out data."""
    labels = datamodule.train_eval_set.labels
    permuted = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))].clone()
    assert not torch.equal(permuted, labels)
    for dataset in (datamodule.train_set, datamodule.train_eval_set):
        dataset.labels, dataset.is_noised = permuted, permuted != dataset.true_labels


def choose(module, factors: Path, datamodule, method: str, reads: Reads | None = None):
    """One auto request through the pipeline under the held-out protocol (split seed 0, 2-point budget)."""
    splits = split_held_out(held_out_size(datamodule), HeldOutSettings(), seed=0)
    protocol = Protocol(module, datamodule, splits, Budget(max_accuracy_drop=0.02))
    if reads is not None:
        protocol.selection = InPhase(protocol.selection, reads, "selection")
        protocol.test = InPhase(protocol.test, reads, "test")
    request = AutoRequest(method, LAYERS, "keep_fraction")
    (row,) = edit_checkpoint(
        {"state_dict": module.state_dict()},
        "model.ckpt",
        [request],
        module=module,
        datamodule=datamodule,
        factors=factors if method == "kfac" else None,
        protocol=protocol,
        save=False,
        log=quiet,
    )
    return row, splits, protocol


def selection_scores(row) -> dict:
    """What a row says about the selection split (``test_cost``, the test split's cost kept beside it, excluded)."""
    return {key: value for key, value in row.selection.items() if key != "test_cost"}


@pytest.mark.parametrize("method", ["svd", "kfac"])
def test_the_choice_is_blind_to_the_memorized_set_and_the_test_split(fitted, method):
    module, factors = fitted
    base, splits, _ = choose(module, factors, digits(), method)
    candidates = AutoSettings().candidates("keep_fraction")
    assert base.auto["within"] and base.keep_fraction == base.auto["chosen"]
    assert candidates[0] > base.keep_fraction > candidates[-1], "a real choice: the boundary is inside the grid"
    test_before = base.before

    # (a) Another memorized set: the choice, and every selection score, is the same; memorization is not.
    datamodule = digits()
    permute_memorized_labels(datamodule)
    permuted, _, _ = choose(module, factors, datamodule, method)
    assert permuted.auto == base.auto and selection_scores(permuted) == selection_scores(base)
    assert permuted.keep_fraction == base.keep_fraction
    assert permuted.before["val/acc"] == test_before["val/acc"]  # the test split is untouched
    assert permuted.before["mem/noised_acc"] != test_before["mem/noised_acc"]  # the memorized set did change

    # (b) Other test examples: the same choice; the test scores change.
    datamodule = digits()
    datamodule.val_set = Replaced(datamodule.val_set, splits.indices("test"), seed=2)
    altered, _, _ = choose(module, factors, datamodule, method)
    assert altered.auto == base.auto and selection_scores(altered) == selection_scores(base)
    assert altered.keep_fraction == base.keep_fraction
    assert altered.before["val/acc"] != test_before["val/acc"] and altered.after["val/acc"] != base.after["val/acc"]
    assert altered.before["mem/noised_acc"] == test_before["mem/noised_acc"]

    # Control: other selection examples do change what the choice sees (and nothing on the test split).
    datamodule = digits()
    datamodule.val_set = Replaced(datamodule.val_set, splits.indices("selection"), seed=3)
    control, _, _ = choose(module, factors, datamodule, method)
    assert control.selection["before val/acc"] != base.selection["before val/acc"]
    assert control.auto["evaluated"] != base.auto["evaluated"]
    assert control.before == test_before


def test_selection_scoring_reads_only_the_selection_split(fitted):
    module, factors = fitted
    reads = Reads()
    datamodule = digits()
    datamodule.val_set = Recording(datamodule.val_set, "val", reads)
    datamodule.train_eval_set = Recording(datamodule.train_eval_set, "memorized", reads)
    datamodule.train_set = Recording(datamodule.train_set, "train", reads)
    row, splits, protocol = choose(module, factors, datamodule, "svd", reads)
    assert protocol.selection.datamodule is None  # no DataModule lent to the selection scorer
    selection, test = list(splits.indices("selection")), list(splits.indices("test"))
    read = reads.indices("selection", "val")
    passes = len(row.auto["evaluated"]) + 1  # every candidate evaluated and the unedited weights, once each
    assert read == selection * passes, "the selection scorer read other examples, or not all, or out of order"
    assert reads.indices("selection", "memorized") == [] and reads.indices("selection", "train") == []
    # The test scorer reads the test split and the memorized set (unedited and the chosen edit), nothing else.
    assert reads.indices("test", "val") == test * 2
    assert reads.indices("test", "memorized") == list(range(300)) * 2
    assert {(phase, dataset) for phase, dataset, _ in reads.records} == {
        ("selection", "val"),
        ("test", "val"),
        ("test", "memorized"),
    }


# -- 4. the pipeline with a protocol --------------------------------------------------------------------------------
def test_pipeline_rows_under_the_protocol(fitted):
    module, _ = fitted
    datamodule = digits()
    splits = split_held_out(held_out_size(datamodule), HeldOutSettings(selection_fraction=0.5), seed=4)
    budget = Budget(max_accuracy_drop=0.05)
    settings = AutoSettings(resolution=0.3, minimum=0.01)
    protocol = Protocol(module, datamodule, splits, budget, auto=settings)
    scored: list[float] = []
    score_selection = protocol.score_selection

    def recording(request, state_dict, original):
        scored.append(request.strength[1])
        return score_selection(request, state_dict, original)

    protocol.score_selection = recording
    auto = AutoRequest("svd", LAYERS, "keep_fraction")
    fixed = [EditRequest("svd", LAYERS, keep_fraction=0.5), EditRequest("svd", LAYERS, keep_fraction=1.0)]
    original = {"state_dict": module.state_dict()}
    rows = edit_checkpoint(
        original, "model.ckpt", [auto, *fixed], module=module, protocol=protocol, save=False, log=quiet
    )
    assert [row.tag for row in rows] == [fixed[0].tag, fixed[1].tag, rows[2].tag]  # fixed strengths first
    assert scored[:2] == [0.5, 1.0]
    assert scored.count(1.0) == 1  # 1.0 is a candidate: the search reused its fixed row's selection score
    for row in rows:
        selection = row.selection
        assert selection["split"] == splits.name
        cost = budget.cost(selection["before val/acc"], selection["after val/acc"])
        assert selection["cost"] == pytest.approx(cost)
        if "test_cost" in selection:  # the test split's cost, if the row keeps it beside the selection's
            assert selection["test_cost"] == pytest.approx(budget.cost(row.before["val/acc"], row.after["val/acc"]))
    assert rows[0].auto == {} and rows[1].auto == {}
    row = rows[2]
    assert row.tag.startswith("svd-k") and row.keep_fraction == row.auto["chosen"]
    assert {"budget", "chosen", "within", "evaluated", "monotone"} <= set(row.auto)
    assert row.auto["budget"] == budget.label and row.auto["budget_limit"] == 0.05
    assert row.auto["selection_cost"] == pytest.approx(row.selection["cost"])
    candidates = settings.candidates("keep_fraction")
    evaluated = {value: (cost, within) for value, cost, within in row.auto["evaluated"]}
    assert len(evaluated) == len(row.auto["evaluated"]) <= len(candidates)
    if row.auto["within"]:  # the strongest measured within; its stronger neighbour measured outside
        index = candidates.index(row.keep_fraction)
        assert evaluated[row.keep_fraction] == (pytest.approx(row.selection["cost"]), True)
        assert row.selection["cost"] <= 0.05
        if index + 1 < len(candidates):
            assert evaluated[candidates[index + 1]][1] is False
    measured = protocol.measured[("svd", tuple(LAYERS), "keep_fraction")]
    assert {0.5, 1.0} | set(evaluated) == set(measured)
    # Test-split scores are the module's evaluation on the test split (and the memorized set).
    assert rows[0].before == module.evaluation_metrics(HeldOutView(datamodule, splits.indices("test")))
    assert all(row.before == rows[0].before for row in rows)


def test_auto_needs_a_protocol_with_a_budget(fitted):
    module, _ = fitted
    datamodule = digits()
    splits = split_held_out(held_out_size(datamodule), HeldOutSettings(), seed=0)
    checkpoint = {"state_dict": module.state_dict()}
    auto = AutoRequest("svd", LAYERS, "keep_fraction")
    for protocol in (None, Protocol(module, datamodule, splits, budget=None)):
        with pytest.raises(ValueError, match="an auto strength needs the held-out protocol with a budget"):
            edit_checkpoint(checkpoint, "model.ckpt", [auto], module=module, protocol=protocol, save=False, log=quiet)
    # Without a budget, fixed strengths are still scored on both splits (every selection metric, no cost).
    protocol = Protocol(module, datamodule, splits, budget=None)
    (row,) = edit_checkpoint(
        checkpoint,
        "model.ckpt",
        [EditRequest("svd", LAYERS, keep_fraction=0.5)],
        module=module,
        protocol=protocol,
        save=False,
        log=quiet,
    )
    assert "cost" not in row.selection and "after val/acc" in row.selection and "mem/noised_acc" in row.after
    with pytest.raises(ValueError, match="the held-out splits cover 100 examples but the validation set has 120"):
        Protocol(module, datamodule, split_held_out(100, HeldOutSettings(), seed=0))
    with pytest.raises(ValueError, match="budget metric 'val/perplexity' is not among the metrics"):
        Protocol(module, datamodule, splits, Budget(max_perplexity_ratio=1.1)).selection_before(
            checkpoint["state_dict"]
        )


def test_auto_requests_and_strength_requests():
    assert strength_requests("svd", LAYERS, keep_fraction="auto") == [AutoRequest("svd", LAYERS, "keep_fraction")]
    requests = strength_requests("kfac", LAYERS, energy=[0.5], keep_fraction="auto")
    assert requests == [AutoRequest("kfac", LAYERS, "keep_fraction"), EditRequest("kfac", LAYERS, energy=0.5)]
    assert strength_requests("bsn", LAYERS, ratio="auto") == [AutoRequest("bsn", LAYERS, "ratio")]
    with pytest.raises(ValueError, match="method='bsn' takes ratio: auto; got keep_fraction: auto"):
        AutoRequest("bsn", LAYERS, "keep_fraction")
    with pytest.raises(ValueError, match="method='svd' takes energy or keep_fraction: auto; got ratio: auto"):
        AutoRequest("svd", LAYERS, "ratio")
    assert AutoRequest("svd", LAYERS, "energy").request(0.25) == EditRequest("svd", LAYERS, energy=0.25)
    assert AutoRequest("svd", LAYERS, "energy").tag.startswith("svd-eauto-L")


# -- 5. memcurve sweep ----------------------------------------------------------------------------------------------
def tiny_run_config(folder: Path) -> Path:
    """The digits config, tiny: 2 epochs of a 32-wide, 2-block ViT on 300 images, no analysis callbacks."""
    config = yaml.safe_load(CONFIG.read_text())
    trainer = config["trainer"]
    trainer["max_epochs"] = 2
    trainer["enable_model_summary"] = False
    trainer["enable_progress_bar"] = False
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].startswith("memcurve.")]
    config["model"]["init_args"]["model_kwargs"].update(embed_dim=32, depth=2, num_heads=2)
    config["data"]["init_args"].update(subset_size=300, val_subset_size=120)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sweep_config(folder: Path, **changes) -> Path:
    settings = {
        "run_config": str(tiny_run_config(folder)),
        "edits": [
            {"method": "kfac", "layers": LAYERS, "keep_fraction": [0.5, 0.05]},
            {"method": "svd", "layers": LAYERS, "keep_fraction": [0.5, 0.05]},
        ],
        "output_dir": "sweep",
        "budgets": {"max_accuracy_drop": [0.05, 0.01]},
        "seeds": [0, 1],
        "checkpoints": "runs/vit_digits_noisy/seed{seed}/checkpoints/last.ckpt",
        "train_missing": True,
        "factor_settings": {"position": "cls"},
        "auto": {"resolution": 0.5, "minimum": 0.01},
        **changes,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_memcurve_sweep_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run config's logger (save_dir: runs) and the output are relative
    rows_by_seed = run(["sweep", "--config", str(sweep_config(tmp_path))])
    output = tmp_path / "sweep"
    assert sorted(rows_by_seed) == [0, 1]
    budgets = [Budget(max_accuracy_drop=0.01), Budget(max_accuracy_drop=0.05)]
    splits = {}
    for seed, rows in rows_by_seed.items():
        assert Path(f"runs/vit_digits_noisy/seed{seed}/checkpoints/last.ckpt").is_file()  # trained (train_missing)
        fixed = [row for row in rows if not row.auto]
        autos = [row for row in rows if row.auto]
        assert sorted((row.method, row.keep_fraction) for row in fixed) == [
            (method, value) for method in ("kfac", "svd") for value in (0.05, 0.5)
        ]
        assert Counter((row.method, row.auto["budget"]) for row in autos) == {
            (method, budget.label): 1 for method in ("kfac", "svd") for budget in budgets
        }
        assert all(not math.isnan(row.selection["cost"]) for row in rows)  # every row scored on the selection split
        assert all(row.keep_fraction == row.auto["chosen"] for row in autos)
        for method in ("kfac", "svd"):
            by_limit = {row.auto["budget_limit"]: row for row in autos if row.method == method}
            if by_limit[0.05].auto["monotone"]:  # a larger budget allows an edit at least as strong
                assert by_limit[0.05].keep_fraction <= by_limit[0.01].keep_fraction
        folder = output / f"seed{seed}"
        splits[seed] = HeldOutSplits.from_json(json.loads((folder / "held_out_splits.json").read_text()))
        assert splits[seed].size == 120 and splits[seed].seed == seed
        assert all(row.selection["split"] == splits[seed].name for row in rows)
        saved = json.loads((folder / "sweep.json").read_text())
        assert [record["tag"] for record in saved] == [row.tag for row in rows]
        assert (folder / "kfac.safetensors").is_file()
    assert splits[0].sha256 != splits[1].sha256  # each seed's split is seeded by its run

    with open(output / "sweep.csv") as handle:
        points = list(csv.DictReader(handle))
    assert len(points) == sum(len(rows) for rows in rows_by_seed.values()) == 2 * (4 + 4)
    assert Counter(point["seed"] for point in points) == {"0": 8, "1": 8}
    assert sum(bool(point["auto_budget"]) for point in points) == 8
    with open(output / "curves.csv") as handle:
        curves = list(csv.DictReader(handle))
    assert sorted((c["method"], float(c["strength"]), c["seeds"]) for c in curves) == [
        (method, value, "2") for method in ("kfac", "svd") for value in (0.05, 0.5)
    ]
    table = (output / "budgets.md").read_text()
    for method in ("K-FAC kronecker", "SVD"):
        for limit in ("1.0 pt", "5.0 pt"):
            assert f"| {method} | {limit} |" in table, table
    results = (output / "results.md").read_text()
    assert table.strip() in results and all(split.name in results for split in splits.values())
    assert (output / "sweep.png").stat().st_size > 1000
    assert any((output / "tensorboard").glob("events.out.tfevents.*"))

    # The same output_dir again: refused, unless overwrite (then it goes on to build the first seed's run).
    with pytest.raises(FileExistsError, match="already holds a sweep"):
        run(["sweep", "--config", str(sweep_config(tmp_path))])

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr("memcurve.cli._run_cli", reached)
    with pytest.raises(Reached):
        run(["sweep", "--config", str(sweep_config(tmp_path, overwrite=True))])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"checkpoints": "runs/last.ckpt"}, r"--seeds needs --checkpoints with a \{seed\} field"),
        ({"budgets": {"max_accuracy_drop": [0.01], "max_perplexity_ratio": [1.1]}}, r"exactly one of max_accuracy"),
        (
            {"edits": [{"method": "svd", "layers": LAYERS, "keep_fraction": "auto"}]},
            r"--edits of a sweep take grid strengths",
        ),
        (
            {"edits": [{"method": "svd", "layers": LAYERS, "keep_fraction": [0.5]}], "factor_data": "held_out"},
            r"--factor_data held_out needs --held_out.factor_fraction > 0",
        ),
    ],
)
def test_sweep_refuses_bad_input_before_any_training(tmp_path, monkeypatch, changes, message):
    monkeypatch.chdir(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("a model was built or trained before the input was checked")

    monkeypatch.setattr("memcurve.cli.run_trainer_command", no_work)
    monkeypatch.setattr("memcurve.cli._run_cli", no_work)
    with pytest.raises(ValueError, match=message):
        run(["sweep", "--config", str(sweep_config(tmp_path, **changes))])
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "runs").exists()


# -- 6. the pruning callbacks' auto strengths ------------------------------------------------------------------------
def test_pruning_callbacks_choose_auto_strengths_at_fit_end(tmp_path):
    """At fit end (Lightning's metric-attribute cache still set on the live module) the copies score."""
    pl.seed_everything(0, verbose=False)
    model = NoisyLabelClassifier(
        model_kwargs=dict(TINY_VIT_KWARGS), lr=3e-3, warmup_epochs=0, memorization_eval_every_n_epochs=0
    )
    budget = Budget(max_accuracy_drop=0.05)
    held_out = HeldOutSettings(selection_fraction=0.4, seed=3)
    pruning = [
        KFACPruning(LAYERS, keep_fraction="auto", budget=budget, held_out=held_out),
        SVDPruning(LAYERS, keep_fraction="auto", budget=budget, held_out=held_out),
    ]
    callbacks = [KFACFactors(LAYERS, settings=FactorSettings(position="cls"), when="fit_end"), *pruning]
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=NoisyLabelDataModule(**DATA))
    folder = Path(trainer.log_dir) / "pruning"
    expected = split_held_out(120, held_out)
    written = list(folder.glob("held_out_splits-*.json"))
    assert [path.name for path in written] == [f"held_out_splits-{expected.sha256[:8]}.json"]  # a name per split
    splits = HeldOutSplits.from_json(json.loads(written[0].read_text()))
    assert splits.to_json() == expected.to_json()
    records = json.loads((folder / "pruning_report.json").read_text())
    assert [record["method"] for record in records] == ["kfac", "svd"]
    for record, callback in zip(records, pruning):
        auto = record["auto"]
        assert auto["budget"] == budget.label and auto["chosen"] == record["keep_fraction"]
        assert record["selection"]["split"] == splits.name
        request = EditRequest(record["method"], LAYERS, keep_fraction=auto["chosen"])
        assert record["tag"] == request.tag and Path(record["edited_checkpoint"]).is_file()
        assert Path(record["edited_checkpoint"]).name.endswith(f"-{request.tag}.ckpt")
        assert callback.rows[-1].auto == auto


@pytest.mark.parametrize(
    "make",
    [
        lambda: SVDPruning(LAYERS, keep_fraction="auto"),
        lambda: KFACPruning(LAYERS, energy="auto"),
        lambda: BalancedSubnetPruning(LAYERS, ratio="auto"),
    ],
)
def test_an_auto_pruning_callback_needs_a_budget(make):
    with pytest.raises(ValueError, match="choose their strength under a budget; pass budget="):
        make()


def test_pruning_callback_budget_arguments_are_checked():
    with pytest.raises(TypeError, match=r"budget must be a memcurve\.editing\.auto\.Budget, not dict"):
        SVDPruning(LAYERS, keep_fraction="auto", budget={"max_accuracy_drop": 0.01})
    with pytest.raises(ValueError, match="they need evaluate=True"):
        SVDPruning(LAYERS, keep_fraction="auto", budget=Budget(max_accuracy_drop=0.01), evaluate=False)
    callback = SVDPruning(LAYERS, keep_fraction=[0.5], budget=Budget(max_accuracy_drop=0.01))
    assert callback.held_out == HeldOutSettings()  # a budget implies the default split
    assert SVDPruning(LAYERS, keep_fraction=[0.5]).held_out is None


def test_a_saved_split_is_never_replaced_by_another(tmp_path):
    path = tmp_path / "held_out_splits.json"
    first = split_held_out(60, HeldOutSettings(), seed=0)
    first.save(path)
    first.save(path)  # the same split again: left as it is
    other = split_held_out(60, HeldOutSettings(), seed=1)
    with pytest.raises(FileExistsError, match=r"--output_dir: .* holds another held-out split"):
        other.save(path, argument="--output_dir")
    assert HeldOutSplits.from_json(json.loads(path.read_text())).sha256 == first.sha256
    other.save(path, overwrite=True)
    assert HeldOutSplits.from_json(json.loads(path.read_text())).sha256 == other.sha256
