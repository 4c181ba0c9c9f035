"""``cl-hres compare``: several strategies (and seeds) on the same stream, one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cl_hres import distributed
from cl_hres.errors import ConfigError
from cl_hres.reporting.tables import (
    aggregate,
    experience_labels,
    final_per_experience,
    markdown_table,
    per_experience_table,
)
from cl_hres.run.config import RunConfig
from cl_hres.run.prepare import check_output_dir, prepare
from cl_hres.run.runner import execute, join_process_group

__all__ = ["compare"]


def compare(
    base: RunConfig,
    strategies: list[str],
    seeds: list[int],
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs every strategy × seed into ``out/<strategy>/seed<k>`` and writes the comparison."""
    join_process_group(base)
    configs = {}
    for name in strategies:
        for seed in seeds:
            configs[(name, seed)] = RunConfig.from_dict(
                dict(base.to_dict(), strategy=name, seed=seed)
            )
    if (out / "comparison.json").exists() and not (overwrite or resume):
        raise ConfigError(f"{out} already holds a comparison; pass --overwrite or --resume")
    for name, seed in configs:
        check_output_dir(out / name / f"seed{seed}", resume=False, overwrite=overwrite or resume)
    # The runs differ only in strategy and seed (every config was validated above), so
    # preparing the first one checks the data and the backbone before anything is
    # written; the others are prepared just before they run, not all held in memory.
    keys = list(configs)
    first_prep = prepare(configs[keys[0]])
    # Every rank has checked the output directories before rank 0 writes into them.
    distributed.barrier()
    first = first_prep.config
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in strategies}
    for key in keys:
        name, seed = key
        run_dir = out / name / f"seed{seed}"
        done = run_dir / "results.json"
        if resume and done.is_file():
            runs[name].append(json.loads(done.read_text()))
            continue
        prep = first_prep if key == keys[0] else prepare(configs[key])
        can_resume = resume and (run_dir / "config.json").is_file()
        runs[name].append(
            execute(
                prep,
                run_dir,
                resume=can_resume,
                overwrite=not can_resume,
                progress=progress,
                reference_cache=out,  # runs of one method family share FWT references
            )
        )
    return _write_comparison(out, runs, seeds, first)


def _write_comparison(
    out: Path, runs: dict[str, list[dict[str, Any]]], seeds: list[int], first: RunConfig
) -> dict[str, Any]:
    """``comparison.json/.md/.png`` and the per-experience figure (rank 0 writes)."""
    from cl_hres.fileio import atomic_write_text
    from cl_hres.reporting.plots import plot_comparison, plot_final_per_experience

    agg = aggregate(runs)
    per = final_per_experience(runs)
    labels = experience_labels(next(iter(runs.values()))[0])
    summary = {
        "benchmark": first.benchmark,
        "scenario": first.scenario,
        "experiences": first.experiences,
        "experience_labels": labels,
        "seeds": seeds,
        "heads": {name: results[0]["config"]["head"] for name, results in runs.items()},
        "strategies": agg,
        "final_per_experience": per,
    }
    if distributed.rank() != 0:
        return summary
    atomic_write_text(out / "comparison.json", json.dumps(summary, indent=1))
    header = (
        f"{first.benchmark}, {first.scenario}-incremental, {len(labels)} experiences, "
        f"seeds {','.join(map(str, seeds))}, evaluated on the "
        f"{'validation' if first.validation else 'test'} split\n\n"
    )
    per_table = per_experience_table(per, labels)
    atomic_write_text(
        out / "comparison.md",
        header + markdown_table(agg) + "\nFinal accuracy per experience (%):\n\n" + per_table,
    )
    title = f"{first.benchmark} ({first.scenario}-incremental)"
    plot_comparison(runs, out / "comparison.png", title)
    plot_final_per_experience(per, labels, out / "comparison_per_experience.png", title)
    return summary
