"""DataLoader settings: worker processes, pinned memory and torch threads chosen together.

One rule decides, from the device, the kind of data and the cores this process may use:

* **In-memory tensors** (``split-digits``, ``.npz`` arrays) cost almost nothing per image
  once their deterministic transform is precomputed (:mod:`cl_hres.data.batch_transforms`), so
  on the CPU ``auto`` gives them no workers: a worker would take a core from the model
  and add inter-process copies (measured on the default run, docs/costs.md).
* **PIL data** (CIFAR, image folders) decodes, resizes and augments every image in
  Python: ``auto`` gives it workers, all cores but one on a GPU machine (the GPU trains;
  the CPU feeds it) and one on the CPU (decoding overlaps the step of the model).
* **Threads**: the main process keeps the cores the workers leave (``cores - workers``,
  at least 1); each worker runs one thread (torch's own worker default). Together they
  never ask for more threads than cores: on a shared machine, OpenMP threads spinning
  for a busy core made one default run 30× slower (measured, docs/costs.md).

Workers keep running across the epochs of an experience (``persistent_workers``),
CUDA runs copy from pinned memory (``pin_memory``, with Avalanche's ``non_blocking``
copies), and every worker installs cl-hres's warning filters, also when started by
``spawn`` (the dataset is wrapped so that unpickling it imports cl-hres first).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from cl_hres.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: config checks must not need it
    import torch

__all__ = [
    "LoaderSettings",
    "WorkerSafeDataset",
    "apply_threads",
    "available_cores",
    "init_worker",
    "loader_kwargs",
    "one_pass_kwargs",
    "parse_num_workers",
    "resolve_loader_settings",
]

# More workers than this rarely pay for one GPU and multiply memory (each holds a
# prefetch queue of batches).
_MAX_WORKERS = 8


@dataclass(frozen=True)
class LoaderSettings:
    """What every DataLoader of a run is given, and the main process's torch threads.

    Attributes:
        num_workers: Worker processes per loader (0: load in the main process).
        pin_memory: Page-locked batches, so host-to-GPU copies can run asynchronously.
        persistent_workers: Keep the workers across the epochs of a loader.
        threads: torch intra-op threads of the main process.
    """

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    threads: int

    def strategy_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for an Avalanche strategy's ``train`` / ``eval`` calls.

        The strategy turns them into DataLoader arguments with :func:`loader_kwargs`.
        """
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and self.num_workers > 0,
        }

    def to_dict(self) -> dict[str, Any]:
        """The settings as recorded in results.json."""
        return asdict(self)


def one_pass_kwargs(loader: Any) -> dict[str, Any]:
    """Arguments for a one-pass loader (statistics, probes) like the run's ``loader``.

    Workers and pinning as the training loader has them; no persistence (one pass).
    """
    workers = int(getattr(loader, "num_workers", 0) or 0)
    pin = bool(getattr(loader, "pin_memory", False))
    return loader_kwargs(None, workers, pin, persistent=False)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def parse_num_workers(value: Any) -> int | str:
    """``auto`` or an integer >= 0 (from the CLI or a YAML recipe); ConfigError otherwise."""
    if value == "auto":
        return value
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(
                f"num_workers must be auto or an integer >= 0, got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"num_workers must be auto or an integer >= 0, got {value!r}")
    return value


def resolve_loader_settings(
    num_workers: int | str = "auto",
    *,
    device: str = "cpu",
    kind: str = "tensor",
    cores: int | None = None,
) -> LoaderSettings:
    """The loader settings of a run (module docstring: the rule and why).

    Args:
        num_workers: ``auto`` or a worker count.
        device: The run's device (``cpu``, ``cuda``, ``cuda:N``).
        kind: ``tensor`` (in-memory) or ``pil`` (decoded per image) data.
        cores: Cores available (default: this process's affinity).
    """
    num_workers = parse_num_workers(num_workers)
    cores = cores or available_cores()
    gpu = str(device).startswith("cuda")
    if num_workers == "auto":
        if kind == "pil":
            num_workers = min(_MAX_WORKERS, max(1, cores - 1)) if gpu else min(1, cores - 1)
        else:
            num_workers = min(2, cores - 1) if gpu else 0
    threads = max(1, cores - num_workers)
    fixed = os.environ.get("OMP_NUM_THREADS", "")
    if fixed.isdigit() and int(fixed) > 0:  # the user's choice wins (apply_threads keeps it)
        threads = int(fixed)
    return LoaderSettings(
        num_workers=num_workers,
        pin_memory=gpu,
        persistent_workers=num_workers > 0,
        threads=threads,
    )


def apply_threads(settings: LoaderSettings) -> None:
    """Sets the main process's torch intra-op threads, unless OMP_NUM_THREADS fixes them."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(settings.threads)


def init_worker(worker_id: int) -> None:
    """Runs first in every loader worker: cl-hres's warning filters, one torch thread."""
    import torch

    from cl_hres import _warnings

    _warnings.install()
    torch.set_num_threads(1)


class WorkerSafeDataset:
    """A dataset wrapper (no torch import here: config checks use this module) whose unpickling (in a ``spawn`` worker) imports cl-hres first.

    Unpickling resolves this class before the wrapped dataset, so ``cl_hres`` is imported
    (and its warning filters installed) before Avalanche's or torchvision's modules are.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        # Samplers and Avalanche read these from the loader's dataset.
        self.targets = getattr(dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]


def loader_kwargs(
    device: torch.device | str | None, num_workers: int, pin_memory: bool | None, persistent: bool
) -> dict[str, Any]:
    """``torch.utils.data.DataLoader`` arguments: workers, pinning and worker set-up.

    The one place that builds them (strategies' loaders, one-pass loaders, the bench), so
    every worker runs :func:`init_worker`.

    Args:
        device: Where batches go; decides ``pin_memory`` when that is None.
        num_workers: Worker processes (0: load in the main process).
        pin_memory: Page-locked batches; None: only for a CUDA ``device``.
        persistent: Keep the workers across the loader's passes (with workers only).
    """
    if pin_memory is None:
        import torch

        if device is None:
            raise ValueError("loader_kwargs needs a device to choose pin_memory")
        # Pinning needs a GPU (torch warns on a CPU-only machine); Avalanche's default.
        pin_memory = torch.device(device).type == "cuda"
    kwargs: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        kwargs.update(persistent_workers=persistent, worker_init_fn=init_worker)
    return kwargs
