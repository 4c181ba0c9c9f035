"""Aggregates over seeds and the markdown table of ``cl-hres compare``."""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "METRICS",
    "aggregate",
    "final_per_experience",
    "markdown_table",
    "mean_std",
    "experience_labels",
    "per_experience_table",
]

METRICS = (
    "final_average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "bwt",
    "fwt",
)
# results.json of runs saved before ``fwt`` became the reference-based figure hold the
# Lopez-Paz one under that key: tables read the reference-based figure where it is.


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation of the non-None values (None if there are none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "values": values}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Mean ± sample std over seeds of every metric, per strategy."""
    out = {}
    for name, results in runs.items():
        row = {m: mean_std([r.get(m) for r in results]) for m in METRICS}
        row["final_feature_drift"] = mean_std([r.get("final_feature_drift") for r in results])
        transfers = [r.get("forward_transfer") or {} for r in results]
        row["forward_transfer"] = mean_std([t.get("mean") for t in transfers])
        row["fwt"] = row["forward_transfer"]
        row["forward_transfer_per_experience"] = [
            mean_std(list(cells))["mean"]
            for cells in zip(*(t["per_experience"] for t in transfers if t))
        ]
        row["train_seconds"] = mean_std([r["timing"]["train_seconds"] for r in results])
        row["adapter_parameters"] = results[0]["trainable_parameters"]["adapter_total"]
        row["seeds"] = [r["seed"] for r in results]
        out[name] = row
    return out


def _fmt(cell: dict[str, Any], pct: bool = True, spec: str = ".2f") -> str:
    if cell["mean"] is None:
        return "–"
    k = 100 if pct else 1
    if len(cell["values"]) > 1:
        return f"{k * cell['mean']:{spec}} ± {k * cell['std']:{spec}}"
    return f"{k * cell['mean']:{spec}}"


def markdown_table(agg: dict[str, Any]) -> str:
    """One row per strategy; accuracies and forgetting in percentage points.

    "FWT" is forward transfer against learning alone: the mean over experiences j >= 1
    of the accuracy on j right after learning it in the stream minus that of a reference
    that learned j alone (:mod:`cl_hres.reporting.forward_transfer`; "–" when the run
    skipped the references). "old-feature drift" is the largest drift of an
    earlier experience's features at the end of the stream, in units of the spread of the
    class means (:class:`~cl_hres.avalanche.FeatureDriftPlugin`).
    """
    lines = [
        "| strategy | final acc (%) | avg incr. acc (%) | forgetting (pp) | BWT (pp) | FWT (pp) "
        "| old-feature drift (class spreads) | adapter params | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in agg.items():
        drift = row.get("final_feature_drift") or mean_std([])
        # Drift spans 0 (frozen), ~1e-7 (null space) and ~1 (sequential tuning).
        small = drift["mean"] is not None and 0 < abs(drift["mean"]) < 0.01
        lines.append(
            f"| {name} | {_fmt(row['final_average_accuracy'])} | {_fmt(row['average_incremental_accuracy'])} "
            f"| {_fmt(row['forgetting'])} | {_fmt(row['bwt'])} | {_fmt(row['fwt'])} "
            f"| {_fmt(drift, pct=False, spec='.1e' if small else '.2f')} "
            f"| {row['adapter_parameters']:,} | {_fmt(row['train_seconds'], pct=False)} |"
        )
    return "\n".join(lines) + "\n"


def final_per_experience(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict]]:
    """Mean ± std over seeds of each experience's accuracy at the end of the stream."""
    return {
        name: [mean_std(list(cells)) for cells in zip(*(r["accuracy_matrix"][-1] for r in results))]
        for name, results in runs.items()
    }


def experience_labels(results: dict[str, Any]) -> list[str]:
    """Column names: each experience's domain where the data names domains, else its index."""
    domains = results.get("experience_domains")
    n = len(results["accuracy_matrix"][-1])
    return list(domains) if domains else [f"exp {i}" for i in range(n)]


def per_experience_table(per: dict[str, list[dict]], labels: list[str]) -> str:
    """Final accuracy (%) of every experience, one row per strategy, with the minimum."""
    lines = [
        "| strategy | " + " | ".join(labels) + " | lowest |",
        "|---|" + "---|" * (len(labels) + 1),
    ]
    for name, cells in per.items():
        means = [c["mean"] for c in cells if c["mean"] is not None]
        lowest = f"{100 * min(means):.2f}" if means else "–"
        lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + f" | {lowest} |")
    return "\n".join(lines) + "\n"
