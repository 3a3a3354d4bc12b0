"""BandActivationProbe on tiny real runs: CSV, figure and scalars after a fit, equality with a direct pass, errors."""

from __future__ import annotations

import csv
import math
import struct
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from memcurve.callbacks.band_activation_probe import (
    BandActivationProbe,
    ClassificationProbeAdapter,
    plot_band_activations,
)
from memcurve.callbacks.kfac_factors import KFACFactors
from memcurve.curvature import (
    FactorFileError,
    FactorSettings,
    collect_factors,
    eigendecompose,
    load_factors,
    save_factors,
)
from memcurve.curvature.bands import BandBasis
from memcurve.data import NoisyLabelDataModule
from memcurve.lightning_modules import NoisyLabelClassifier

FC2 = ["model.blocks.0.mlp.fc2", "model.blocks.1.mlp.fc2"]
BANDS = ["0-10%", "10-25%", "25-50%", "50-100%"]
GROUPS = ["noised", "clean", "val"]
SETTINGS = {
    "mode": "expand",
    "position": "cls",
    "bias": "exclude",
    "dtype": "float64",
    "drop_last_position": False,
    "fisher": "sampled",
    "mc_samples": 1,
}


def tiny_model(tiny_vit_kwargs, **overrides) -> NoisyLabelClassifier:
    torch.manual_seed(0)
    return NoisyLabelClassifier(
        model_kwargs={**tiny_vit_kwargs, **overrides}, warmup_epochs=0, memorization_eval_every_n_epochs=0
    )


def small_digits(subset_size: int = 120) -> NoisyLabelDataModule:
    return NoisyLabelDataModule(
        val_size=297, subset_size=subset_size, val_subset_size=40, batch_size=40, eval_batch_size=50
    )


def make_trainer(tmp_path: Path, callbacks: list, **overrides) -> pl.Trainer:
    options = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": TensorBoardLogger(tmp_path, name="run"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "callbacks": callbacks,
    }
    options.update(overrides)
    return pl.Trainer(**options)


def write_factors(path: Path, model: NoisyLabelClassifier, datamodule: NoisyLabelDataModule, layers=FC2) -> Path:
    """A CLS-only factor file of ``layers`` from two batches of the training set."""
    datamodule.setup("fit")
    settings = FactorSettings(position="cls", dtype="float64", max_batches=2)
    factors = collect_factors(model, datamodule.memorization_dataloader(), layers, settings)
    return save_factors(path, eigendecompose(factors), model=model, settings=SETTINGS)


_FACTOR_FILES: dict[str, Path] = {}


