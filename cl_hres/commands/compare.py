"""``cl-hres compare``: several strategies (and seeds) on the same stream, one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cl_hres import distributed
from cl_hres.errors import ConfigError
from cl_hres.reporting.tables import aggregate, markdown_table
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
    from cl_hres.fileio import atomic_write_text
    from cl_hres.reporting.plots import plot_comparison

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
    agg = aggregate(runs)
    summary = {
        "benchmark": first.benchmark,
        "scenario": first.scenario,
        "experiences": first.experiences,
        "seeds": seeds,
        "head": first.head,
        "strategies": agg,
    }
    if distributed.rank() != 0:
        return summary
    atomic_write_text(out / "comparison.json", json.dumps(summary, indent=1))
    table = markdown_table(agg)
    header = (
        f"{first.benchmark}, {first.scenario}-incremental, {first.experiences} experiences, "
        f"head {first.head}, seeds {','.join(map(str, seeds))}, evaluated on the "
        f"{'validation' if first.validation else 'test'} split\n\n"
    )
    atomic_write_text(out / "comparison.md", header + table)
    plot_comparison(
        runs, out / "comparison.png", f"{first.benchmark} ({first.scenario}-incremental)"
    )
    return summary
