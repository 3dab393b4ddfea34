"""Devices and precision: the one place that turns ``--device`` and ``--precision`` into torch terms.

``auto`` picks CUDA, then MPS, then the CPU; an explicit device must be present. Sampling
precision is ``auto`` (bf16 autocast on CUDA, fp32 elsewhere), ``fp32`` or ``bf16``.
"""

from __future__ import annotations

import torch

from difflab.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str = "auto") -> str:
    """auto -> cuda, then mps, then cpu; anything else must be available."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    base = device.split(":")[0]
    if base not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device!r}: choose one of auto, cpu, cuda, cuda:N, mps")
    if base == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: CUDA is not available on this machine (use auto or cpu)"
        )
    if base == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise UsageError(
            f"--device {device}: MPS is not available on this machine (use auto or cpu)"
        )
    return device


def resolve_precision(precision: str | None, device: str | torch.device) -> str | None:
    """The autocast of the network while sampling: ``"bf16"`` or None (fp32).

    ``auto`` is bf16 on CUDA and fp32 elsewhere. bf16 is worth asking for on a CPU too: on a
    2-core AVX2 CPU it sampled 2-3x faster with the same accuracy and FD (docs/benchmarks.md).
    """
    precision = "auto" if precision is None else precision
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else None
    return "bf16" if precision == "bf16" else None
