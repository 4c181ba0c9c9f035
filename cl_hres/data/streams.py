"""Class- and task-incremental Avalanche streams over the datasets of :mod:`cl_hres.data.datasets`.

Unlike ``class_incremental_benchmark(num_experiences=k)``, which silently drops the
``C mod k`` leftover classes, every class is kept: the first ``C mod k`` experiences get
one class more. The class order is a permutation fixed by the seed.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from cl_hres._warnings import ClHresWarning
from cl_hres.data.datasets import SplitData
from cl_hres.errors import ConfigError, DataError

__all__ = ["build_stream", "class_split"]


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
        transforms: ``(train, eval)`` transforms (:func:`cl_hres.data.transforms.build_transforms`);
            Avalanche applies the train one in training and the eval one everywhere else.
    """
    from avalanche.benchmarks.scenarios.supervised import (
        class_incremental_benchmark,
        with_classes_timeline,
    )
    from avalanche.benchmarks.scenarios.task_aware import task_incremental_benchmark
    from avalanche.benchmarks.utils.classification_dataset import (
        _as_taskaware_supervised_classification_dataset as as_dataset,
    )

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
