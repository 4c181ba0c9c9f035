"""Continual-learning metrics from the accuracy matrix (definitions in docs/method.md).

``R[i][j]`` is the accuracy on test experience j after training experience i. A joint run
has a single row (trained once on everything). Cells ``j > i`` of experiences not trained
yet are None where no classifier for them exists (:func:`mask_untrained`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "accuracy_row_from_results",
    "average_accuracy_seen",
    "AVALANCHE_NAMES",
    "avalanche_stream_forgetting",
    "average_incremental_accuracy",
    "backward_transfer",
    "experience_scalars",
    "metrics_csv",
    "final_average_accuracy",
    "forgetting",
    "forward_transfer",
    "mask_untrained",
    "summarise",
]

Matrix = Sequence[Sequence[float | None]]

_EXP_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/(?:Task\d+/)?Exp(\d+)$")


def accuracy_row_from_results(results: dict[str, float], num_experiences: int) -> list[float]:
    """Per-experience test accuracies from an Avalanche ``eval`` result dict."""
    row: list[float | None] = [None] * num_experiences
    for key, value in results.items():
        m = _EXP_KEY.match(key)
        if m and int(m.group(1)) < num_experiences:
            row[int(m.group(1))] = float(value)
    if any(v is None for v in row):
        missing = [j for j, v in enumerate(row) if v is None]
        raise RuntimeError(f"evaluation returned no accuracy for experiences {missing}")
    return row  # type: ignore[return-value]


def mask_untrained(
    r: Matrix, scenario: str, head: str, *, joint: bool = False
) -> list[list[float | None]]:
    """``R`` (or its first rows) with None in the cells of experiences not trained yet.

    Such a cell (``j > i``) measures no classifier: class-incremental logits cover only
    the classes seen (accuracy 0 by construction) and a task-incremental statistics head
    does not exist before its task's data. The exception is a task-incremental linear
    head, whose untrained rows give ``R[j-1][j]`` of forward transfer; its cells are kept.
    A joint run (one row, trained on every experience at once) has none.
    """
    keep = joint or (scenario == "task" and head == "linear")
    return [[a if keep or j <= i else None for j, a in enumerate(row)] for i, row in enumerate(r)]


def average_accuracy_seen(r: Matrix, *, joint: bool = False) -> float:
    """Mean accuracy of the last row of ``r`` over the experiences trained so far.

    ``r`` holds the rows up to now. A joint run (one row, trained on every experience at
    once) has seen them all: the mean of its row, i.e. its final average accuracy.
    """
    row = r[-1]
    seen = len(row) if joint else len(r)
    return float(np.mean([float(a) for a in row[:seen]]))  # type: ignore[arg-type]


def final_average_accuracy(r: Matrix) -> float:
    """``A_T = mean_j R[T-1][j]``."""
    return float(np.mean(r[-1]))


def average_incremental_accuracy(r: Matrix) -> float | None:
    """``mean_i mean_{j<=i} R[i][j]`` (None for a single-row, joint run)."""
    if len(r) < 2:
        return None
    return float(np.mean([np.mean(r[i][: i + 1]) for i in range(len(r))]))


def forgetting(r: Matrix) -> float | None:
    """``mean_{j<T-1} (max_{i<T-1} R[i][j] − R[T-1][j])`` (literature definition)."""
    t = len(r)
    if t < 2:
        return None
    return float(
        np.mean([max(r[i][j] for i in range(j, t - 1)) - r[t - 1][j] for j in range(t - 1)])
    )


def backward_transfer(r: Matrix) -> float | None:
    """``mean_{j<T-1} (R[T-1][j] − R[j][j])``."""
    t = len(r)
    if t < 2:
        return None
    return float(np.mean([r[t - 1][j] - r[j][j] for j in range(t - 1)]))


def avalanche_stream_forgetting(r: Matrix) -> float | None:
    """Avalanche's ``StreamForgetting``: ``mean_{j<T-1} (R[j][j] − R[T-1][j])`` (= −BWT).

    Avalanche measures forgetting from the accuracy right after an experience was
    trained, not from its best accuracy as :func:`forgetting` (the literature's
    definition) does; the two agree when no later experience raised ``R[·][j]``.
    """
    bwt = backward_transfer(r)
    return None if bwt is None else -bwt


# Scalars of experience_scalars() under the name Avalanche's metrics give the same
# quantity (tests/test_metrics_and_streams.py checks the values against Avalanche's).
AVALANCHE_NAMES = {
    "cl/bwt": "StreamBWT/eval_phase/test_stream",
    "cl/avalanche_forgetting": "StreamForgetting/eval_phase/test_stream",
}


def forward_transfer(r: Matrix, baseline: Sequence[float]) -> float | None:
    """``mean_{j>0} (R[j-1][j] − b_j)``, b_j the untrained model's accuracy."""
    t = len(r)
    if t < 2 or len(baseline) != len(r[0]):
        return None
    cells = [r[j - 1][j] for j in range(1, t)]
    if any(c is None for c in cells):  # no classifier before the data: undefined
        return None
    return float(np.mean([c - baseline[j] for j, c in enumerate(cells, start=1)]))


