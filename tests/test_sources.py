"""Image sources: every loader on tiny generated data (offline, CPU), plus every misconfiguration message."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from memcurve.data import sources
from memcurve.data.sources import SOURCES, ImageSplits, load_image_source, source_info


def _check_item(splits: ImageSplits, dataset: torch.utils.data.Dataset, index: int, labels: torch.Tensor) -> None:
    image, label = dataset[index]
    assert image.dtype == torch.float32
    assert image.shape == (splits.in_chans, splits.image_size, splits.image_size)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(label, int) and label == int(labels[index])


def _check_info_matches(source: str, splits: ImageSplits, image_size: int | None = None) -> None:
    info = source_info(source, image_size)
    assert (info.in_chans, info.image_size, info.mean, info.std) == (
        splits.in_chans,
        splits.image_size,
        splits.mean,
        splits.std,
    )
    assert info.num_classes in (None, splits.num_classes)
    assert len(splits.mean) == len(splits.std) == splits.in_chans


# ---------------------------------------------------------------------------------------------------------- digits


def test_digits_native() -> None:
    splits = load_image_source("digits")
    assert len(splits.train) == 1797 and splits.train_labels.shape == (1797,)
    assert splits.train_labels.dtype == torch.int64 and splits.val is None and splits.val_labels is None
    assert (splits.num_classes, splits.in_chans, splits.image_size) == (10, 1, 8)
    assert set(splits.train_labels.tolist()) == set(range(10)) and splits.class_names == [str(i) for i in range(10)]
    for index in (0, 1796):
        _check_item(splits, splits.train, index, splits.train_labels)
    _check_info_matches("digits", splits)
    # The hard-coded constants are those of the pixels.
    pixels = splits.train.images
    assert float(pixels.max()) == 1.0 and float(pixels.min()) == 0.0
    assert abs(float(pixels.mean()) - splits.mean[0]) < 1e-4 and abs(float(pixels.std()) - splits.std[0]) < 1e-3


def test_digits_resized() -> None:
    splits = load_image_source("digits", image_size=16)
    assert splits.image_size == 16 and splits.train.images.shape == (1797, 1, 16, 16)
    _check_item(splits, splits.train, 3, splits.train_labels)
    _check_info_matches("digits", splits, 16)


# ----------------------------------------------------------------------------------------------------- imagefolder


def _write_class_tree(folder: Path, classes: tuple[str, ...], per_class: int, size: tuple[int, int]) -> None:
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            if i == 0:  # one grey PNG per class: must come out RGB
                Image.new("L", size, 40 * k + i).save(folder / name / f"{i}.png")
            else:
                Image.new("RGB", size, (40 * k, 10 * i, 200)).save(folder / name / f"{i}.png")


def test_imagefolder_flat_tree(tmp_path: Path) -> None:
    _write_class_tree(tmp_path, ("ant", "bee", "cat"), 4, (10, 7))
    splits = load_image_source("imagefolder", root=str(tmp_path), image_size=12)
    assert splits.val is None and splits.val_labels is None
    assert splits.class_names == ["ant", "bee", "cat"] and splits.num_classes == 3
    assert splits.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert (splits.in_chans, splits.image_size) == (3, 12)
    for index in (0, 5, 11):
        _check_item(splits, splits.train, index, splits.train_labels)
    grey, _ = splits.train[4]  # bee/0.png is grey 40: three equal channels
    assert torch.allclose(grey, torch.full((3, 12, 12), 40 / 255), atol=1e-6)
    _check_info_matches("imagefolder", splits, 12)


def test_imagefolder_train_val_default_size(tmp_path: Path) -> None:
    _write_class_tree(tmp_path / "train", ("ant", "bee", "cat"), 4, (6, 6))
    _write_class_tree(tmp_path / "val", ("bee", "cat"), 2, (6, 6))  # a class missing from val keeps label numbers
    splits = load_image_source("imagefolder", root=tmp_path)
    assert splits.image_size == 224 and len(splits.train) == 12
    assert splits.val is not None and splits.val_labels is not None
    assert splits.val_labels.tolist() == [1, 1, 2, 2]
    _check_item(splits, splits.val, 2, splits.val_labels)
    _check_info_matches("imagefolder", splits)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root=None: imagefolder needs"):
        load_image_source("imagefolder")
    with pytest.raises(FileNotFoundError, match="root='/nope/x' does not exist; imagefolder needs"):
        load_image_source("imagefolder", root="/nope/x")
    _write_class_tree(tmp_path / "train", ("ant",), 1, (4, 4))
    _write_class_tree(tmp_path / "val", ("ant", "zebra"), 1, (4, 4))
    with pytest.raises(ValueError, match=r"val/ has classes \['zebra'\] that train/ lacks"):
        load_image_source("imagefolder", root=tmp_path)


# -------------------------------------------------------------------------------------------------------------- hf


def _grey_list_dataset(n: int, class_label: bool) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(5, 5)).astype(np.uint8).tolist() for _ in range(n)]
    labels = [i % 3 for i in range(n)]
    features = datasets.Features(
        {
            "pixels": datasets.Sequence(datasets.Sequence(datasets.Value("uint8"))),
            "y": datasets.ClassLabel(names=["a", "b", "c", "d"]) if class_label else datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict({"pixels": images, "y": labels}, features=features)


def test_hf_grey_lists_classlabel() -> None:
    ds = _grey_list_dataset(6, class_label=True)
    splits = load_image_source("hf", root=ds, hf_image_column="pixels", hf_label_column="y")
    assert splits.val is None and splits.num_classes == 4 and splits.class_names == ["a", "b", "c", "d"]
    assert splits.train_labels.tolist() == [0, 1, 2, 0, 1, 2] and splits.train_labels.dtype == torch.int64
    assert (splits.in_chans, splits.image_size, splits.mean) == (1, 5, (0.5,))
    image, _ = splits.train[1]
    assert torch.allclose(image[0], torch.tensor(ds[1]["pixels"], dtype=torch.float32) / 255)
    _check_item(splits, splits.train, 5, splits.train_labels)


def test_hf_plain_int_labels_resized_dict() -> None:
    train = _grey_list_dataset(4, class_label=False)
    val = _grey_list_dataset(2, class_label=False)
    dd = datasets.DatasetDict({"train": train, "test": val})
    splits = load_image_source(
        "hf", root=dd, image_size=7, hf_val_split="test", hf_image_column="pixels", hf_label_column="y"
    )
    assert splits.num_classes == 3 and splits.class_names is None  # max(label) + 1
    assert splits.val is not None and splits.val_labels is not None and splits.val_labels.tolist() == [0, 1]
    _check_item(splits, splits.train, 0, splits.train_labels)
    _check_item(splits, splits.val, 1, splits.val_labels)


def _rgb_pil_dataset(n: int) -> datasets.Dataset:
    images = [Image.new("RGB", (8, 8), (255, 20 * i, 0)) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)


def test_hf_rgb_pil_save_to_disk(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"train": _rgb_pil_dataset(4), "validation": _rgb_pil_dataset(2)})
    dd.save_to_disk(str(tmp_path / "dd"))
    splits = load_image_source("hf", root=str(tmp_path / "dd"))
    assert (splits.in_chans, splits.image_size, splits.num_classes) == (3, 8, 2)
    assert splits.mean == (0.485, 0.456, 0.406) and splits.val is not None
    image, label = splits.train[1]
    assert label == 1 and torch.allclose(image[:, 0, 0], torch.tensor([1.0, 20 / 255, 0.0]))
    _check_item(splits, splits.val, 1, splits.val_labels)

    _rgb_pil_dataset(3).save_to_disk(str(tmp_path / "single"))  # a Dataset folder: no splits, val None
    single = load_image_source("hf", root=tmp_path / "single", image_size=4)
    assert single.val is None and len(single.train) == 3 and single.train[0][0].shape == (3, 4, 4)


def test_hf_errors() -> None:
    ds = _grey_list_dataset(3, class_label=True)
    with pytest.raises(ValueError, match="root=None: hf needs"):
        load_image_source("hf")
    with pytest.raises(TypeError, match="root=42 must be a hf dataset name"):
        load_image_source("hf", root=42)
    with pytest.raises(ValueError, match=r"hf_image_column='image' is not a column of the train split; columns are"):
        load_image_source("hf", root=ds, hf_label_column="y")
    with pytest.raises(ValueError, match=r"hf_label_column='label' is not a column .*\['pixels', 'y'\]"):
        load_image_source("hf", root=ds, hf_image_column="pixels")
    dd = datasets.DatasetDict({"validation": ds})
    with pytest.raises(ValueError, match=r"hf_train_split='train' is not one of the splits \['validation'\]"):
        load_image_source("hf", root=dd, hf_image_column="pixels", hf_label_column="y")
    unlabelled = datasets.Dataset.from_dict({"image": [[[0]]], "label": [-1]})
    with pytest.raises(ValueError, match="hf_label_column='label' in split 'train' has negative labels"):
        load_image_source("hf", root=unlabelled)
    wide = datasets.Dataset.from_dict({"image": [[[0, 0, 0]]], "label": [0]})
    with pytest.raises(ValueError, match="image_size=None but hf images are 1x3, not square"):
        load_image_source("hf", root=wide)


# --------------------------------------------------------------------------------------------------- fashion_mnist


def _idx_images(images: np.ndarray) -> bytes:
    # IDX: magic 0x00000803 (ubyte, 3 dims), then the dims big-endian, then the pixels.
    return struct.pack(">IIII", 0x0803, *images.shape) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes()


def _fake_fashion(n_train: int = 5, n_test: int = 3) -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    return {
        "train-images-idx3-ubyte": _idx_images(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte": _idx_labels(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte": _idx_images(rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte": _idx_labels(np.arange(n_test) % 10 + 2),
    }


def _check_fashion(splits: ImageSplits, size: int = 28) -> None:
    assert len(splits.train) == 5 and splits.val is not None and len(splits.val) == 3
    assert splits.train_labels.tolist() == [0, 1, 2, 3, 4] and splits.val_labels.tolist() == [2, 3, 4]
    assert (splits.num_classes, splits.in_chans, splits.image_size) == (10, 1, size)
    assert splits.class_names is not None and splits.class_names[0] == "T-shirt/top"
    assert splits.train.images.dtype == torch.uint8  # modest memory: decoded to float per item
    _check_item(splits, splits.train, 4, splits.train_labels)
    _check_item(splits, splits.val, 0, splits.val_labels)
    _check_info_matches("fashion_mnist", splits, None if size == 28 else size)


def test_fashion_mnist_debian_layout_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "fashion-mnist"
    debian.mkdir()
    for name, data in _fake_fashion().items():
        (debian / f"{name}.gz").write_bytes(gzip.compress(data))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _check_fashion(load_image_source("fashion_mnist", root=str(debian)))
    cached = tmp_path / "cache" / "memcurve" / "fashion-mnist" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert cached.read_bytes() == _fake_fashion()["train-images-idx3-ubyte"]

    def no_gunzip(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(sources.gzip, "open", no_gunzip)
    _check_fashion(load_image_source("fashion_mnist", root=debian, image_size=14), size=14)


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name, data in _fake_fashion().items():
        (raw / name).write_bytes(data)
    _check_fashion(load_image_source("fashion_mnist", root=tmp_path))


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"root='/nope' does not exist; fashion_mnist needs .*dataset-fashion"):
        load_image_source("fashion_mnist", root="/nope")
    with pytest.raises(FileNotFoundError, match="holds no Fashion-MNIST files; fashion_mnist needs"):
        load_image_source("fashion_mnist", root=tmp_path)


# ----------------------------------------------------------------------------------------------------------- cifar


def _fake_cifar(root: Path, source: str, n: int = 4) -> None:
    folder = root / sources._CIFAR_FOLDERS[source]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    key, meta_key, classes = (
        ("labels", "label_names", 10) if source == "cifar10" else ("fine_labels", "fine_label_names", 100)
    )
    for name in sources._CIFAR_FILES[source][:-1]:  # the last one is the meta file
        entry = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), key: [i % classes for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / sources._CIFAR_FILES[source][-1]).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_fake_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    _fake_cifar(tmp_path, source)
    # Our files are not the real ones, so torchvision's md5 check must be bypassed (test only).
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    splits = load_image_source(source, root=tmp_path, image_size=16)
    n_train = 4 * (5 if source == "cifar10" else 1)
    assert len(splits.train) == n_train and splits.val is not None and len(splits.val) == 4
    assert splits.train_labels.tolist() == [0, 1, 2, 3] * (n_train // 4)
    assert (splits.num_classes, splits.in_chans, splits.image_size) == ((10 if source == "cifar10" else 100), 3, 16)
    assert splits.class_names is not None and splits.class_names[:2] == ["c0", "c1"]
    _check_item(splits, splits.train, 1, splits.train_labels)
    _check_item(splits, splits.val, 3, splits.val_labels)
    _check_info_matches(source, splits, 16)


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root=None: cifar10 needs root=a folder holding cifar-10-batches-py"):
        load_image_source("cifar10")
    with pytest.raises(FileNotFoundError, match="root='/nope' does not exist; cifar100 needs"):
        load_image_source("cifar100", root="/nope")
    with pytest.raises(FileNotFoundError, match=r"lacks cifar-10-batches-py/\{data_batch_1, .*batches.meta\}"):
        load_image_source("cifar10", root=tmp_path)
    _fake_cifar(tmp_path, "cifar10")  # present but not the real files: the md5 check refuses them
    with pytest.raises(RuntimeError, match="failed torchvision's checksum"):
        load_image_source("cifar10", root=tmp_path)


# ----------------------------------------------------------------------------------------------------------- misc


def test_source_info_static() -> None:
    assert source_info("cifar100").num_classes == 100
    assert source_info("imagefolder") == sources.SourceInfo(None, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert source_info("hf") == sources.SourceInfo(None, None, None, None, None)
    assert source_info("hf", 32).image_size == 32
    assert set(SOURCES) == set(sources._STATIC)


@pytest.mark.parametrize("image_size", [0, -3, 2.5, True])
def test_bad_image_size(image_size: object) -> None:
    with pytest.raises(ValueError, match=f"image_size={image_size!r} must be None"):
        source_info("digits", image_size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"image_size={image_size!r} must be None"):
        load_image_source("digits", image_size=image_size)  # type: ignore[arg-type]


def test_unknown_source() -> None:
    with pytest.raises(ValueError, match=r"source='foo' is not one of \('digits', 'fashion_mnist'"):
        load_image_source("foo")
    with pytest.raises(ValueError, match="source='foo' is not one of"):
        source_info("foo")
