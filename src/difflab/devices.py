"""Devices and precision: the one place that turns ``--device``, ``--precision`` and ``--dtype``
into torch terms.

``auto`` picks CUDA, then MPS, then the CPU; an explicit device must be present. Number
formats have one vocabulary across the lab, :data:`PRECISIONS` (``fp32``, ``bf16``, ``fp16``):
DDPM sampling takes ``auto``, ``fp32`` or ``bf16`` (bf16 autocast; ``auto`` is bf16 on CUDA,
on a CPU whichever of the two measured faster on it, :func:`cpu_sampling_precision`, and fp32
on MPS), a Stable Diffusion pipeline ``auto``, ``fp16``, ``bf16`` or ``fp32`` (the
weights' dtype; ``auto`` is fp16 on CUDA/MPS, fp32 on the CPU). DDPM training's
``train.mixed_precision=auto`` is bf16 on CUDA and, on a CPU, whichever measured faster for a
training step there (:func:`auto_mixed_precision`). torch is imported only when a device is
resolved, so the options that name these values stay cheap to import.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

from difflab.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")  # the one vocabulary of number formats
SAMPLING_PRECISIONS = ("auto", "fp32", "bf16")  # DDPM sampling: autocast of the network
SD_DTYPES = ("auto", "fp16", "bf16", "fp32")  # Stable Diffusion: dtype of the pipeline
CPU_PRECISION_ENV = "DIFFLAB_CPU_PRECISION"  # fp32 or bf16: what auto means on a CPU, unmeasured
BF16_MIN_SPEEDUP = 1.25  # bf16 is auto's choice on a CPU only when at least this much faster


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


def fused_optimizer(device: Any) -> dict[str, bool]:
    """The keyword that makes torch's Adam and AdamW one fused kernel over all parameters on
    ``device`` (CUDA and the CPU have it; measured faster than the per-parameter loop)."""
    return {"fused": True} if _device_type(device) in ("cuda", "cpu") else {}


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

    ``auto`` is bf16 on CUDA, fp32 on MPS, and on a CPU what :func:`cpu_sampling_precision`
    measured faster on it (on a 2-core AVX2 CPU without AVX-512-BF16, bf16 sampled about 2x
    faster with the same accuracy and FD: docs/benchmarks.md). The choice is one per machine,
    never per call, so an image's pixels do not depend on how many are drawn with it.
    """
    precision = check_precision(precision)
    if precision == "auto":
        kind = _device_type(device)
        if kind == "cuda":
            return "bf16"
        return "bf16" if kind == "cpu" and cpu_sampling_precision() == "bf16" else None
    return "bf16" if precision == "bf16" else None


def auto_mixed_precision(device: str) -> str:
    """What ``train.mixed_precision=auto`` trains with on ``device``, in accelerate's terms
    (``"bf16"`` or ``"no"``): bf16 on CUDA, fp32 on MPS, and on a CPU what
    :func:`cpu_training_precision` measured faster there. Processes started by a launcher
    train in fp32 on a CPU unless ``$DIFFLAB_CPU_PRECISION`` pins bf16, so that no two ranks
    can measure differently."""
    kind = _device_type(device)
    if kind == "cuda":
        return "bf16"
    if kind != "cpu":
        return "no"
    from difflab.distributed import launched_world_size

    if launched_world_size() > 1 and not os.environ.get(CPU_PRECISION_ENV):
        return "no"  # unpinned under a launcher: no rank measures
    return "bf16" if cpu_training_precision() == "bf16" else "no"


def _cpu_key(cpuinfo: str | None = None) -> str:
    """This CPU and software, as the choice depends on them: model, bf16 instructions, cores,
    torch, threads. Virtual machines often name only the vendor ("AMD EPYC"), so the
    instruction sets tell CPUs of one name apart. ``cpuinfo``: /proc/cpuinfo's text."""
    import torch

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    first = cpuinfo.split("\n\n")[0].splitlines()  # the first processor's entry
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first)}
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = "+".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no bf16 flags"
    cap = torch.backends.cpu.get_cpu_capability()
    return (f"{name} | {cap}, {isa} | {os.cpu_count()} CPUs | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads")  # fmt: skip