def summarise(
    r: Matrix,
    baseline: Sequence[float] | None,
    scenario: str,
    head: str = "linear",
) -> dict[str, float | None]:
    """All metrics of a run.

    ``fwt_lopez_paz`` is None unless the stream is task-incremental and the head is
    ``linear``: a statistics head (ridge, NCM) has no classifier for a task before that
    task's data have been seen, so ``R[j-1][j]`` measures a missing head, not transfer.
    The forward transfer every table reports (``fwt`` of results.json) is the
    reference-based one of :mod:`cl_hres.reporting.forward_transfer`, defined for every
    head and scenario.
    """
    return {
        "final_average_accuracy": final_average_accuracy(r),
        "average_incremental_accuracy": average_incremental_accuracy(r),
        "forgetting": forgetting(r),
        "bwt": backward_transfer(r),
        "fwt_lopez_paz": _reported_fwt(r, baseline, scenario, head),
        # The same run in Avalanche's metric names (its forgetting is -BWT, see above).
        "avalanche": {
            AVALANCHE_NAMES["cl/bwt"]: backward_transfer(r),
            AVALANCHE_NAMES["cl/avalanche_forgetting"]: avalanche_stream_forgetting(r),
        },
    }


def _reported_fwt(
    r: Matrix, baseline: Sequence[float] | None, scenario: str, head: str
) -> float | None:
    """FWT where it is defined: task-incremental with a linear head (see :func:`summarise`)."""
    if scenario == "task" and head == "linear" and baseline:
        return forward_transfer(r, baseline)
    return None


def experience_scalars(
    r: Matrix,
    baseline: Sequence[float] | None,
    scenario: str,
    head: str = "linear",
    *,
    joint: bool = False,
) -> dict[str, float]:
    """TensorBoard scalars after the last row of ``r``, the rows up to now (``cl/`` tags).

    Accuracy per experience trained so far (unseen experiences are left out, not logged
    as 0), their average, and forgetting (the literature's and Avalanche's), BWT and FWT
    of the stream so far where defined.
    """
    row = r[-1]
    seen = len(row) if joint else len(r)
    out = {f"cl/accuracy_exp{j:03d}": float(row[j]) for j in range(seen)}  # type: ignore[arg-type]
    out["cl/average_accuracy_seen"] = average_accuracy_seen(r, joint=joint)
    for name, value in (
        ("forgetting", forgetting(r)),
        ("avalanche_forgetting", avalanche_stream_forgetting(r)),
        ("bwt", backward_transfer(r)),
        ("fwt_lopez_paz", _reported_fwt(r, baseline, scenario, head)),
    ):
        if value is not None:
            out[f"cl/{name}"] = value
    return out


def metrics_csv(
    r: Matrix,
    baseline: Sequence[float] | None,
    scenario: str,
    head: str = "linear",
    *,
    joint: bool = False,
) -> str:
    """``metrics.csv``: one row per training step, the scalars of :func:`experience_scalars`.

    Rebuilt from the rows of ``r`` at every step, so a resumed run's file holds each
    step once. Columns named as Avalanche names the same quantity (:data:`AVALANCHE_NAMES`)
    carry that name; an undefined value (e.g. forgetting after one step) is empty.
    """
    import csv
    import io

    rows = [
        experience_scalars(r[: i + 1], baseline, scenario, head, joint=joint) for i in range(len(r))
    ]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", *(AVALANCHE_NAMES.get(k, k.removeprefix("cl/")) for k in columns)])
    for step, row in enumerate(rows, start=1):
        writer.writerow([step, *(repr(row[k]) if k in row else "" for k in columns)])
    return buffer.getvalue()
