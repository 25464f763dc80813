"""torch.distributed helpers: training and batch inference split across processes (torchrun), as MONAI does.

Outside a process group every helper is the identity, so the same code runs in one process.
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_environment() -> bool:
    """Join the process group that torchrun describes in the environment (``WORLD_SIZE`` > 1): NCCL with one
    GPU per process (``LOCAL_RANK``) when CUDA is there, gloo on CPUs. Returns whether this is a distributed run."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (every ``world_size``-th, from its rank)."""
    return list(items)[rank() :: world_size()]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``tensor`` along dim 0 (row counts may differ), in rank order."""
    if not is_distributed():
        return tensor
    device = _comm_device()
    count = torch.tensor([tensor.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)]).to(tensor.device)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes, in place."""
    if is_distributed():
        buffer = tensor.to(_comm_device())
        dist.all_reduce(buffer)
        tensor.copy_(buffer)
    return tensor


def min_over_processes(value: int) -> int:
    """The smallest ``value`` of all processes (e.g. a common number of steps, so collectives stay paired)."""
    if not is_distributed():
        return value
    buffer = torch.tensor([value], device=_comm_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.MIN)
    return int(buffer.item())


def average_gradients(parameters) -> None:
    """Average the gradients of ``parameters`` over processes (what DistributedDataParallel does after backward)."""
    if not is_distributed():
        return
    n = world_size()
    for p in parameters:
        if p.grad is not None:
            all_reduce_sum_(p.grad).div_(n)


def optimizer_step(loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer], parameters) -> None:
    """One training step: clear the gradients, back-propagate ``loss``, average the gradients of ``parameters``
    over processes (as DistributedDataParallel; nothing to do in one process), step every optimiser."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(parameters)
    for optimizer in optimizers:
        optimizer.step()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def average_batchnorm_statistics(module: torch.nn.Module) -> None:
    """Average every BatchNorm's running mean and variance over processes (no-op in one process), so each rank
    saves the same network."""
    n = world_size()
    if n == 1:
        return
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            all_reduce_sum_(layer.running_mean).div_(n)
            all_reduce_sum_(layer.running_var).div_(n)
