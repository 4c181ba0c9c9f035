"""Continual-learning metrics from the accuracy matrix (definitions in method.md).

``R[i][j]`` is the accuracy on test experience j after training experience i. A joint run
has a single row (trained once on everything).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "accuracy_row_from_results",
    "average_incremental_accuracy",
    "backward_transfer",
    "final_average_accuracy",
    "forgetting",
    "forward_transfer",
    "summarise",
]

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


def final_average_accuracy(r: Sequence[Sequence[float]]) -> float:
    """``A_T = mean_j R[T-1][j]``."""
    return float(np.mean(r[-1]))


def average_incremental_accuracy(r: Sequence[Sequence[float]]) -> float | None:
    """``mean_i mean_{j<=i} R[i][j]`` (None for a single-row, joint run)."""
    if len(r) < 2:
        return None
    return float(np.mean([np.mean(r[i][: i + 1]) for i in range(len(r))]))


def forgetting(r: Sequence[Sequence[float]]) -> float | None:
    """``mean_{j<T-1} (max_{i<T-1} R[i][j] − R[T-1][j])`` (literature definition)."""
    t = len(r)
    if t < 2:
        return None
    return float(
        np.mean([max(r[i][j] for i in range(j, t - 1)) - r[t - 1][j] for j in range(t - 1)])
    )


def backward_transfer(r: Sequence[Sequence[float]]) -> float | None:
    """``mean_{j<T-1} (R[T-1][j] − R[j][j])``."""
    t = len(r)
    if t < 2:
        return None
    return float(np.mean([r[t - 1][j] - r[j][j] for j in range(t - 1)]))


def forward_transfer(r: Sequence[Sequence[float]], baseline: Sequence[float]) -> float | None:
    """``mean_{j>0} (R[j-1][j] − b_j)``, b_j the untrained model's accuracy."""
    t = len(r)
    if t < 2 or len(baseline) != len(r[0]):
        return None
    return float(np.mean([r[j - 1][j] - baseline[j] for j in range(1, t)]))


def summarise(
    r: Sequence[Sequence[float]],
    baseline: Sequence[float] | None,
    scenario: str,
    head: str = "linear",
) -> dict[str, float | None]:
    """All metrics of a run.

    ``fwt`` is None unless the stream is task-incremental and the head is ``linear``: a
    statistics head (ridge, NCM) has no classifier for a task before that task's data
    have been seen, so ``R[j-1][j]`` measures a missing head, not transfer.
    """
    return {
        "final_average_accuracy": final_average_accuracy(r),
        "average_incremental_accuracy": average_incremental_accuracy(r),
        "forgetting": forgetting(r),
        "bwt": backward_transfer(r),
        "fwt": forward_transfer(r, baseline)
        if scenario == "task" and head == "linear" and baseline
        else None,
    }
