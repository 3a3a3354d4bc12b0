"""Symmetric label noise: exact count, uniform over the other classes, reproducible, persisted."""

from __future__ import annotations

import json

import pytest
import torch

from memcurve.data.label_noise import LabelNoise, make_symmetric_noise


def labels(n=1000, num_classes=10, seed=0):
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(1000, 0.1, 100), (1500, 0.1, 150), (7, 0.5, 4), (10, 0.0, 0), (3, 0.1, 0), (5, 0.9, 5), (1797, 0.37, 665)],
)
def test_exact_number_of_labels_corrupted(n, fraction, expected):
    noise = make_symmetric_noise(labels(n), 10, fraction, seed=3)
    assert noise.num_noised == expected
    assert int((noise.noisy_labels != noise.true_labels).sum()) == expected
    assert len(noise.noised_indices) == expected


def test_every_corrupted_label_is_a_different_class_and_labels_outside_are_kept():
    noise = make_symmetric_noise(labels(), 10, 0.3, seed=1)
    noised = noise.is_noised
    assert torch.all(noise.noisy_labels[noised] != noise.true_labels[noised])
    assert torch.equal(noise.noisy_labels[~noised], noise.true_labels[~noised])
    assert noise.noisy_labels.min() >= 0 and noise.noisy_labels.max() < 10


def test_noise_is_symmetric_uniform_over_other_classes():
    num_classes = 5
    true = torch.zeros(200_000, dtype=torch.long)  # every true label is 0: new labels must be uniform on 1..4
    noise = make_symmetric_noise(true, num_classes, 0.5, seed=7)
    counts = torch.bincount(noise.noisy_labels[noise.is_noised], minlength=num_classes).double()
    assert counts[0] == 0
    expected = noise.num_noised / (num_classes - 1)
    # Chi-square with 3 degrees of freedom: 16.27 is the 0.1% critical value.
    chi_square = float(((counts[1:] - expected) ** 2 / expected).sum())
    assert chi_square < 16.27


def test_same_seed_same_noise_different_seed_different_noise():
    true = labels()
    first, again = make_symmetric_noise(true, 10, 0.1, seed=5), make_symmetric_noise(true, 10, 0.1, seed=5)
    other = make_symmetric_noise(true, 10, 0.1, seed=6)
    assert torch.equal(first.noisy_labels, again.noisy_labels)
    assert first.fingerprint() == again.fingerprint()
    assert not torch.equal(first.noised_indices, other.noised_indices)


def test_save_load_round_trip_and_corruption_detected(tmp_path):
    noise = make_symmetric_noise(labels(), 10, 0.2, seed=0)
    path = tmp_path / "label_noise.json"
    noise.save(path)
    loaded = LabelNoise.load(path)
    loaded.check_matches(noise, origin="test")
    state = json.loads(path.read_text())
    assert state["num_noised"] == 200 and state["noised_indices"] == noise.noised_indices.tolist()
    state["noisy_labels"][int(noise.noised_indices[0])] = int(noise.true_labels[int(noise.noised_indices[0])])
    path.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="corrupt"):
        LabelNoise.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LabelNoise.load(path)
    with pytest.raises(FileNotFoundError, match="noise_file="):
        LabelNoise.load(tmp_path / "missing.json")


def test_mismatch_names_what_differs():
    true = labels()
    with pytest.raises(ValueError, match=r"seed: saved 1, now 2.*noisy_labels: \d+ of 1000 entries differ"):
        make_symmetric_noise(true, 10, 0.1, seed=2).check_matches(make_symmetric_noise(true, 10, 0.1, seed=1), "x")


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_noise_fraction_outside_range(fraction):
    with pytest.raises(ValueError, match=r"noise_fraction=.* must be in \[0, 1\)"):
        make_symmetric_noise(labels(), 10, fraction, seed=0)
