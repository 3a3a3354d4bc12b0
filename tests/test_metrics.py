"""Memorization metrics against a plain Python reference, batch by batch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from memcurve.metrics import (
    CleanTrainAccuracy,
    GroundTruthRecovery,
    MemorizationMetrics,
    NoisedLabelAccuracy,
    check_memorization_datamodule,
    clean_train_accuracy,
    evaluate_memorization,
    ground_truth_recovery,
    log_memorization,
    memorization_due,
    noised_label_accuracy,
)


def reference(preds, noisy, true, noised):
    """Loops over examples, the definitions in words."""
    pairs = list(zip(preds.tolist(), noisy.tolist(), true.tolist(), noised.tolist()))
    noised_rows = [(p, n, t) for p, n, t, is_n in pairs if is_n]
    clean_rows = [(p, t) for p, n, t, is_n in pairs if not is_n]
    mem = sum(p == n for p, n, _ in noised_rows) / len(noised_rows) if noised_rows else math.nan
    gt = sum(p == t for p, _, t in noised_rows) / len(noised_rows) if noised_rows else math.nan
    clean = sum(p == t for p, t in clean_rows) / len(clean_rows) if clean_rows else math.nan
    return mem, gt, clean


def random_batch(generator, size, num_classes=5):
    true = torch.randint(0, num_classes, (size,), generator=generator)
    noised = torch.rand(size, generator=generator) < 0.3
    offsets = torch.randint(1, num_classes, (size,), generator=generator)
    noisy = torch.where(noised, (true + offsets) % num_classes, true)
    # Predictions that sometimes follow the noisy label, sometimes the true one, sometimes neither.
    choice = torch.randint(0, 3, (size,), generator=generator)
    other = torch.randint(0, num_classes, (size,), generator=generator)
    preds = torch.where(choice == 0, noisy, torch.where(choice == 1, true, other))
    return preds, noisy, true, noised


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_metrics_match_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    batches = [random_batch(generator, size) for size in (7, 1, 33, 12)]
    mem_metric, gt_metric, clean_metric = NoisedLabelAccuracy(), GroundTruthRecovery(), CleanTrainAccuracy()
    combined = MemorizationMetrics()
    for preds, noisy, true, noised in batches:
        mem_metric.update(preds, noisy, noised)
        gt_metric.update(preds, true, noised)
        clean_metric.update(preds, true, noised)
        combined.update(preds, noisy, true, noised)
    stacked = [torch.cat(parts) for parts in zip(*batches)]
    expected = reference(*stacked)
    got = (float(mem_metric.compute()), float(gt_metric.compute()), float(clean_metric.compute()))
    assert got == pytest.approx(expected, abs=1e-6)
    results = combined.compute()
    assert (results["noised_acc"], results["gt_recovery"], results["clean_train_acc"]) == pytest.approx(expected)
    assert results["num_noised"] == int(stacked[3].sum())
    preds, noisy, true, noised = stacked
    assert float(noised_label_accuracy(preds, noisy, noised)) == pytest.approx(expected[0])
    assert float(ground_truth_recovery(preds, true, noised)) == pytest.approx(expected[1])
    assert float(clean_train_accuracy(preds, true, noised)) == pytest.approx(expected[2])


def test_logits_are_accepted_and_argmaxed():
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    noisy = torch.tensor([1, 1, 2])
    noised = torch.tensor([True, True, False])
    assert float(noised_label_accuracy(logits, noisy, noised)) == pytest.approx(0.5)


def test_empty_subset_is_nan_not_zero():
    preds = torch.tensor([0, 1])
    assert math.isnan(float(noised_label_accuracy(preds, preds, torch.tensor([False, False]))))
    metric = MemorizationMetrics()
    metric.update(preds, preds, preds, torch.tensor([False, False]))
    assert math.isnan(metric.compute()["gt_recovery"])
    assert metric.compute()["clean_train_acc"] == 1.0


def test_reset_clears_state():
    metric = NoisedLabelAccuracy()
    metric.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([True]))
    metric.reset()
    metric.update(torch.tensor([1]), torch.tensor([0]), torch.tensor([True]))
    assert float(metric.compute()) == 0.0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target must have shape \(2,\) like preds"):
        noised_label_accuracy(torch.tensor([1, 2]), torch.tensor([1]), torch.tensor([True, False]))


# -- the evaluation pass, its schedule and its logging (shared by NoisyLabelClassifier and MemorizationEval) ---
def _trainer(fn="fit", epoch=0, max_epochs=10, sanity=False):
    return SimpleNamespace(
        sanity_checking=sanity, state=SimpleNamespace(fn=fn), current_epoch=epoch, max_epochs=max_epochs
    )


@pytest.mark.parametrize(
    ("trainer", "every_n", "due"),
    [
        (_trainer(epoch=0), 1, True),
        (_trainer(epoch=0), 3, False),
        (_trainer(epoch=2), 3, True),
        (_trainer(epoch=9), 4, True),  # the last epoch always
        (_trainer(epoch=2, sanity=True), 3, False),  # never while sanity checking
        (_trainer(fn="validate", epoch=0), 5, True),  # trainer.validate always
        (_trainer(fn="validate", sanity=True), 1, False),
    ],
)
def test_memorization_due(trainer, every_n, due):
    assert memorization_due(trainer, every_n) is due


class _Logger(torch.nn.Module):
    """A module (images -> logits) that records ``log`` calls, with a datamodule-like trainer around it."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.linear = torch.nn.Linear(3, num_classes)
        self.logged = {}

    @property
    def device(self):
        return self.linear.weight.device

    def forward(self, images):
        return self.linear(images)

    def log(self, name, value, sync_dist):
        assert sync_dist is False  # already reduced by the metric
        self.logged[name] = value