@pytest.fixture
def fc2_factors(tmp_path_factory, tiny_vit_kwargs) -> Path:
    """CLS-only factors of both fc2 layers of the seeded tiny ViT, written once per module (read-only)."""
    key = repr(sorted(tiny_vit_kwargs.items()))
    if key not in _FACTOR_FILES:
        path = tmp_path_factory.mktemp("factors") / "fc2.safetensors"
        _FACTOR_FILES[key] = write_factors(path, tiny_model(tiny_vit_kwargs), small_digits())
    return _FACTOR_FILES[key]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def direct_group_means(model, datamodule, factor_path, layers) -> dict[tuple[str, str], torch.Tensor]:
    """Per (layer, group), the mean over examples of the K-FAC 'norm' band means of the layer's CLS input."""
    stored = load_factors(factor_path, model)
    modules = dict(model.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = [
        modules[layer].register_forward_pre_hook(lambda module, args, layer=layer: inputs[layer].append(args[0][:, 0]))
        for layer in layers
    ]
    model.eval()
    out = {}
    try:
        with torch.no_grad():
            for name, loader in (("train", datamodule.memorization_dataloader()), ("val", datamodule.val_dataloader())):
                noised = []
                for batch in loader:
                    model(batch["image"])
                    noised.append(batch["is_noised"])
                noised = torch.cat(noised)
                for layer in layers:
                    means = BandBasis.from_kfac(stored.layers[layer]).means(torch.cat(inputs.pop(layer)).double())
                    inputs[layer] = []
                    if name == "train":
                        out[layer, "noised"], out[layer, "clean"] = means[noised].mean(0), means[~noised].mean(0)
                    else:
                        out[layer, "val"] = means.mean(0)
    finally:
        for handle in handles:
            handle.remove()
    return out


def test_fit_end_probe_after_kfac_factors_writes_csv_figure_and_scalars(tmp_path, tiny_vit_kwargs):
    kfac = KFACFactors(
        layers=["model.blocks.0.attn.proj", "model.blocks.*.mlp.fc2"],
        settings=FactorSettings(position="cls", dtype="float64"),
    )
    probe = BandActivationProbe(factors="latest", layers=["model.blocks.*.mlp.fc2"], dtype="float64")
    kfac.log_spectra = False  # not under test here
    model, datamodule = tiny_model(tiny_vit_kwargs), small_digits()
    trainer = make_trainer(tmp_path, [kfac, probe])
    trainer.fit(model, datamodule=datamodule)

    folder = Path(trainer.log_dir) / "probe"
    csv_path, png_path = folder / "bands-final.csv", folder / "bands-final.png"
    assert probe.saved_paths == [str(csv_path)]
    rows = read_csv(csv_path)
    assert list(rows[0]) == ["layer", "band", "group", "basis", "statistic", "mean", "std", "n"]
    assert len(rows) == 2 * 4 * 3 * 2 * 2  # layers x bands x groups x bases x statistics
    keys = {(r["layer"], r["band"], r["group"], r["basis"], r["statistic"]) for r in rows}
    assert keys == {
        (layer, band, group, basis, statistic)
        for layer in FC2
        for band in BANDS
        for group in GROUPS
        for basis in ("kfac", "svd")
        for statistic in ("norm", "energy")
    }
    sizes = {r["group"]: int(r["n"]) for r in rows}
    assert sizes == {"noised": 12, "clean": 108, "val": 40}  # 10% of 120 noised, 40 validation images
    assert all(math.isfinite(float(r["mean"])) and float(r["mean"]) > 0 and float(r["std"]) >= 0 for r in rows)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(folder.glob(".*.tmp"))

    # the callback's numbers are those of a direct pass over the same data with the same factors
    expected = direct_group_means(model, datamodule, kfac.saved_paths[-1], FC2)
    for layer in FC2:
        for group in GROUPS:
            got = [
                float(r["mean"])
                for band in BANDS
                for r in rows
                if (r["layer"], r["band"], r["group"], r["basis"], r["statistic"])
                == (layer, band, group, "kfac", "norm")
            ]
            got = torch.tensor(got, dtype=torch.float64)
            torch.testing.assert_close(got, expected[layer, group], rtol=1e-9, atol=0)

    # on the data the factors were computed on (CLS of every training image) E[(v_jᵀx)²] = λ_j, so the energy
    # of a band over noised + clean is the pair-weighted mean of λ in that band
    stored = load_factors(kfac.saved_paths[-1], model)
    for layer in FC2:
        counts = BandBasis.from_kfac(stored.layers[layer]).counts.double()
        expected = counts @ stored.layers[layer].eigvals_A / counts.sum(dim=1)
        cell = {
            (r["band"], r["group"]): float(r["mean"]) * int(r["n"])
            for r in rows
            if r["layer"] == layer and r["basis"] == "kfac" and r["statistic"] == "energy"
        }
        got = torch.tensor([(cell[band, "noised"] + cell[band, "clean"]) / 120 for band in BANDS], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)

    events = EventAccumulator(str(next(Path(trainer.log_dir).glob("events.out.tfevents.*"))))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {f"probe/{layer}/{band}/{group}" for layer in FC2 for band in BANDS for group in GROUPS} <= scalars
    assert "probe_svd/model.blocks.1.mlp.fc2/0-10%/noised" in scalars
    assert "probe/figure" in events.Tags()["images"]
    # add_figure renders the same Agg figure the PNG was saved from: same pixel size
    image = events.Images("probe/figure")[-1]
    assert (image.width, image.height) == struct.unpack(">II", png_path.read_bytes()[16:24])
    assert image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_agg_figure_goes_to_tensorboard_with_add_figure(tmp_path):
    """The probe's figure (an Agg Figure made without pyplot) is saved as PNG and logged by add_figure."""
    rows = [
        {
            "layer": layer,
            "band": band,
            "group": group,
            "basis": basis,
            "statistic": "norm",
            "mean": mean,
            "std": 0.1,
            "n": 10,
        }
        for layer in FC2
        for basis in ("kfac", "svd")
        for group, mean in (("noised", 2.0), ("clean", 1.0))
        for band in BANDS
    ]
    fig = plot_band_activations(rows)
    png_path = tmp_path / "bands.png"
    fig.savefig(png_path, format="png")
    writer = SummaryWriter(str(tmp_path / "tb"))
    writer.add_figure("probe/figure", fig, 7, close=False)
    writer.close()
    events = EventAccumulator(str(next((tmp_path / "tb").glob("events.out.tfevents.*"))))
    events.Reload()
    image = events.Images("probe/figure")[-1]
    assert image.step == 7
    assert (image.width, image.height) == struct.unpack(">II", png_path.read_bytes()[16:24])


def test_validate_with_a_factor_file_groups_and_max_samples(tmp_path, tiny_vit_kwargs, fc2_factors):
    model, datamodule, factor_path = tiny_model(tiny_vit_kwargs), small_digits(), fc2_factors
    probe = BandActivationProbe(
        factors=str(factor_path),
        bands=[0.5],
        groups=["clean", "noised"],
        when="validate",
        max_samples=60,
        position="all",
        statistic="energy",
        svd_baseline=False,
        output_dir=str(tmp_path / "out"),
    )
    trainer = make_trainer(tmp_path, [probe], logger=False)
    trainer.validate(model, datamodule=datamodule, verbose=False)
    rows = read_csv(tmp_path / "out" / "bands.csv")
    assert {r["layer"] for r in rows} == set(FC2)  # layers=None: every layer of the file
    assert {r["band"] for r in rows} == {"0-50%", "50-100%"} and {r["basis"] for r in rows} == {"kfac"}
    assert list(dict.fromkeys(r["group"] for r in rows)) == ["clean", "noised"]  # in the order asked for
    noised = int(datamodule.train_eval_set.is_noised[:60].sum())
    assert {(r["group"], int(r["n"])) for r in rows} == {("clean", 60 - noised), ("noised", noised)}
    assert (tmp_path / "out" / "bands.png").is_file()


def test_checkpoint_mode_records_its_outputs_in_the_checkpoint(tmp_path, tiny_vit_kwargs):
    kfac = KFACFactors(layers=["model.blocks.1.mlp.fc1"], settings=FactorSettings(max_batches=1), when="checkpoint")
    probe = BandActivationProbe(when="checkpoint", groups=["val"], svd_baseline=False)
    trainer = make_trainer(tmp_path, [kfac, probe], enable_checkpointing=True)
    trainer.fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits())
    checkpoint = torch.load(next(Path(trainer.log_dir).glob("checkpoints/*.ckpt")), weights_only=False)
    record = checkpoint["band_activation_probe"]
    assert Path(record["csv"]).name == "bands-epoch000-step3.csv" and Path(record["png"]).is_file()
    assert record["factors"] == kfac.saved_paths[-1]
    assert len(read_csv(Path(record["csv"]))) == 4 * 2  # one layer, 4 bands, one group, 2 statistics
    # Lightning takes the callbacks' state before on_save_checkpoint: the saved state still lists these outputs.
    assert checkpoint["callbacks"][probe.state_key]["saved_paths"] == [record["csv"]]
    assert checkpoint["callbacks"][kfac.state_key]["saved_paths"] == [record["factors"]]


