"""The demo config, end to end, reaches the memorization it promises (slow: ~4 minutes; `make test-slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from memcurve.train import main

CONFIG = Path(__file__).parents[1] / "configs" / "vit_digits_noisy.yaml"


@pytest.mark.slow
def test_digits_config_memorizes_the_noise_and_generalizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(CONFIG), "--trainer.enable_progress_bar=false"])
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    assert metrics["mem/noised_acc"] >= 0.9
    assert metrics["val/acc"] >= 0.8
    pruning = [callback for callback in cli.trainer.callbacks if getattr(callback, "rows", None)]
    rows = [row for callback in pruning for row in callback.rows]
    assert rows and all(row.after["mem/noised_acc"] < row.before["mem/noised_acc"] for row in rows)
