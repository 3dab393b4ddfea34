"""The reference classifier ("judge") that grades class-conditional samples.

A small CNN (:class:`JudgeNet`) is trained once per dataset on its train split
(:func:`train_judge`: seeded, random shifts of up to 2 px, label smoothing, AdamW with a
one-cycle schedule) and cached as safetensors plus a JSON sidecar; :func:`get_judge` loads
it, or trains it on first use, and returns a :class:`Judge` that classifies images and exposes the network's
penultimate features, on which the sample metrics in :mod:`difflab.evaluation.metrics` are
computed. Raising :data:`RECIPE_VERSION` makes every cached judge retrain on next use.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from difflab.errors import UsageError
from difflab.files import atomic_path, cache_base, write_json

RECIPE_VERSION = 2
FEATURE_DIM = 128
EVAL_BATCH = 500
LABEL_SMOOTHING = 0.1
CL = torch.channels_last  # about 25 % faster convolutions on CPU


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class JudgeNet(nn.Module):
    """Small CNN for any channel count and any H x W >= 8; input float images in [-1, 1].

    Conv-BN-ReLU blocks at full, 1/2, 1/4 and 1/8 resolution, global average pooling to a
    ``FEATURE_DIM``-d feature vector (:meth:`features`) and a linear head (:meth:`forward`).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        w = width
        self.body = nn.Sequential(
            *_block(in_channels, w),
            nn.MaxPool2d(2),
            *_block(w, 2 * w),
            *_block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *_block(4 * w, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (N, FEATURE_DIM)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def default_epochs(n_train: int) -> int:
    """About 40k training images seen, between 3 and 10 epochs (10 for mnist5k)."""
    return int(min(10, max(3, math.ceil(40_000 / max(n_train, 1)))))


def _shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random offset of up to 2 px (1 px below 16 x 16)."""
    n, c, h, w = x.shape
    s = 1 if min(h, w) < 16 else 2
    xp = F.pad(x, (s, s, s, s), mode="replicate")
    dy = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    items, chans = torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None]
    return xp[items, chans, rows, cols]


@torch.no_grad()
def _accuracy(net: nn.Module, data: Any, device: torch.device) -> float:
    net.eval()
    correct = 0
    for i in range(0, len(data), EVAL_BATCH):
        x = data.to_float(slice(i, i + EVAL_BATCH)).to(device)
        pred = net(x).argmax(1).cpu()
        correct += int((pred == data.labels[i : i + EVAL_BATCH]).sum())
    return correct / max(len(data), 1)


def train_judge(
    train: Any,
    test: Any | None = None,
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    lr: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[JudgeNet, dict[str, Any]]:
    """Train a :class:`JudgeNet` on ``train`` (an ImageData); report accuracy on ``test``.

    Deterministic for a given seed, device and torch version; the caller's global RNG is
    left untouched. ``epochs=None`` picks :func:`default_epochs`; ``batch_size=None`` picks
    256 (32 for a train split of at most 2000 images) and ``lr=None`` 1e-2 (5e-3 for batches
    under 128). Returns the net in eval mode and an info dict (test_accuracy, epochs,
    seconds, ...).
    """
    if len(train) < 2 or train.num_classes < 2 or min(train.height, train.width) < 8:
        raise UsageError(
            f"--dataset {train.name}: the judge needs >= 2 images, >= 2 classes and >= 8x8 pixels"
        )
    epochs = default_epochs(len(train)) if epochs is None else int(epochs)
    batch_size = (256 if len(train) > 2000 else 32) if batch_size is None else int(batch_size)
    lr = (1e-2 if batch_size >= 128 else 5e-3) if lr is None else float(lr)
    if epochs < 1 or batch_size < 2:
        raise UsageError(f"epochs {epochs}, batch_size {batch_size}: need >= 1 and >= 2")
    dev = torch.device(_device(device))
    t0 = time.perf_counter()
    steps_per_epoch = math.ceil(len(train) / batch_size)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = JudgeNet(train.channels, train.num_classes, 16 if train.channels == 1 else 32)
        net = net.to(dev, memory_format=CL)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25
        )
        x_all, y_all = train.to_float(), train.labels
        bar = tqdm(
            total=epochs * steps_per_epoch, desc=f"judge {train.name}", unit="step",
            file=sys.stderr, disable=not progress, leave=False,
        )  # fmt: skip
        for epoch in range(epochs):
            net.train()
            perm = torch.randperm(len(train), generator=gen)
            total, count = 0.0, 0
            for i in range(0, len(train), batch_size):
                idx = perm[i : i + batch_size]
                if len(idx) < 2:  # BatchNorm needs two images
                    continue
                x = _shift(x_all[idx], gen).to(dev, memory_format=CL)
                loss = F.cross_entropy(net(x), y_all[idx].to(dev), label_smoothing=LABEL_SMOOTHING)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, count = total + loss.item() * len(idx), count + len(idx)
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / max(count, 1):.3f}")
        bar.close()
    train_seconds = time.perf_counter() - t0
    net = net.to(memory_format=torch.contiguous_format).eval()
    test_acc = _accuracy(net, test, dev) if test is not None and len(test) else None
    info = dict(dataset=train.name, recipe_version=RECIPE_VERSION, test_accuracy=test_acc,
                epochs=epochs, seconds=round(train_seconds, 2), seed=seed, lr=lr,
                batch_size=batch_size, num_train=len(train), device=str(dev),
                num_test=len(test) if test is not None else 0, torch=torch.__version__)  # fmt: skip
    return net, info


class Judge:
    """A trained :class:`JudgeNet` in eval mode: batched, gradient-free classification.

    Methods take float images in [-1, 1] of shape (N, C, H, W) on any device (uint8 images
    in 0..255 are converted) and return CPU tensors.
    """

    def __init__(self, net: JudgeNet, meta: dict[str, Any], device: str | torch.device = "cpu"):
        self.device = torch.device(_device(device))
        self.net = net.to(self.device, memory_format=CL).eval()
        self.meta = dict(meta)
        self.dataset: str = meta.get("dataset", "?")
        self.test_accuracy: float | None = meta.get("test_accuracy")
        self.num_classes: int = net.num_classes
        self.channels: int = net.in_channels
        self.height: int | None = meta.get("height")
        self.width: int | None = meta.get("width")
        self.class_names: list[str] = list(meta.get("class_names") or range(self.num_classes))

    def __repr__(self) -> str:
        return f"Judge(dataset={self.dataset!r}, test_accuracy={self.test_accuracy})"

    def _check(self, x: Any) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise UsageError(f"images: expected a (N, C, H, W) tensor, got {shape}")
        want = (self.channels, self.height or x.shape[2], self.width or x.shape[3])
        if tuple(x.shape[1:]) != want:
            raise UsageError(
                f"images: the {self.dataset} judge takes (N, {want[0]}, {want[1]}, {want[2]}) "
                f"images, got {tuple(x.shape)}"
            )
        if x.dtype == torch.uint8:
            return x
        if not x.is_floating_point():
            raise UsageError(f"images: expected float images in [-1, 1] or uint8, got {x.dtype}")
        if x.numel() and float(x.abs().max()) > 1.5:
            raise UsageError("images: expected float images in [-1, 1], got values beyond +-1.5")
        return x

    @torch.no_grad()
    def _apply(self, x: Any, fn: Any, dim: int) -> torch.Tensor:
        x = self._check(x)
        outs = [torch.zeros(0, dim)]
        for i in range(0, x.shape[0], EVAL_BATCH):
            b = x[i : i + EVAL_BATCH].to(self.device, memory_format=CL)
            b = b.float().div(127.5).sub(1.0) if b.dtype == torch.uint8 else b.float()
            outs.append(fn(b).float().cpu())
        return torch.cat(outs)

    def logits(self, x: Any) -> torch.Tensor:
        """Class logits (N, num_classes), float32 on the CPU."""
        return self._apply(x, self.net, self.num_classes)

    def predict(self, x: Any) -> torch.Tensor:
        return self.logits(x).argmax(1).to(torch.int64)

    def features(self, x: Any) -> torch.Tensor:
        """Penultimate features (N, FEATURE_DIM), float32 on the CPU."""
        return self._apply(x, self.net.features, FEATURE_DIM)


def _device(device: str | torch.device) -> str:
    from difflab.devices import resolve_device  # "auto" -> cuda, mps or cpu

    return resolve_device(str(device))


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return cache_base() / "judges"


def cache_key(dataset: str) -> str:
    """File stem for a dataset's judge; ``folder:PATH`` is keyed on its resolved path."""
    if dataset.startswith("folder:"):
        path = str(Path(dataset[len("folder:") :].strip()).expanduser().resolve())
        return "folder-" + hashlib.sha256(path.encode()).hexdigest()[:16]
    return re.sub(r"[^A-Za-z0-9._-]", "_", dataset.strip().lower().replace("_", "-"))


def _load_cached(stem: Path, device: str | torch.device) -> Judge | None:
    from safetensors.torch import load_file

    meta_path, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (meta_path.exists() and weights.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("recipe_version") != RECIPE_VERSION or meta.get("key") != stem.name:
            return None
        net = JudgeNet(meta["in_channels"], meta["num_classes"], meta["net_width"])
        net.load_state_dict(load_file(weights))
    except Exception:  # stale or damaged (bad JSON, truncated safetensors): retrain
        return None
    return Judge(net, meta, device)


def get_judge(
    dataset: str,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Judge:
    """The judge for ``dataset``: loaded from the cache, or trained on first use and cached.

    Cache: ``cache_dir``, else ``$DIFFLAB_CACHE/judges``, else ``~/.cache/difflab/judges``;
    one ``KEY.safetensors`` plus ``KEY.json`` (recipe version, accuracy, epochs, seconds).
    """
    from safetensors.torch import save

    from difflab.ddpm.data import load_dataset

    if not isinstance(dataset, str) or not dataset.strip():
        raise UsageError(f"--dataset {dataset!r}: give a dataset name")
    folder = cache_root(cache_dir)
    stem = folder / cache_key(dataset)
    judge = _load_cached(stem, device)
    if judge is not None and not dataset.startswith("folder:"):
        return judge
    train = load_dataset(dataset, "train", root)
    if judge is not None:  # a folder may have changed since its judge was trained
        meta = judge.meta
        if meta["class_names"] == list(train.class_names) and meta["num_train"] == len(train):
            return judge
    test = load_dataset(dataset, "test", root)
    msg = f"training the reference classifier for {dataset} (first use, cached in {folder})"
    print(msg, file=sys.stderr)
    net, info = train_judge(train, test, device=device, progress=progress)
    meta = dict(info, key=stem.name, in_channels=train.channels, num_classes=train.num_classes,
                net_width=net.width, height=train.height, width=train.width,
                feature_dim=FEATURE_DIM, class_names=list(train.class_names))  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        tmp.write_bytes(save(state, metadata={"recipe_version": str(RECIPE_VERSION)}))
    write_json(stem.with_suffix(".json"), meta)  # written last: it marks the pair complete
    return Judge(net, meta, device)