def test_every_n_epochs_writes_one_file_per_period(tmp_path, tiny_vit_kwargs, fc2_factors):
    probe = BandActivationProbe(
        factors=str(fc2_factors), when="every_n_epochs", every_n_epochs=2, groups=["val"], max_samples=10
    )
    trainer = make_trainer(tmp_path, [probe], max_epochs=4, limit_val_batches=0)
    trainer.fit(tiny_model(tiny_vit_kwargs), datamodule=small_digits(subset_size=40))  # one step per epoch
    assert [Path(p).name for p in probe.saved_paths] == ["bands-epoch001.csv", "bands-epoch003.csv"]
    assert {int(r["n"]) for r in read_csv(Path(probe.saved_paths[-1]))} == {10}


def test_an_adapter_can_redefine_the_groups(tmp_path, tiny_vit_kwargs, fc2_factors):
    class EvenOdd(ClassificationProbeAdapter):
        """A stand-in for a user-given split (an LM adapter would read its memorized set the same way)."""

        groups = ("even", "odd")
        contrast = ("odd", "even")

        def passes(self, trainer, groups):
            return [("train", trainer.datamodule.memorization_dataloader())]

        def batch_groups(self, pass_name, batch):
            odd = batch["index"] % 2 == 1
            return {"even": ~odd, "odd": odd}

    model, datamodule, factor_path = tiny_model(tiny_vit_kwargs), small_digits(), fc2_factors
    probe = BandActivationProbe(factors=str(factor_path), when="validate", adapter=EvenOdd(), output_dir=str(tmp_path))
    make_trainer(tmp_path, [probe], logger=False).validate(model, datamodule=datamodule, verbose=False)
    assert {(r["group"], int(r["n"])) for r in read_csv(tmp_path / "bands.csv")} == {("even", 60), ("odd", 60)}


