"""Forgetting-curve plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cl_hres.reporting.metrics import average_accuracy_seen

__all__ = ["plot_comparison", "plot_forgetting_curves"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _running_average(r: list[list[float | None]]) -> list[float]:
    """Average accuracy on the experiences seen, after each row of ``R``.

    A joint run's single row was trained on every experience: its one value is the mean
    of the whole row (its final average accuracy), not its accuracy on experience 1.
    """
    if len(r) == 1:  # joint (or a one-experience stream, where both readings agree)
        return [average_accuracy_seen(r, joint=True)]
    return [average_accuracy_seen(r[: i + 1]) for i in range(len(r))]


def plot_forgetting_curves(r: list[list[float]], path: Path, title: str) -> None:
    """Accuracy on each experience over the stream, and the running average."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    t = len(r)
    steps = list(range(1, t + 1))
    if t == 1:  # joint: one evaluation after training on everything
        ax.bar(range(1, len(r[0]) + 1), r[0], color="tab:gray")
        ax.set_xlabel("test experience")
    else:
        for j in range(len(r[0])):
            ax.plot(
                steps[j:], [r[i][j] for i in range(j, t)], marker="o", lw=1, label=f"exp {j + 1}"
            )
        ax.plot(steps, _running_average(r), color="black", lw=2.5, label="average (seen)")
        ax.set_xlabel("after training experience")
        ax.set_xticks(steps)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if t > 1:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_comparison(runs: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Any:
    """Running average accuracy and first-experience accuracy of every strategy.

    A joint run is drawn as a dashed horizontal reference: its final average accuracy
    (left) and its accuracy on the first experience (right), mean over seeds.

    Returns:
        The matplotlib figure (saved to ``path`` and closed).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for name, results in runs.items():
        transfers = [r["forward_transfer"] for r in results if r.get("forward_transfer")]
        if transfers:
            per = [sum(c) / len(c) for c in zip(*(t["per_experience"] for t in transfers))]
            axes[2].plot(range(1, len(per) + 1), [100 * v for v in per], marker="o", label=name)
        curves = [_running_average(res["accuracy_matrix"]) for res in results]
        firsts = [[row[0] for row in res["accuracy_matrix"]] for res in results]
        for ax, series in ((axes[0], curves), (axes[1], firsts)):
            n = len(series[0])
            mean = [sum(s[i] for s in series) / len(series) for i in range(n)]
            steps = list(range(1, n + 1))
            if n == 1:  # joint: a horizontal reference line
                ax.axhline(mean[0], ls="--", color="gray", label=name)
            else:
                ax.plot(steps, mean, marker="o", label=name)
    axes[0].set_title("average accuracy on experiences seen")
    axes[1].set_title("accuracy on the first experience (forgetting curve)")
    axes[2].axhline(0, color="gray", lw=0.8)
    axes[2].set_title("forward transfer vs learning it alone")
    axes[2].set_xlabel("experience")
    axes[2].set_ylabel("percentage points")
    if axes[2].get_legend_handles_labels()[0]:
        axes[2].legend(fontsize=8)
    else:  # runs made with --no-fwt-reference, or a joint run alone
        axes[2].text(
            0.5,
            0.5,
            "no forward-transfer references",
            ha="center",
            va="center",
            transform=axes[2].transAxes,
            color="gray",
        )
    for ax in axes[:2]:
        ax.set_xlabel("after training experience")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_final_per_experience(
    per: dict[str, list[dict[str, Any]]], labels: list[str], path: Path, title: str
) -> Any:
    """Grouped bars: every strategy's final accuracy on each experience (mean ± std).

    Returns:
        The matplotlib figure (saved to ``path`` and closed).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) * max(1, len(per)) / 3), 4.2))
    width = 0.8 / max(1, len(per))
    for k, (name, cells) in enumerate(per.items()):
        xs = [i + (k - (len(per) - 1) / 2) * width for i in range(len(cells))]
        means = [100 * (c["mean"] or 0.0) for c in cells]
        errs = [100 * (c["std"] or 0.0) for c in cells]
        ax.bar(xs, means, width, yerr=errs, label=name, capsize=2)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("final accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
