"""Image sources for the noisy-label classification DataModule.

Each source turns a dataset that sits on disk (or in memory) into train/val ``torch`` datasets whose items are
``(image, label)`` with ``image`` a float32 tensor ``[C, H, W]`` in ``[0, 1]`` and ``label`` an ``int``. Labels
are also returned as one int64 tensor per split, read without decoding any image, because the DataModule
corrupts labels (and carves validation splits) before training starts.

Nothing here downloads: torchvision datasets are opened with ``download=False`` and every missing file is
reported with the argument, the value and how to get the data (see DATA.md). Normalization and augmentation
are left to the DataModule; sources only report the ``mean`` / ``std`` constants of their pixels.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

if TYPE_CHECKING:
    import datasets as hf_datasets

__all__ = ["SOURCES", "ImageSplits", "SourceInfo", "load_image_source", "source_info"]

SOURCES = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "hf")

# Debian's `dataset-fashion-mnist` installs the four gzipped IDX files here.
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_IMAGEFOLDER_SIZE = 224

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY_MEAN = (0.5,)
_GREY_STD = (0.5,)

_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_CIFAR_FILES = {
    "cifar10": (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    ),
    "cifar100": ("train", "test", "meta"),
}


@dataclass(frozen=True)
class SourceInfo:
    """Static facts about a source, known without loading any data (for eager argument checks)."""

    num_classes: int | None
    """Number of classes; None when only known after loading (imagefolder, hf)."""
    in_chans: int | None
    """Image channels; None for ``hf``, whose images are only seen after loading."""
    image_size: int | None
    """Side of the square images: the native size or the requested ``image_size``; None for ``hf`` without one."""
    mean: tuple[float, ...] | None
    """Per-channel mean of the [0, 1] pixels; None when ``in_chans`` is None."""
    std: tuple[float, ...] | None
    """Per-channel standard deviation of the [0, 1] pixels; None when ``in_chans`` is None."""


@dataclass(frozen=True)
class ImageSplits:
    """A loaded source: datasets, their labels and the facts a model and a normalizer need."""

    train: Dataset
    """Item i -> (float32 image [C, H, W] in [0, 1], int label)."""
    val: Dataset | None
    """Held-out split, or None when the source has none (the DataModule carves one from ``train``)."""
    train_labels: torch.Tensor
    """int64 [len(train)], read without decoding images."""
    val_labels: torch.Tensor | None
    """int64 [len(val)], or None with ``val``."""
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str] | None


# (num_classes, in_chans, native image size, mean, std); None = only known after loading.
_STATIC: dict[str, tuple[int | None, int | None, int | None, tuple[float, ...] | None, tuple[float, ...] | None]] = {
    # Digits constants computed once over all 1,797 images of load_digits() divided by 16 (rounded to 4 decimals).
    "digits": (10, 1, 8, (0.3053,), (0.3760,)),
    "fashion_mnist": (10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": (10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": (None, 3, DEFAULT_IMAGEFOLDER_SIZE, _IMAGENET_MEAN, _IMAGENET_STD),
    "hf": (None, None, None, None, None),
}


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not one of {SOURCES}")


def _check_image_size(image_size: int | None) -> None:
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r} must be None (native size) or an integer >= 1")


def source_info(source: str, image_size: int | None = None) -> SourceInfo:
    """Static facts of ``source`` with the requested ``image_size`` applied; reads no data."""
    _check_source(source)
    _check_image_size(image_size)
    num_classes, in_chans, native_size, mean, std = _STATIC[source]
    return SourceInfo(num_classes, in_chans, image_size if image_size is not None else native_size, mean, std)


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor [N, C, H, W]: uint8 (scaled by 1/255 per item) or float in [0, 1].

    uint8 storage keeps 70k Fashion-MNIST or 60k CIFAR images at 55 MB / 184 MB instead of four times that.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"images must be [N, C, H, W] with N == len(labels); got {tuple(images.shape)}, {len(labels)} labels"
            )
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        return image, int(self.labels[index])


def _resize_batch(images: torch.Tensor, image_size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize [N, C, H, W] to ``image_size`` square, once, keeping the dtype (uint8 stays uint8).

    Works in chunks so the float copy of a large uint8 set never lives in memory whole; uint8 results are
    rounded back to uint8, an error of at most half a grey level, the precision of the source files.
    """
    if images.shape[-2:] == (image_size, image_size):
        return images
    out = []
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].float()
        if images.dtype == torch.uint8:
            part = part / 255.0
        part = F.interpolate(
            part, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
        out.append(part.mul(255.0).round_().to(torch.uint8) if images.dtype == torch.uint8 else part)
    return torch.cat(out)


def _resize_one(image: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize one float [C, H, W] image to a square ``image_size`` (no-op when None or already that size)."""
    if image_size is None or image.shape[-2:] == (image_size, image_size):
        return image
    resized = F.interpolate(
        image.unsqueeze(0), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.squeeze(0).clamp_(0.0, 1.0)


class _PilToTensor:
    """PIL image -> float RGB [3, S, S] in [0, 1]; a module-level class so DataLoader workers can pickle it."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return _resize_one(_pil_to_float(image.convert("RGB")), self.image_size)


def _pil_to_float(image: Image.Image) -> torch.Tensor:
    """PIL image in mode L or RGB -> float [C, H, W] in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class HFImageDataset(Dataset):
    """A HF ``datasets.Dataset`` image column decoded lazily to float [C, H, W] in [0, 1].

    Every image is brought to ``in_chans`` channels (grey <-> RGB), so sets that mix grey and colour images
    (ImageNet has a few) still batch; integer arrays are scaled by 1/255, float arrays are taken as [0, 1].
    """

    def __init__(
        self,
        dataset: hf_datasets.Dataset,
        image_column: str,
        labels: torch.Tensor,
        in_chans: int,
        image_size: int | None,
    ) -> None:
        # Only the image column is read per item: other image-like columns would be decoded for nothing.
        self.dataset = dataset.select_columns([image_column])
        self.image_column = image_column
        self.labels = labels
        self.in_chans = in_chans
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _hf_image_to_float(self.dataset[int(index)][self.image_column], self.in_chans)
        return _resize_one(image, self.image_size), int(self.labels[index])


def _hf_image_to_float(value: Any, in_chans: int | None = None) -> torch.Tensor:
    """A PIL image or an (H, W) / (H, W, C) array-like -> float [C, H, W] in [0, 1], C = ``in_chans`` if given."""
    if isinstance(value, Image.Image):
        if in_chans is None:
            in_chans = 1 if value.mode in ("1", "L", "I", "I;16", "F") else 3
        if value.mode in ("I", "I;16", "F"):
            # High-depth grey: scale to [0, 1] from its own range rather than clipping at 255.
            array = np.asarray(value, dtype=np.float64)
            array = array / max(float(array.max()), 1.0) if array.max() > 1 else array
            image = torch.from_numpy(array).float().unsqueeze(0)
            return image.expand(in_chans, -1, -1).contiguous()
        return _pil_to_float(value.convert("L" if in_chans == 1 else "RGB"))
    array = np.asarray(value)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"hf image of shape {array.shape} is not (H, W) or (H, W, C) with C in (1, 3, 4)")
    scale = 255.0 if np.issubdtype(array.dtype, np.integer) or array.dtype == bool else 1.0
    image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1) / scale
    if image.shape[0] == 4:
        image = image[:3]  # drop alpha
    if in_chans is not None and image.shape[0] != in_chans:
        # Grey -> RGB repeats the channel; RGB -> grey uses the ITU-R 601 luma weights, as PIL's convert("L").
        if in_chans == 3:
            image = image.expand(3, -1, -1)
        else:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
            image = (image * weights).sum(0, keepdim=True)
    return image.clamp(0.0, 1.0).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------


def load_image_source(
    source: str,
    *,
    root: str | os.PathLike | hf_datasets.Dataset | hf_datasets.DatasetDict | None = None,
    image_size: int | None = None,
    hf_train_split: str = "train",
    hf_val_split: str | None = "validation",
    hf_image_column: str = "image",
    hf_label_column: str = "label",
) -> ImageSplits:
    """Load ``source`` into train/val datasets plus their labels; nothing is downloaded.

    ``root`` is the folder of the data (``fashion_mnist`` defaults to Debian's install folder; ``digits``
    ignores it); for ``hf`` it is a hub name, a local path or an in-memory ``Dataset`` / ``DatasetDict``.
    ``image_size`` resizes to a square of that side (``imagefolder`` defaults to 224, others keep their size).
    """
    _check_source(source)
    _check_image_size(image_size)
    if source == "digits":
        return _load_digits(image_size)
    if source == "fashion_mnist":
        return _load_fashion_mnist(root, image_size)
    if source in _CIFAR_FOLDERS:
        return _load_cifar(source, root, image_size)
    if source == "imagefolder":
        return _load_imagefolder(root, image_size)
    return _load_hf(root, image_size, hf_train_split, hf_val_split, hf_image_column, hf_label_column)


def _splits(
    source: str,
    train: Dataset,
    train_labels: torch.Tensor,
    val: Dataset | None,
    val_labels: torch.Tensor | None,
    image_size: int | None,
    class_names: list[str] | None,
) -> ImageSplits:
    """ImageSplits for a source whose static facts are all known."""
    info = source_info(source, image_size)
    assert info.num_classes is not None and info.in_chans is not None and info.image_size is not None
    assert info.mean is not None and info.std is not None
    return ImageSplits(
        train,
        val,
        train_labels,
        val_labels,
        info.num_classes,
        info.in_chans,
        info.image_size,
        info.mean,
        info.std,
        class_names,
    )


def _load_digits(image_size: int | None) -> ImageSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; float storage keeps them exact (k/16 is not a uint8 grey level) and is tiny.
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)
    if image_size is not None:
        images = _resize_batch(images, image_size)
    labels = torch.from_numpy(digits.target).long()
    names = [str(name) for name in digits.target_names]
    return _splits("digits", TensorImageDataset(images, labels), labels, None, None, image_size, names)


def _require_root(source: str, root: Any, needs: str) -> Path:
    if root is None:
        raise ValueError(f"root=None: {source} needs root={needs}")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root={root!r} must be a path for {source}; {source} needs {needs}")
    path = Path(root).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"root={str(root)!r} does not exist; {source} needs {needs}")
    return path


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memcurve"


def _gunzip_fashion_mnist(folder: Path) -> Path:
    """Gunzip Debian's four ``*-ubyte.gz`` files once into the cache; return the torchvision root there.

    A stamp records the source files (path, size, mtime) so pointing at another folder re-extracts instead
    of silently reusing the old images; each file is written to a temporary name then renamed, so an
    interrupted run never leaves a truncated file that torchvision would accept.
    """
    root = _cache_dir() / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    stamp_path = raw / ".memcurve-source.json"
    sources = {name: folder / f"{name}.gz" for name in _FASHION_FILES}
    stamp = {name: [str(src.resolve()), src.stat().st_size, src.stat().st_mtime_ns] for name, src in sources.items()}
    try:
        cached = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        cached = None
    if cached == stamp and all((raw / name).is_file() for name in _FASHION_FILES):
        return root
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
                while block := inp.read(1 << 20):
                    out.write(block)
            os.replace(tmp, raw / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    fd, tmp = tempfile.mkstemp(dir=raw, prefix=".stamp.", suffix=".tmp")
    with os.fdopen(fd, "w") as out:
        json.dump(stamp, out)
    os.replace(tmp, stamp_path)
    return root


def _load_fashion_mnist(root: Any, image_size: int | None) -> ImageSplits:
    from torchvision.datasets import FashionMNIST

    needs = (
        f"a folder with {', '.join(n + '.gz' for n in _FASHION_FILES)} (default {DEFAULT_FASHION_MNIST_ROOT}, "
        "see DATA.md: apt-get install dataset-fashion-mnist) or torchvision's ROOT/FashionMNIST/raw/*-ubyte"
    )
    folder = _require_root("fashion_mnist", DEFAULT_FASHION_MNIST_ROOT if root is None else root, needs)
    if all((folder / "FashionMNIST" / "raw" / name).is_file() for name in _FASHION_FILES):
        tv_root = folder  # torchvision's own layout
    elif all((folder / f"{name}.gz").is_file() for name in _FASHION_FILES):
        tv_root = _gunzip_fashion_mnist(folder)  # Debian's layout
    else:
        raise FileNotFoundError(
            f"root={str(root if root is not None else folder)!r} holds no Fashion-MNIST files; "
            f"fashion_mnist needs {needs}"
        )
    train = FashionMNIST(tv_root, train=True, download=False)
    test = FashionMNIST(tv_root, train=False, download=False)
    splits = []
    for split in (train, test):
        images = split.data.unsqueeze(1)  # uint8 [N, 1, 28, 28]
        if image_size is not None:
            images = _resize_batch(images, image_size)
        labels = split.targets.long()
        splits.append((TensorImageDataset(images, labels), labels))
    (train_ds, train_labels), (val_ds, val_labels) = splits
    return _splits("fashion_mnist", train_ds, train_labels, val_ds, val_labels, image_size, list(train.classes))


def _load_cifar(source: str, root: Any, image_size: int | None) -> ImageSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    folder_name = _CIFAR_FOLDERS[source]
    needs = (
        f"a folder holding {folder_name}/ ({', '.join(_CIFAR_FILES[source])}), as extracted from "
        f"torchvision's {source} archive; nothing is downloaded"
    )
    folder = _require_root(source, root, needs)
    missing = [name for name in _CIFAR_FILES[source] if not (folder / folder_name / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"root={str(root)!r} lacks {folder_name}/{{{', '.join(missing)}}}; {source} needs {needs}"
        )
    dataset_cls = CIFAR10 if source == "cifar10" else CIFAR100
    splits = []
    for train in (True, False):
        try:
            dataset = dataset_cls(str(folder), train=train, download=False)
        except RuntimeError as err:  # torchvision's md5 check failed: say which folder
            raise RuntimeError(f"root={str(root)!r}: {folder_name} failed torchvision's checksum ({err})") from err
        # HWC uint8 numpy -> CHW uint8 tensor, kept as uint8 (see TensorImageDataset).
        images = torch.from_numpy(np.ascontiguousarray(dataset.data.transpose(0, 3, 1, 2)))
        if image_size is not None:
            images = _resize_batch(images, image_size)
        labels = torch.as_tensor(dataset.targets, dtype=torch.long)
        splits.append((TensorImageDataset(images, labels), labels, list(dataset.classes)))
    (train_ds, train_labels, names), (val_ds, val_labels, _) = splits
    return _splits(source, train_ds, train_labels, val_ds, val_labels, image_size, names)


def _load_imagefolder(root: Any, image_size: int | None) -> ImageSplits:
    needs = "a folder of class folders (root/CLASS/IMAGE) or one with train/ and optionally val/ class-folder trees"
    folder = _require_root("imagefolder", root, needs)
    size = DEFAULT_IMAGEFOLDER_SIZE if image_size is None else image_size
    transform = _PilToTensor(size)
    train_dir = folder / "train" if (folder / "train").is_dir() else folder
    train = ImageFolder(str(train_dir), transform=transform)
    val = None
    val_labels = None
    if train_dir != folder and (folder / "val").is_dir():
        val_classes = sorted(entry.name for entry in os.scandir(folder / "val") if entry.is_dir())
        unknown = sorted(set(val_classes) - set(train.class_to_idx))
        if unknown:
            raise ValueError(
                f"root={str(root)!r}: val/ has classes {unknown} that train/ lacks; val classes must "
                f"be a subset of {train.classes}"
            )
        # Index val with train's class list, so a val/ missing some class keeps the same label numbers.
        val = _FixedClassesImageFolder(str(folder / "val"), train.class_to_idx, transform=transform)
        val_labels = torch.as_tensor(val.targets, dtype=torch.long)
    info = source_info("imagefolder", size)
    assert info.mean is not None and info.std is not None
    return ImageSplits(
        train,
        val,
        torch.as_tensor(train.targets, dtype=torch.long),
        val_labels,
        len(train.classes),
        3,
        size,
        info.mean,
        info.std,
        list(train.classes),
    )


class _FixedClassesImageFolder(ImageFolder):
    """ImageFolder with an imposed class -> index map (classes absent from this folder are allowed)."""

    def __init__(self, root: str, class_to_idx: dict[str, int], **kwargs: Any) -> None:
        self._imposed = dict(class_to_idx)  # set before super().__init__, which calls find_classes
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return sorted(self._imposed, key=self._imposed.__getitem__), dict(self._imposed)


def _open_hf(root: Any) -> hf_datasets.Dataset | hf_datasets.DatasetDict:
    """An in-memory dataset as is; a ``save_to_disk`` folder via ``load_from_disk``; anything else via
    ``load_dataset`` (a local data folder or script, or a hub name for users who are online)."""
    import datasets

    if isinstance(root, (datasets.Dataset, datasets.DatasetDict)):
        return root
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root={root!r} must be a hf dataset name, a local path, or a datasets.Dataset / DatasetDict")
    path = Path(root).expanduser()
    # save_to_disk writes dataset_dict.json (DatasetDict) or state.json (Dataset) at the top of the folder.
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset(str(path) if path.exists() else str(root))


def _hf_labels(dataset: hf_datasets.Dataset, column: str, split: str) -> torch.Tensor:
    """The label column as int64, read through Arrow without decoding any image."""
    values = dataset.select_columns([column]).with_format("numpy")[:][column]
    array = np.asarray(values)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ValueError(
            f"hf_label_column={column!r} in split {split!r} must hold integer class labels; got dtype "
            f"{array.dtype} and shape {array.shape}"
        )
    labels = torch.from_numpy(array.astype(np.int64))
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(
            f"hf_label_column={column!r} in split {split!r} has negative labels (unlabelled rows?); "
            "pick a labelled split"
        )
    return labels


def _load_hf(
    root: Any, image_size: int | None, train_split: str, val_split: str | None, image_column: str, label_column: str
) -> ImageSplits:
    import datasets

    if root is None:
        raise ValueError(
            "root=None: hf needs root=a hf dataset name, a local path, or a datasets.Dataset / DatasetDict"
        )
    data = _open_hf(root)
    if isinstance(data, datasets.DatasetDict):
        if train_split not in data:
            raise ValueError(f"hf_train_split={train_split!r} is not one of the splits {list(data)}")
        train = data[train_split]
        val = None
        if val_split is not None:
            if val_split in data:
                val = data[val_split]
            else:
                warnings.warn(
                    f"hf_val_split={val_split!r} is not one of the splits {list(data)}; no val split "
                    "(pass hf_val_split=None to silence)",
                    stacklevel=3,
                )
    else:
        train, val = data, None  # a single Dataset has no splits: the DataModule carves val from train

    named = [("train", train)] + ([("val", val)] if val is not None else [])
    for split, dataset in named:
        for argument, column in (("hf_image_column", image_column), ("hf_label_column", label_column)):
            if column not in dataset.column_names:
                raise ValueError(
                    f"{argument}={column!r} is not a column of the {split} split; columns are {dataset.column_names}"
                )

    train_labels = _hf_labels(train, label_column, train_split)
    val_labels = _hf_labels(val, label_column, str(val_split)) if val is not None else None
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        num_classes, class_names = int(feature.num_classes), list(feature.names)
    else:
        highest = [int(labels.max()) for labels in (train_labels, val_labels) if labels is not None and labels.numel()]
        num_classes, class_names = (max(highest) + 1 if highest else 0), None
    for split, labels in (("train", train_labels), ("val", val_labels)):
        if labels is not None and labels.numel() and int(labels.max()) >= num_classes:
            raise ValueError(
                f"hf_label_column={label_column!r}: {split} label {int(labels.max())} >= num_classes="
                f"{num_classes} of the ClassLabel feature"
            )
    if len(train) == 0:
        raise ValueError(f"hf_train_split={train_split!r} is empty")

    # Channels and native size come from the first training image; every item is then brought to them.
    first = _hf_image_to_float(train.select_columns([image_column])[0][image_column])
    in_chans = int(first.shape[0])
    if image_size is None:
        height, width = first.shape[-2:]
        if height != width:
            raise ValueError(f"image_size=None but hf images are {height}x{width}, not square; pass image_size")
        size = int(height)
    else:
        size = image_size
    mean, std = (_IMAGENET_MEAN, _IMAGENET_STD) if in_chans == 3 else (_GREY_MEAN, _GREY_STD)
    train_ds = HFImageDataset(train, image_column, train_labels, in_chans, image_size)
    val_ds = HFImageDataset(val, image_column, val_labels, in_chans, image_size) if val is not None else None
    return ImageSplits(train_ds, val_ds, train_labels, val_labels, num_classes, in_chans, size, mean, std, class_names)
