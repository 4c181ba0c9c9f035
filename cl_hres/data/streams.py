"""Class- and task-incremental Avalanche streams over the datasets of :mod:`cl_hres.data.datasets`.

Unlike ``class_incremental_benchmark(num_experiences=k)``, which silently drops the
``C mod k`` leftover classes, every class is kept: the first ``C mod k`` experiences get
one class more. The class order is a permutation fixed by the seed unless given
(:mod:`cl_hres.data.class_order`).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from cl_hres._warnings import ClHresWarning
from cl_hres.data.class_order import BY_DOMAIN, domain_experiences, experience_sizes
from cl_hres.data.class_order import class_order as resolve_class_order
from cl_hres.data.datasets import SplitData
from cl_hres.errors import ConfigError, DataError

__all__ = ["build_stream", "stream_layout"]


def stream_layout(
    data: SplitData,
    *,
    experiences: int | str | None = None,
    seed: int = 0,
    class_order: Any = "seeded",
    initial_classes: int | None = None,
    increment: int | None = None,
) -> tuple[list[int], list[int]]:
    """The class order and classes per experience of a stream over ``data``.

    Args:
        data: The benchmark's data.
        experiences: Number of experiences, or ``by-domain`` (one per domain of
            ``data.domain_of_class``, in file order); None: 5, or fewer classes.
        seed: Seed of the ``seeded`` order.
        class_order: See :func:`cl_hres.data.class_order.class_order`.
        initial_classes: Classes of the first experience (B``N``).
        increment: Classes of each later experience (Inc``M``).

    Raises:
        ConfigError: the order or the sizes do not fit the data.
    """
    order = resolve_class_order(class_order, data.num_classes, seed)
    if experiences == BY_DOMAIN:
        if data.domain_of_class is None:
            raise ConfigError(
                f"experiences by-domain needs data that names each class's domain "
                f"(domain_of_class); {data.name} does not"
            )
        if initial_classes is not None or increment is not None:
            raise ConfigError("experiences by-domain takes no initial_classes or increment")
        return domain_experiences(order, data.domain_of_class)
    if isinstance(experiences, str):
        raise ConfigError(
            f"experiences must be a positive integer or by-domain, got {experiences!r}"
        )
    return order, experience_sizes(data.num_classes, experiences, initial_classes, increment)


def _check_split_classes(data: SplitData) -> None:
    """Raises DataError unless both splits hold the same classes."""
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


def _warn_uneven(num_classes: int, per_exp: list[int]) -> None:
    """Warns when an equal split into experiences leaves them with unequal classes."""
    if len(set(per_exp)) <= 1:
        return
    single = per_exp.count(1)
    warnings.warn(
        f"{num_classes} classes do not split evenly into {len(per_exp)} experiences "
        f"(classes per experience: {', '.join(map(str, per_exp))})"
        + (
            f"; {single} experience{'s' if single > 1 else ''} with a single class "
            f"leave{'' if single > 1 else 's'} the training loss nothing to separate"
            if single
            else ""
        ),
        ClHresWarning,
        stacklevel=3,
    )


def build_stream(
    data: SplitData,
    *,
    experiences: int | str | None = None,
    scenario: str = "class",
    seed: int = 0,
    transforms: tuple[Any, Any] | None = None,
    class_order: Any = "seeded",
    initial_classes: int | None = None,
    increment: int | None = None,
):
    """An Avalanche benchmark over all classes, laid out by :func:`stream_layout`.

    Args:
        data: From :func:`load_benchmark_data`.
        experiences: Number of experiences, or ``by-domain``.
        scenario: ``class`` (one task label, no task id at test) or ``task`` (task label
            = experience index, one head per task).
        seed: Fixes the ``seeded`` class order.
        transforms: ``(train, eval)`` transforms (:func:`cl_hres.data.transforms.build_transforms`);
            Avalanche applies the train one in training and the eval one everywhere else.
        class_order: ``seeded``, ``fixed``, a list or a file (:func:`stream_layout`).
        initial_classes: Classes of the first experience.
        increment: Classes of each later experience.
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
    _check_split_classes(data)
    order, per_exp = stream_layout(
        data,
        experiences=experiences,
        seed=seed,
        class_order=class_order,
        initial_classes=initial_classes,
        increment=increment,
    )
    if initial_classes is None and increment is None and experiences != BY_DOMAIN:
        _warn_uneven(data.num_classes, per_exp)
    splits = {"train": data.train, "test": data.test}
    if transforms is not None:
        # What class_incremental_benchmark does to a plain dataset (task label 0), with
        # train/eval transform groups; Avalanche has no public helper that adds both.
        groups = {"train": transforms[0], "eval": transforms[1]}
        splits = {k: as_dataset(v, transform_groups=groups) for k, v in splits.items()}
    bm = class_incremental_benchmark(splits, class_order=order, num_classes_per_exp=per_exp)
    if scenario == "task":
        bm = with_classes_timeline(task_incremental_benchmark(bm, reset_task_labels=True))
    return bm
