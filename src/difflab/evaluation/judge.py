"""The reference classifier ("judge") that grades class-conditional samples.

A small CNN (:class:`JudgeNet`) is trained once per dataset on its train split
(:func:`train_judge`: seeded, shift augmentation, AdamW + one-cycle) and cached as
safetensors plus a JSON sidecar; :func:`get_judge` loads it or trains it on first use, and
returns a :class:`Judge` that classifies images and exposes the network's penultimate
features, on which the sample metrics in :mod:`difflab.evaluation.metrics` are computed.
A change of :data:`RECIPE_VERSION` makes every cached judge retrain.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import UsageError
from difflab.files import atomic_path, write_json

RECIPE_VERSION = 1
FEATURE_DIM = 128
EVAL_BATCH = 500


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class JudgeNet(nn.Module):
    """Small CNN for any channel count and any H x W >= 8; input float images in [-1, 1]."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        w = width
        self.body = nn.Sequential(
            _block(in_channels, w),
            _block(w, w),
            nn.MaxPool2d(2),
            _block(w, 2 * w),
            _block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            _block(2 * w, FEATURE_DIM),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (N, FEATURE_DIM)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
