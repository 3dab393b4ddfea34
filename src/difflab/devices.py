"""Devices and precision: the one place that turns ``--device``, ``--precision`` and ``--dtype``
into torch terms.

``auto`` picks CUDA, then MPS, then the CPU; an explicit device must be present. Number
formats have one vocabulary across the lab, :data:`PRECISIONS` (``fp32``, ``bf16``, ``fp16``):
DDPM sampling takes ``auto``, ``fp32`` or ``bf16`` (bf16 autocast; ``auto`` is bf16 on CUDA,
fp32 elsewhere), a Stable Diffusion pipeline ``auto``, ``fp16``, ``bf16`` or ``fp32`` (the
weights' dtype; ``auto`` is fp16 on CUDA/MPS, fp32 on the CPU). torch is imported only when
a device is resolved, so the options that name these values stay cheap to import.
"""

from __future__ import annotations

from typing import Any

from difflab.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")  # the one vocabulary of number formats
SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")  # DDPM sampling: autocast of the network
SD_DTYPES = ("auto", "fp16", "bf16", "fp32")  # Stable Diffusion: dtype of the pipeline


def resolve_device(device: str = "auto") -> str:
    """auto -> cuda, then mps, then cpu; anything else must be available."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    base = str(device).split(":")[0]
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
    return str(device)


def _device_type(device: Any) -> str:
    return str(device).split(":")[0]


def check_precision(precision: str | None) -> str:
    """``--precision`` of DDPM sampling: one of :data:`SAMPLING_PRECISIONS` (None is auto)."""
    precision = "auto" if precision is None else precision
    if precision not in SAMPLING_PRECISIONS:
        raise UsageError(
            f"--precision {precision!r}: choose one of {', '.join(SAMPLING_PRECISIONS)}"
        )
    return precision


def resolve_precision(precision: str | None, device: Any) -> str | None:
    """The autocast of the network while sampling: ``"bf16"`` or None (fp32).

    ``auto`` is bf16 on CUDA and fp32 elsewhere. bf16 is worth asking for on a CPU too: on a
    2-core AVX2 CPU it sampled 2-3x faster with the same accuracy and FD (docs/benchmarks.md).
    """
    precision = check_precision(precision)
    if precision == "auto":
        return "bf16" if _device_type(device) == "cuda" else None
    return "bf16" if precision == "bf16" else None


def check_dtype(dtype: str) -> str:
    """``--dtype`` of a Stable Diffusion pipeline: one of :data:`SD_DTYPES`."""
    if dtype not in SD_DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(SD_DTYPES)}")
    return dtype


def resolve_dtype(dtype: str, device: Any) -> str:
    """``auto`` -> fp16 on CUDA and MPS, fp32 on the CPU; otherwise one of :data:`PRECISIONS`."""
    if check_dtype(dtype) == "auto":
        return "fp32" if _device_type(device) == "cpu" else "fp16"
    return dtype


def torch_dtype(precision: str) -> Any:
    """The torch dtype of a name of :data:`PRECISIONS`."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
