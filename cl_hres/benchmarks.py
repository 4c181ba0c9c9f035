"""Class- and task-incremental Avalanche streams over the datasets of :mod:`cl_hres.data`.

Unlike ``class_incremental_benchmark(num_experiences=k)``, which silently drops the
``C mod k`` leftover classes, every class is kept: the first ``C mod k`` experiences get
one class more. The class order is a permutation fixed by the seed.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cl_hres.data import SplitData, load_cifar100, load_digits_data, load_image_folder, load_npz
from cl_hres.errors import ConfigError, DataError

__all__ = ["BENCHMARKS", "BenchmarkSpec", "build_stream", "class_split", "load_benchmark_data"]


@dataclass(frozen=True)
class BenchmarkSpec:
    """Defaults of a named benchmark (the published protocol where there is one)."""

    experiences: int
    description: str


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "split-digits": BenchmarkSpec(5, "scikit-learn digits, 5 experiences of 2 classes"),
    "split-cifar100": BenchmarkSpec(10, "CIFAR-100 (torchvision), 10 experiences of 10"),
    "imagenet-r": BenchmarkSpec(
        10, "ImageNet-R from --data-root, 10 experiences of 20 (train/ + test/ split if given)"
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
    if validation and name not in ("split-digits",) and not name.endswith(".npz"):
        raise ConfigError("--validation is supported for split-digits and .npz data")
    if name == "split-digits":
        return load_digits_data(validation=validation, seed=seed)
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


def class_split(num_classes: int, experiences: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded class order and classes per experience that keep every class."""
    if not 1 <= experiences <= num_classes:
        raise ConfigError(f"cannot split {num_classes} classes into {experiences} experiences")
    order = np.random.default_rng(seed).permutation(num_classes).tolist()
    base, extra = divmod(num_classes, experiences)
    return order, [base + (1 if i < extra else 0) for i in range(experiences)]


def build_stream(
    data: SplitData,
    *,
    experiences: int,
    scenario: str = "class",
    seed: int = 0,
    transforms: tuple[Any, Any] | None = None,
):
    """An Avalanche benchmark with ``experiences`` experiences over all classes.

    Args:
        data: From :func:`load_benchmark_data`.
        experiences: Number of experiences.
        scenario: ``class`` (one task label, no task id at test) or ``task`` (task label
            = experience index, one head per task).
        seed: Fixes the class order.
        transforms: ``(train, eval)`` transforms (:func:`cl_hres.transforms.build_transforms`);
            Avalanche applies the train one in training and the eval one everywhere else.
    """
    import warnings

    from avalanche.benchmarks.scenarios.supervised import (
        class_incremental_benchmark,
        with_classes_timeline,
    )
    from avalanche.benchmarks.scenarios.task_aware import task_incremental_benchmark
    from avalanche.benchmarks.utils.classification_dataset import (
        _as_taskaware_supervised_classification_dataset as as_dataset,
    )

    from cl_hres._warnings import ClHresWarning

    if scenario not in ("class", "task"):
        raise ConfigError(f"scenario must be class or task, got {scenario!r}")
    # Avalanche needs the same classes in both splits; it would stop with a traceback
    # ("datasets must all have the same classes").
    train_classes, test_classes = (
        set(np.unique(np.asarray(getattr(ds, "targets", []))).tolist())
        for ds in (data.train, data.test)
    )
    for absent, split, other in (
        (sorted(train_classes - test_classes), "test", "training"),
        (sorted(test_classes - train_classes), "training", "test"),
    ):
        if absent:
            shown = ", ".join(map(str, absent[:10])) + (", ..." if len(absent) > 10 else "")
            raise DataError(
                f"{data.name}: the {split} split has no images of class {shown}, which the "
                f"{other} split has; every class needs images in both"
            )
    order, per_exp = class_split(data.num_classes, experiences, seed)
    if len(set(per_exp)) > 1:
        single = per_exp.count(1)
        warnings.warn(
            f"{data.num_classes} classes do not split evenly into {experiences} experiences "
            f"(classes per experience: {', '.join(map(str, per_exp))})"
            + (
                f"; {single} experience{'s' if single > 1 else ''} with a single class "
                f"leave{'' if single > 1 else 's'} the training loss nothing to separate"
                if single
                else ""
            ),
            ClHresWarning,
            stacklevel=2,
        )
    splits = {"train": data.train, "test": data.test}
    if transforms is not None:
        # What class_incremental_benchmark does to a plain dataset (task label 0), with
        # train/eval transform groups; Avalanche has no public helper that adds both.
        groups = {"train": transforms[0], "eval": transforms[1]}
        splits = {k: as_dataset(v, transform_groups=groups) for k, v in splits.items()}
    bm = class_incremental_benchmark(
        splits,
        class_order=order,
        num_classes_per_exp=per_exp,
    )
    if scenario == "task":
        bm = with_classes_timeline(task_incremental_benchmark(bm, reset_task_labels=True))
    return bm