def test_homogeneous_factors_are_probed_on_x_and_one(tmp_path, tiny_vit_kwargs):
    model, datamodule, layer = tiny_model(tiny_vit_kwargs), small_digits(), "model.blocks.1.mlp.fc2"
    datamodule.setup("fit")
    settings = FactorSettings(position="cls", bias="homogeneous", dtype="float64")
    factors = collect_factors(model, datamodule.memorization_dataloader(), [layer], settings)
    path = save_factors(
        tmp_path / "h.safetensors", eigendecompose(factors), model=model, settings={**SETTINGS, "bias": "homogeneous"}
    )
    probe = BandActivationProbe(
        factors=str(path), groups=["noised", "clean"], when="validate", dtype="float64", output_dir=str(tmp_path)
    )
    make_trainer(tmp_path, [probe], logger=False).validate(model, datamodule=datamodule, verbose=False)
    eigen = load_factors(path, model).layers[layer]
    assert eigen.eigvals_A.shape == (129,)  # 128 inputs and the constant 1
    counts = BandBasis.from_kfac(eigen).counts.double()
    expected = counts @ eigen.eigvals_A / counts.sum(dim=1)  # E[(v_jᵀ[x, 1])²] = λ_j on the factor data
    cell = {
        (r["band"], r["group"]): float(r["mean"]) * int(r["n"])
        for r in probe.last_results
        if r["basis"] == "kfac" and r["statistic"] == "energy"
    }
    got = torch.tensor([(cell[band, "noised"] + cell[band, "clean"]) / 120 for band in BANDS], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=0)


def _validate_probe(tmp_path: Path, tiny_vit_kwargs, factor_path: Path, devices: int) -> list[dict[str, str]]:
    probe = BandActivationProbe(
        factors=str(factor_path), when="validate", position="all", output_dir=str(tmp_path / f"world{devices}")
    )
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = make_trainer(tmp_path, [probe], devices=devices, strategy=strategy, logger=False)
    trainer.validate(tiny_model(tiny_vit_kwargs), datamodule=small_digits(), verbose=False)
    return read_csv(tmp_path / f"world{devices}" / "bands.csv")


