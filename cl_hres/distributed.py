"""torch.distributed helpers; every function is a no-op in a single process.

``torchrun --nproc_per_node=N -m cl_hres run ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; :func:`init_from_env` then joins the process group (NCCL on GPUs, gloo
on CPU). Training data are split by a ``DistributedSampler`` and gradients averaged by
DistributedDataParallel; evaluation and statistics passes are sharded ``rank::world``
and combined exactly (accuracy weighted by shard size; covariance and head statistics
summed with ``all_reduce``); only rank 0 writes outputs.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import Subset

__all__ = [
    "all_reduce_increment_",
    "any_rank",
    "barrier",
    "gather_accuracy",
    "init_from_env",
    "is_distributed",
    "rank",
    "shard",
    "shutdown",
    "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def init_from_env(device: str) -> str:
    """Joins the process group described by torchrun's variables; returns the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def barrier() -> None:
    """Waits for every rank (no-op alone)."""
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Leaves the process group, if one was joined.

    Without this, gloo's worker threads can still hold tensors while the interpreter is
    torn down, and the process dies with SIGABRT ("terminate called without an active
    exception") after its work is done (pytorch/pytorch#190489).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flag: torch.Tensor) -> bool:
    """True when ``flag`` (a boolean scalar) is true on any rank; a collective."""
    if not is_distributed():
        return bool(flag.item())
    flag = flag.detach().to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def shard(dataset):
    """This rank's ``rank::world`` slice of ``dataset`` (the dataset itself if alone)."""
    if not is_distributed():
        return dataset
    return Subset(dataset, list(range(rank(), len(dataset), world_size())))


def shard_size(n: int) -> int:
    """Items of an ``n``-long dataset in this rank's shard."""
    return len(range(rank(), n, world_size()))


@torch.no_grad()
def all_reduce_increment_(tensor: torch.Tensor, before: torch.Tensor) -> None:
    """Replaces ``tensor`` by ``before + Σ_ranks (tensor − before)``.

    Statistics accumulate over experiences; only this experience's increment is summed
    over ranks, so earlier totals are not multiplied by the world size.
    """
    if not is_distributed():
        return
    delta = tensor - before
    dist.all_reduce(delta)
    tensor.copy_(before + delta)


def gather_accuracy(row: list[float], sizes: list[int]) -> list[float]:
    """Combines per-shard accuracies into accuracies over the whole test sets."""
    if not is_distributed():
        return row
    local = torch.tensor([a * shard_size(n) for a, n in zip(row, sizes)], dtype=torch.float64)
    dist.all_reduce(local)
    return [float(c) / n for c, n in zip(local.tolist(), sizes)]
