"""Several processes, one run: the parts of data-parallel training that know the world size.

``torchrun --nproc_per_node N -m difflab train ...`` (or ``accelerate launch``) starts N
processes ("ranks"); accelerate joins them into one process group (gloo on the CPU, NCCL on
GPUs) and wraps the model in DistributedDataParallel, which averages the gradients. Every
rank draws the same global batch and the same per-step noise, then works on its own
contiguous share of the rows (:func:`shard`), so with a mean-reduced loss over equal shares
the averaged gradient is the full-batch gradient and N processes follow the one-process run
up to floating-point rounding. What depends on one rank's clock (when a time budget ends,
the learning rate that follows it) is decided by rank 0 and broadcast
(:func:`from_main_process`), so every rank takes the same steps with the same settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from difflab.errors import UsageError

if TYPE_CHECKING:
    from accelerate import PartialState

T = TypeVar("T")


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, accelerate, Slurm via torchrun) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in rank 0, and in a process started without a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def check_device(device: str, world: int) -> None:
    """Several processes need ``cpu`` or ``cuda`` (each process takes its local rank's GPU)."""
    if world > 1 and device not in ("cpu", "cuda"):
        raise UsageError(
            f"--device {device}: with {world} processes use cpu, cuda or auto "
            "(each process takes the GPU of its local rank)"
        )


def check_batch_size(batch_size: int, world: int) -> None:
    """The global batch must split into equal shares, one per process."""
    if batch_size % world:
        lower, upper = batch_size // world * world, (batch_size // world + 1) * world
        hint = f"{lower} or {upper}" if lower else str(upper)
        raise UsageError(
            f"train.batch_size={batch_size}: must be divisible by the {world} processes "
            f"(e.g. --batch-size {hint})"
        )


def shard(batch_size: int, rank: int, world: int) -> slice:
    """The rows of a global batch that ``rank`` of ``world`` works on (contiguous, equal)."""
    n = batch_size // world
    return slice(rank * n, (rank + 1) * n)


def from_main_process(values: Sequence[float], device: torch.device, world: int) -> list[float]:
    """``values`` as rank 0 has them, on every rank (no communication in one process)."""
    if world == 1:
        return [float(v) for v in values]
    from accelerate.utils import broadcast

    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    return broadcast(tensor, from_process=0).tolist()


def mean_over_processes(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a scalar over all ranks; NaN or Inf on any rank makes it non-finite on all."""
    if world == 1:
        return value.detach()
    from accelerate.utils import reduce

    return reduce(value.detach().float(), reduction="mean")


def shutdown() -> None:
    """Leave the process group (if any) before the process exits, as NCCL asks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def process_state(device: str = "cpu") -> PartialState | None:
    """accelerate's ``PartialState`` when a launcher started several processes, else None.

    Joins the process group (gloo for ``--device cpu``, NCCL on GPUs); work that is split by
    items rather than by batch rows (sweep cells) uses it with ``split_between_processes``.
    """
    if launched_world_size() <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=str(device) == "cpu")


def barrier(state) -> None:
    """Wait until every process of ``state`` gets here (nothing to wait for alone)."""
    if state is not None and state.num_processes > 1:
        state.wait_for_everyone()


def my_share(state: PartialState | None, items: list[T], cost: Callable[[T], float]) -> list[T]:
    """This process's items, balanced by ``cost``, kept in their original order.

    accelerate's ``split_between_processes`` hands out contiguous, equally long chunks;
    sweep cells are ordered by step count, so contiguous chunks would give the last process
    the expensive cells. The items are therefore dealt out first (largest cost first, in a
    snake order) and laid out so that each process's chunk is its deal.
    """
    if state is None or state.num_processes == 1 or not items:
        return list(items)
    k = state.num_processes
    order = sorted(range(len(items)), key=lambda i: -cost(items[i]))
    deals: list[list[int]] = [[] for _ in range(k)]
    for n, i in enumerate(order):
        lap, pos = divmod(n, k)
        deals[pos if lap % 2 == 0 else k - 1 - pos].append(i)
    deals.sort(key=len, reverse=True)  # accelerate gives the extra items to the first ranks
    laid_out = [items[i] for deal in deals for i in sorted(deal)]
    with state.split_between_processes(laid_out) as mine:
        return list(mine)
