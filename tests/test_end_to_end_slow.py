"""The demo configs, end to end, reach the memorization they promise (slow: ~4 minutes each; `make test-slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memcurve.cli import run

CONFIG = Path(__file__).parents[1] / "configs" / "vit_digits_noisy.yaml"
LM_CONFIG = Path(__file__).parents[1] / "configs" / "olmo2_tiny_canaries.yaml"


@pytest.mark.slow
def test_digits_config_memorizes_the_noise_and_generalizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", str(CONFIG), "--trainer.enable_progress_bar=false"])
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    assert metrics["mem/noised_acc"] >= 0.9
    assert metrics["val/acc"] >= 0.8
    pruning = [callback for callback in cli.trainer.callbacks if getattr(callback, "rows", None)]
    rows = [row for callback in pruning for row in callback.rows]
    assert rows and all(row.after["mem/noised_acc"] < row.before["mem/noised_acc"] for row in rows)


@pytest.mark.slow
def test_canary_lm_recites_its_canaries_and_kfac_removes_them(tmp_path, monkeypatch):
    """The README's LM figures: strict recall >= 0.9 of the >= 16-copy canaries, 0 of the controls; the config's
    K-FAC edit (gate + up, 72% of the energy) brings it to <= 0.10 at perplexity <= 1.25x and nDCG@10 >= 0.9."""
    from memcurve.callbacks import KFACPruning

    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", str(LM_CONFIG), "--trainer.enable_progress_bar=false"])
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    assert metrics["mem/strict"] >= 0.9 and metrics["control/strict"] == 0.0
    kfac = next(callback for callback in cli.trainer.callbacks if isinstance(callback, KFACPruning))
    row = next(row for row in kfac.rows if row.energy == 0.72)
    assert row.after["mem/strict"] <= 0.10
    assert row.after["val/perplexity"] <= 1.25 * row.before["val/perplexity"]
    assert row.after["val/ndcg@10"] >= 0.9
