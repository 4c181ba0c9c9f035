"""torch.distributed helpers; every function is a no-op in a single process.

``torchrun --nproc_per_node=N -m cl_hres run ...`` sets ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK``; :func:`init_from_env` then joins the process group (NCCL for CUDA tensors
and gloo for CPU tensors on GPUs, gloo on CPU). Training data are split by a
``DistributedSampler`` and gradients averaged by DistributedDataParallel; evaluation and
statistics passes are sharded ``rank::world`` and combined exactly (accuracy weighted by
shard size; covariance and head statistics summed with ``all_reduce``); only rank 0 writes
outputs. Every collective goes through :func:`all_reduce_`, which hands the backend a
tensor on a device it accepts (NCCL rejects CPU tensors).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import Subset

__all__ = [
    "all_reduce_",
    "all_reduce_increment_",
    "any_rank",
    "collective_device",
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
    """Number of processes in the group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def init_from_env(device: str) -> str:
    """Joins the process group described by torchrun's variables; returns the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    # NCCL for the model's CUDA tensors and gloo for any CPU tensor, so no collective can
    # fail on a device the backend rejects.
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
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


# Device type each single-device backend accepts; "cpu:gloo,cuda:nccl" names its own.
_BACKEND_DEVICE = {"nccl": "cuda", "gloo": "cpu", "mpi": "cpu", "xccl": "xpu"}


def _accepted_device_types() -> set[str] | None:
    backend = str(dist.get_backend())
    if ":" in backend:
        return {part.split(":")[0] for part in backend.split(",")}
    kind = _BACKEND_DEVICE.get(backend)
    return {kind} if kind else None  # an unknown backend: trust the caller's device


def collective_device(preferred: torch.device | str | None = None) -> torch.device:
    """A device whose tensors the process group's backend accepts, ``preferred`` if it can.

    Only meaningful inside a process group.
    """
    preferred = torch.device(preferred or "cpu")
    accepted = _accepted_device_types()
    if accepted is None or preferred.type in accepted:
        return preferred
    if "cuda" in accepted:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(sorted(accepted)[0])


@torch.no_grad()
def all_reduce_(tensor: torch.Tensor, op: dist.ReduceOp | None = None) -> None:
    """In-place ``all_reduce`` (sum by default) on a device the backend accepts (no-op alone).

    A tensor on another device is reduced through a copy on an accepted one.
    """
    if not is_distributed():
        return
    op = dist.ReduceOp.SUM if op is None else op
    target = collective_device(tensor.device)
    if target == tensor.device:
        dist.all_reduce(tensor, op=op)
        return
    buf = tensor.to(target)
    dist.all_reduce(buf, op=op)
    tensor.copy_(buf)


def any_rank(flag: torch.Tensor) -> bool:
    """True when ``flag`` (a boolean scalar) is true on any rank; a collective."""
    if not is_distributed():
        return bool(flag.item())
    flag = flag.detach().to(torch.int32).reshape(1)
    all_reduce_(flag, op=dist.ReduceOp.MAX)
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
    all_reduce_(delta)
    tensor.copy_(before + delta)


def gather_accuracy(row: list[float], sizes: list[int]) -> list[float]:
    """Combines per-shard accuracies into accuracies over the whole test sets."""
    if not is_distributed():
        return row
    local = torch.tensor(
        [a * shard_size(n) for a, n in zip(row, sizes)],
        dtype=torch.float64,
        device=collective_device(),
    )
    all_reduce_(local)
    return [float(c) / n for c, n in zip(local.tolist(), sizes)]