def _batches(generator, sizes, all_clean=False):
    batches = []
    for size in sizes:
        _, noisy, true, noised = random_batch(generator, size)
        if all_clean:
            noised, noisy = torch.zeros_like(noised), true
        batches.append(
            {
                "image": torch.randn(size, 3, generator=generator),
                "label": noisy,
                "true_label": true,
                "is_noised": noised,
            }
        )
    return batches


def test_evaluate_memorization_matches_reference_and_restores_mode():
    generator = torch.Generator().manual_seed(3)
    module = _Logger()
    module.train()
    batches = _batches(generator, (7, 16, 1))
    results = evaluate_memorization(module, batches, sync=False)
    assert module.training
    with torch.no_grad():
        preds = torch.cat([module(b["image"]).argmax(-1) for b in batches])
    columns = [torch.cat([b[key] for b in batches]) for key in ("label", "true_label", "is_noised")]
    mem, gt, clean = reference(preds, *columns)
    assert results["noised_acc"] == pytest.approx(mem)
    assert results["gt_recovery"] == pytest.approx(gt)
    assert results["clean_train_acc"] == pytest.approx(clean)
    with pytest.raises(KeyError, match="lacks \\['true_label'\\]"):
        batch = {"image": torch.zeros(1, 3), "label": torch.zeros(1), "is_noised": torch.ones(1)}
        evaluate_memorization(module, [batch])


def test_log_memorization_logs_defined_metrics_only():
    generator = torch.Generator().manual_seed(4)
    module = _Logger()
    batches = _batches(generator, (8, 8), all_clean=True)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(memorization_dataloader=lambda: batches))
    results = log_memorization(module, trainer, prefix="memo/")
    assert results["num_noised"] == 0 and math.isnan(results["noised_acc"])
    assert set(module.logged) == {"memo/clean_train_acc"}  # no noised example: noised_acc / gt_recovery undefined
    assert module.logged["memo/clean_train_acc"] == results["clean_train_acc"]
    with pytest.raises(ValueError, match=r"Someone needs a datamodule with a memorization_dataloader.*got NoneType"):
        check_memorization_datamodule(None, "Someone")