def test_two_gloo_processes_give_the_single_process_results(tmp_path, tiny_vit_kwargs, fc2_factors):
    single = _validate_probe(tmp_path, tiny_vit_kwargs, fc2_factors, devices=1)
    double = _validate_probe(tmp_path, tiny_vit_kwargs, fc2_factors, devices=2)
    assert len(single) == len(double) == 2 * 4 * 3 * 2 * 2
    for one, two in zip(single, double):
        assert [one[k] for k in ("layer", "band", "group", "basis", "statistic", "n")] == [
            two[k] for k in ("layer", "band", "group", "basis", "statistic", "n")
        ]
        assert float(one["mean"]) == pytest.approx(float(two["mean"]), rel=1e-5)
        assert float(one["std"]) == pytest.approx(float(two["std"]), rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"bands": [0.5, 0.25]}, ValueError, r"bands=\[0.5, 0.25\]: the edges must be strictly increasing"),
        ({"bands": [0.1, 1.0]}, ValueError, r"strictly between 0 and 1"),
        ({"bands": []}, ValueError, r"bands=\[\] is empty"),
        ({"when": "epoch"}, ValueError, r"when='epoch' is not supported; choose one of \('fit_end'"),
        ({"max_samples": 0}, ValueError, r"max_samples=0 must be a positive integer or None"),
        ({"position": "last"}, ValueError, r"position='last' is not supported"),
        ({"statistic": "l1"}, ValueError, r"statistic='l1' is not supported; choose one of \('norm', 'energy'\)"),
        ({"dtype": "float16"}, ValueError, r"dtype='float16' is not supported"),
        ({"layers": []}, ValueError, r"layers=\[\] is empty"),
        ({"groups": []}, ValueError, r"groups=\[\] must be a non-empty list"),
        ({"groups": ["val", "val"]}, ValueError, r"must be a non-empty list of distinct group names"),
        (
            {"groups": ["memorized"], "adapter": ClassificationProbeAdapter()},
            ValueError,
            r"\['memorized'\] are not groups of ClassificationProbeAdapter; choose from \('noised', 'clean', 'val'\)",
        ),
        ({"adapter": "vit"}, TypeError, r"adapter must be a memcurve ProbeAdapter"),
        ({"factors": ""}, ValueError, r"factors='' must be a factor file path or 'latest'"),
        ({"overwrite": "yes"}, TypeError, r"overwrite='yes' must be True or False"),
        ({"filename": "bands-{layer}"}, ValueError, r"filename='bands-\{layer\}' must be a file name .* \{epoch\}"),
    ],
)
def test_bad_arguments_fail_eagerly(kwargs, error, message):
    with pytest.raises(error, match=message):
        BandActivationProbe(**kwargs)


def test_the_probe_is_checked_against_the_model_and_the_factors_at_setup(tmp_path, tiny_vit_kwargs, fc2_factors):
    model, datamodule, factor_path = tiny_model(tiny_vit_kwargs), small_digits(), fc2_factors

    def fit(probe: BandActivationProbe, *others: pl.Callback) -> None:
        make_trainer(tmp_path, [*others, probe], logger=False).fit(model, datamodule=datamodule)

    with pytest.raises(ValueError, match=r"layer pattern 'model.decoder.\*' matches no nn.Linear module"):
        fit(BandActivationProbe(factors=str(factor_path), layers=["model.decoder.*"]))
    with pytest.raises(ValueError, match=r"selects \['model.blocks.0.mlp.fc1'\], which have no K-FAC factors in"):
        fit(BandActivationProbe(factors=str(factor_path), layers=["model.blocks.0.mlp.fc?"]))
    with pytest.raises(ValueError, match=r"selects \['model.blocks.0.mlp.fc2'\], which have no K-FAC factors in the"):
        fit(BandActivationProbe(layers=["model.blocks.0.mlp.fc2"]), KFACFactors(layers=["model.head"]))
    with pytest.raises(FileNotFoundError, match=r"no such factor file"):
        fit(BandActivationProbe(factors=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError, match=r"needs a memcurve.callbacks.KFACFactors callback before"):
        fit(BandActivationProbe())
    with pytest.raises(ValueError, match=r"comes after BandActivationProbe .* put KFACFactors first"):
        probe = BandActivationProbe()
        make_trainer(tmp_path, [probe, KFACFactors(layers=["model.head"])], logger=False).fit(
            model, datamodule=datamodule
        )
    with pytest.raises(ValueError, match=r"groups=\['memorized'\]: \['memorized'\] are not groups"):
        fit(BandActivationProbe(factors=str(factor_path), groups=["memorized"]))
    other = tiny_model(tiny_vit_kwargs, embed_dim=16)  # factors of another model are refused
    with pytest.raises(FactorFileError, match=r"'model.blocks.0.mlp.fc2' in_features is 64 in the model, 128 in the"):
        make_trainer(tmp_path, [BandActivationProbe(factors=str(factor_path))], logger=False).fit(
            other, datamodule=small_digits()
        )
