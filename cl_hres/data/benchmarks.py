"""The named benchmarks and the one function that loads any benchmark's data.

The table :data:`BENCHMARKS` is what ``--benchmark`` accepts besides a path, with each
benchmark's defaults and the one line ``--help`` shows; this module imports no torch at
import time, so the CLI's help and config checks stay fast.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cl_hres.errors import ConfigError, DataError

if TYPE_CHECKING:
    from cl_hres.data.datasets import SplitData

__all__ = ["BENCHMARKS", "BenchmarkSpec", "load_benchmark_data"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """Defaults of a named benchmark (the published protocol where there is one)."""

    experiences: int | str
    description: str


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "split-digits": BenchmarkSpec(5, "scikit-learn digits, 5 experiences of 2 classes"),
    "split-cifar100": BenchmarkSpec(10, "CIFAR-100 (torchvision), 10 experiences of 10"),
    "imagenet-r": BenchmarkSpec(
        10, "ImageNet-R from --data-root, 10 experiences of 20 (train/ + test/ split if given)"
    ),
    "split-domains": BenchmarkSpec(
        "by-domain",
        "6 domains of 10 classes (digits, fashion, Latin/Greek/Cyrillic/Hebrew glyphs), "
        "built offline into --data-root (docs/streams.md)",
    ),
}


def load_benchmark_data(
    name: str,
    *,
    data_root: str | Path = "data",
    validation: float = 0.0,
    seed: int = 0,
) -> SplitData:
    """Loads a named benchmark, an ``.npz`` file or an ImageFolder directory.

    Args:
        name: ``split-digits``, ``split-cifar100``, ``imagenet-r``, or a path.
        data_root: Where downloadable / local datasets live.
        validation: Fraction of the training split returned as ``test`` (for sweeps;
            supported by split-digits and .npz data).
        seed: Seed of the validation split.
    """
    from cl_hres.data.datasets import load_cifar100, load_digits_data, load_image_folder, load_npz

    if validation and name not in ("split-digits", "split-domains") and not name.endswith(".npz"):
        raise ConfigError("--validation is supported for split-digits, split-domains and .npz data")
    if name == "split-digits":
        return load_digits_data(validation=validation, seed=seed)
    if name == "split-domains":
        from cl_hres.data.domains import load_split_domains

        return load_split_domains(data_root, validation=validation, seed=seed)
    if name == "split-cifar100":
        return load_cifar100(data_root)
    if name == "imagenet-r":
        folder = Path(data_root) / "imagenet-r"
        if not folder.is_dir():
            raise DataError(
                f"ImageNet-R not found at {folder}; download imagenet-r.tar from the ImageNet-R "
                "authors' page, extract it there (imagenet-r/<class>/*.jpg, or the published "
                "imagenet-r/train/ + imagenet-r/test/ split) or pass --data-root"
            )
        return load_image_folder(folder, name="imagenet-r", seed=seed)
    path = Path(name)
    if path.suffix == ".npz":
        return load_npz(path, validation=validation, seed=seed)
    if path.is_dir():
        return load_image_folder(path, seed=seed)
    if path.exists():
        raise DataError(f"{path}: expected a .npz file or an image folder")
    close = difflib.get_close_matches(name, list(BENCHMARKS), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(
        f"unknown benchmark {name!r}{hint} (choose from {', '.join(BENCHMARKS)}, "
        "a .npz file or an image folder)"
    )
