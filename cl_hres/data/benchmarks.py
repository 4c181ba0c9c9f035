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

__all__ = ["BENCHMARKS", "FOLDER_LAYOUTS", "BenchmarkSpec", "FolderLayout", "load_benchmark_data"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """Defaults of a named benchmark (the published protocol where there is one)."""

    experiences: int | str
    description: str


@dataclass(frozen=True)
class FolderLayout:
    """A published PTM-CIL benchmark as LAMDA-PILOT and its successors read it.

    ``--data-root/<folder>/train/<class>/*`` and ``.../test/<class>/*`` (ImageFolder
    trees, the split the papers use), ``classes`` class folders in each; class ids follow
    the sorted folder names (PILOT's ``class_order = arange(C)``). ``domains`` > 0 splits
    the classes, in that order, into that many domains of equal size (VTAB: one
    experience per domain, in the order the data ships).
    """

    folder: str
    classes: int
    domains: int = 0


FOLDER_LAYOUTS: dict[str, FolderLayout] = {
    "imagenet-a": FolderLayout("imagenet-a", 200),
    "cub-200": FolderLayout("cub", 200),
    "objectnet": FolderLayout("objectnet", 200),
    "omnibenchmark": FolderLayout("omnibenchmark", 300),
    "vtab": FolderLayout("vtab-cil/vtab", 50, domains=5),
}

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
    # B0Inc20 (B0Inc30 for OmniBenchmark's 300 classes), VTAB B0Inc10 by domain: the
    # layouts of the EASE / MOS result tables; --initial-classes/--increment change them.
    "imagenet-a": BenchmarkSpec(10, "ImageNet-A, 200 classes, 10 experiences of 20 (PILOT layout)"),
    "cub-200": BenchmarkSpec(10, "CUB-200-2011, 200 classes, 10 experiences of 20 (PILOT layout)"),
    "objectnet": BenchmarkSpec(
        10, "ObjectNet, 200-class subset, 10 experiences of 20 (PILOT layout)"
    ),
    "omnibenchmark": BenchmarkSpec(
        10, "OmniBenchmark, 300 classes, 10 experiences of 30 (PILOT layout)"
    ),
    "vtab": BenchmarkSpec(
        "by-domain", "VTAB-CIL, 5 domains of 10 classes in their fixed order (PILOT layout)"
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
    if name in FOLDER_LAYOUTS:
        return _load_layout(name, FOLDER_LAYOUTS[name], Path(data_root), seed)
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


def _load_layout(name: str, layout: FolderLayout, data_root: Path, seed: int) -> SplitData:
    """A :class:`FolderLayout` benchmark; DataError naming the folder it expects."""
    import dataclasses

    from cl_hres.data.datasets import load_image_folder

    folder = data_root / layout.folder
    if not ((folder / "train").is_dir() and (folder / "test").is_dir()):
        raise DataError(
            f"{name} not found: expected {folder}/train/<class>/*.jpg and "
            f"{folder}/test/<class>/*.jpg ({layout.classes} class folders each, the "
            "LAMDA-PILOT download); pass --data-root"
        )
    data = load_image_folder(folder, name=name, seed=seed)
    if data.num_classes != layout.classes:
        raise DataError(
            f"{folder}/train: {data.num_classes} class folders with images, "
            f"{name} has {layout.classes}"
        )
    if not layout.domains:
        return data
    size = layout.classes // layout.domains
    names = data.train.classes
    prefixes = [names[d * size].split("_")[0] for d in range(layout.domains)]
    # Domain names from a shared "<domain>_<class>" prefix where the folders have one.
    shared = (
        all(
            n.split("_")[0] == prefixes[d]
            for d in range(layout.domains)
            for n in names[d * size : (d + 1) * size]
        )
        and len(set(prefixes)) == layout.domains
    )
    return dataclasses.replace(
        data,
        domain_of_class=[c // size for c in range(layout.classes)],
        domain_names=prefixes if shared else [f"domain{d}" for d in range(layout.domains)],
    )