def measure_bf16_speedup(batch: int = 200, repeats: int = 3, training: bool = False) -> float:
    """fp32 time / bf16-autocast time of one pass, on the CPU, of a network shaped like the
    ``quick`` preset's U-Net on ``batch`` 28x28 images (2x2 patches: 14x14 with 32 channels,
    then 7x7 with 64; random weights): best of ``repeats`` each, after a warm-up. A forward
    pass, or with ``training`` a forward and backward pass (the work of a training step).
    About a second on a 2-core CPU."""
    import torch
    from torch import nn

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(0)
        net = nn.Sequential(
            *block(4, 32), *block(32, 32), nn.Conv2d(32, 64, 3, stride=2, padding=1),
            *block(64, 64), *block(64, 64), nn.Upsample(scale_factor=2),
            *block(64, 32), nn.Conv2d(32, 4, 3, padding=1),
        ).train(training)  # fmt: skip
        x = torch.randn(batch, 4, 14, 14)

    def one_pass(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        if training:
            out.float().square().mean().backward()

    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode(not training):
        for _ in range(repeats + 1):  # the two alternate, so a change of load hits both
            for bf16 in (False, True):
                start = time.perf_counter()
                one_pass(bf16)
                times[bf16].append(time.perf_counter() - start)
    return min(times[False][1:]) / min(times[True][1:])


@cache
def cpu_sampling_precision() -> str:
    """``fp32`` or ``bf16``: what ``auto`` samples with on this CPU.

    ``$DIFFLAB_CPU_PRECISION`` pins it; otherwise bf16 when :func:`measure_bf16_speedup`
    found it at least :data:`BF16_MIN_SPEEDUP` times faster here. The measurement is made
    once per CPU model, core count, torch version and thread count, and kept in
    ``$DIFFLAB_CACHE/cpu-precision.json`` (``~/.cache/difflab`` by default) with its figures.
    """
    return _cpu_choice("sampling")


@cache
def cpu_training_precision() -> str:
    """``fp32`` or ``bf16``: what ``train.mixed_precision=auto`` trains with on this CPU.

    As :func:`cpu_sampling_precision`, from a forward and backward pass at the ``quick``
    preset's batch. At a fixed budget a bf16 step that much faster buys more training than
    its rounding costs (docs/benchmarks.md). Kept under ``"training"`` in the same entry.
    """
    return _cpu_choice("training")


def _cpu_choice(task: str) -> str:
    """The measured (or pinned, or cached) CPU precision of ``task``: sampling or training."""
    pinned = os.environ.get(CPU_PRECISION_ENV)
    if pinned:  # set and not empty (an empty value is unset, as for $DIFFLAB_CACHE)
        if pinned not in ("fp32", "bf16"):
            raise UsageError(f"{CPU_PRECISION_ENV}={pinned!r}: choose fp32 or bf16")
        return pinned
    from difflab.files import cache_base, write_json

    path, key = cache_base() / "cpu-precision.json", _cpu_key()
    try:
        known = json.loads(path.read_text())  # other machines' entries are kept
    except (OSError, ValueError):  # none yet, unreadable, not UTF-8 or not JSON
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(key) if isinstance(known.get(key), dict) else {}
    # sampling's figures sit at the top of a machine's entry, training's under "training"
    found = entry if task == "sampling" else entry.get("training")
    if isinstance(found, dict) and found.get("choice") in ("fp32", "bf16"):
        return found["choice"]
    if task == "training":
        speedup = measure_bf16_speedup(batch=32, repeats=8, training=True)
    else:
        speedup = measure_bf16_speedup()
    choice = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    figures = {"choice": choice, "bf16_speedup": round(speedup, 3),
               "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    known[key] = {**entry, **figures} if task == "sampling" else {**entry, "training": figures}
    where = f"kept in {path}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, known)
    except OSError as e:  # a read-only home: measured again next time
        where = f"not kept: {path} cannot be written ({type(e).__name__}), so the next command measures again"
    print(f"{task} precision on this CPU: {choice} (bf16 measured {speedup:.2f}x fp32's speed; "
          f"{where})", file=sys.stderr, flush=True)  # fmt: skip
    return choice


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
