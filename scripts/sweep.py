"""Hyper-parameter sweep on VALIDATION data (held out from the training split).

Runs the cartesian product of a grid with `cl_hres` in-process, never touching the test
split (`--validation` > 0 is enforced), and writes `sweep.json`, `sweep.md` and, with
`--plot-x`, a stability–plasticity plot (final accuracy and forgetting vs that option).

Example (the NSP threshold sweep in results/):
    python scripts/sweep.py --out results/sweeps/nsp-threshold \
        --grid '{"nsp_threshold": [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10]}' \
        --base '{"strategy": "hres-nsp"}' --seeds 0,1 --plot-x nsp_threshold
"""

from __future__ import annotations

import itertools
import json
import shlex
import sys
from pathlib import Path

from cl_hres import _warnings
from cl_hres.cli.options import OneLineParser
from cl_hres.errors import ConfigError
from cl_hres.fileio import atomic_write_text
from cl_hres.reporting.tables import mean_std
from cl_hres.run.config import RunConfig
from cl_hres.run.prepare import prepare
from cl_hres.run.runner import execute


def main() -> int:
    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", help="JSON: option -> list of values (required unless --replot)")
    p.add_argument("--base", default="{}", help="JSON: fixed options")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--validation", type=float, default=0.2, help="train fraction held out")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot-x", help="option on the x axis of the stability-plasticity plot")
    p.add_argument("--replot", action="store_true", help="redraw --out's plot from sweep.json")
    p.add_argument(
        "--select",
        metavar="OPTION:min|max",
        help="one-standard-error rule: per setting of the other options, pick the row with "
        "the smallest (min) or largest (max) OPTION among those whose accuracy is within "
        "one standard error (paired over seeds) of the best row",
    )
    args = p.parse_args()
    _warnings.show_as_one_line()  # cl-hres warnings as the CLI prints them
    if args.replot:
        if not (args.out / "sweep.json").is_file():
            p.error(f"--replot: no sweep.json in {args.out}")
        saved = json.loads((args.out / "sweep.json").read_text())
        select = _parse_select(args.select, saved["grid"], p) or saved.get("select")
        if select:
            one_standard_error(saved["rows"], list(saved["grid"]), *select)
            saved["select"] = list(select)
            atomic_write_text(args.out / "sweep.json", json.dumps(saved, indent=1))
        write_report(args.out, saved, select)
        x = args.plot_x or next(iter(saved["grid"]))
        plot_sweep(
            saved["rows"],
            list(saved["grid"]),
            x,
            saved["base"],
            args.out / "stability_plasticity.png",
        )
        return 0
    if not args.grid:
        p.error("--grid is required")
    if not 0 < args.validation < 1:
        p.error("--validation must be in (0, 1): sweeps never look at the test split")
    grid, base = p.json_option("--grid", args.grid), p.json_option("--base", args.base)
    if not (isinstance(grid, dict) and all(isinstance(v, list) for v in grid.values())):
        p.error("--grid must be a JSON object of option -> list of values")
    if not isinstance(base, dict):
        p.error("--base must be a JSON object of option -> value")
    select = _parse_select(args.select, grid, p)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if select and len(seeds) < 2:
        p.error("--select needs at least 2 seeds (a standard error)")
    keys = list(grid)
    plan = []  # every configuration is checked before the first run starts
    for values in itertools.product(*grid.values()):
        point = dict(zip(keys, values))
        try:
            cfgs = [
                RunConfig.from_dict(dict(base, **point, seed=seed, validation=args.validation))
                for seed in seeds
            ]
        except ConfigError as exc:
            p.error(f"grid point {point}: {exc}")
        plan.append((point, cfgs))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for point, cfgs in plan:
        runs = []
        for seed, cfg in zip(seeds, cfgs):
            name = "_".join(f"{k}={v}" for k, v in point.items()) + f"_seed{seed}"
            res = execute(prepare(cfg), args.out / "runs" / name, overwrite=True, progress=False)
            runs.append(res)
        worst = [
            max((max(h["interference"].values(), default=0) for h in r["null_space"]), default=0)
            for r in runs
            if r["null_space"]
        ]
        row = {
            "point": point,
            "final_average_accuracy": mean_std([r["final_average_accuracy"] for r in runs]),
            "forgetting": mean_std([r["forgetting"] for r in runs]),
            "max_interference": mean_std(worst) if worst else None,
            "mean_null_dim_fraction": mean_std(
                [
                    sum(
                        d / i
                        for d, i in zip(
                            r["null_space"][-1]["null_space_dims"],
                            r["null_space"][-1]["input_dims"],
                        )
                    )
                    / len(r["null_space"][-1]["input_dims"])
                    for r in runs
                    if r["null_space"]
                ]
            )
            if runs[0]["null_space"]
            else None,
        }
        rows.append(row)
        print(
            json.dumps(
                {
                    "point": point,
                    "final": row["final_average_accuracy"]["mean"],
                    "forgetting": row["forgetting"]["mean"],
                }
            ),
            flush=True,
        )
    if select:
        one_standard_error(rows, keys, *select)
    saved = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "grid": grid,
        "base": base,
        "seeds": seeds,
        "validation": args.validation,
        "select": list(select) if select else None,
        "rows": rows,
    }
    atomic_write_text(args.out / "sweep.json", json.dumps(saved, indent=1))
    write_report(args.out, saved, select)
    if args.plot_x:
        plot_sweep(rows, keys, args.plot_x, base, args.out / "stability_plasticity.png")
    return 0


def write_report(out: Path, saved: dict, select: list[str] | tuple[str, str] | None) -> None:
    """Writes ``sweep.md`` from the contents of ``sweep.json``."""
    keys, rows = list(saved["grid"]), saved["rows"]
    lines = [
        f"Command: `{saved['command']}`",
        "",
        f"Evaluated on a {saved['validation']:.0%} validation split of the training data; "
        f"seeds {saved['seeds']}.",
        "",
    ]
    if select:
        extreme = "smallest" if select[1] == "min" else "largest"
        lines += [
            f"Selected by the one-standard-error rule: the {extreme} `{select[0]}` whose "
            "accuracy is within one standard error of the best row's (difference paired "
            "over seeds); `gap` is that difference, mean ± standard error.",
            "",
        ]
    pick = " gap to best (pp, ± SE) | pick |" if select else ""
    lines.append(
        "| "
        + " | ".join(keys)
        + " | final acc (%) | forgetting (pp) | max interference | null-space fraction |"
        + pick
    )
    lines.append("|---" * (len(keys) + 4 + (2 if select else 0)) + "|")

    def f(c, k=100):
        return "–" if not c or c["mean"] is None else f"{k * c['mean']:.2f} ± {k * c['std']:.2f}"

    def gap(row):
        g = row["gap_to_best"]
        return "–" if g["mean"] is None else f"{100 * g['mean']:.2f} ± {100 * g['se']:.2f}"

    for row in rows:
        inter = row["max_interference"]
        lines.append(
            "| "
            + " | ".join(str(row["point"][k]) for k in keys)
            + f" | {f(row['final_average_accuracy'])} | {f(row['forgetting'])}"
            + f" | {'–' if not inter else format(inter['mean'], '.2e')}"
            + f" | {f(row['mean_null_dim_fraction'], 1)} |"
            + (f" {gap(row)} | {'**selected**' if row['selected'] else ''} |" if select else "")
        )
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")


def _parse_select(spec: str | None, grid: dict, parser) -> tuple[str, str] | None:
    if not spec:
        return None
    option, _, direction = spec.partition(":")
    if option not in grid or direction not in ("min", "max"):
        parser.error(
            f"--select must be OPTION:min or OPTION:max with OPTION in --grid, got {spec!r}"
        )
    return option, direction


def one_standard_error(rows: list[dict], keys: list[str], option: str, direction: str) -> None:
    """Marks ``row["selected"]`` and ``row["gap_to_best"]`` by the one-standard-error rule.

    Within each setting of the grid's other options, the best row has the highest mean
    final accuracy; every row's gap is its accuracy minus the best row's, seed by seed
    (the validation split and the initialisation are shared by a seed, so the paired
    difference removes what the settings have in common). A row qualifies when its mean
    gap is within one standard error of that gap (sample std / √seeds); of those, the one
    with the smallest (``min``) or largest (``max``) ``option`` is selected (Breiman et
    al. 1984; Hastie et al., ESL §7.10: prefer the simplest, here the most protective,
    model the data cannot tell from the best).
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row["point"][k] for k in keys if k != option), []).append(row)
    for group in groups.values():
        scored = [r for r in group if r["final_average_accuracy"]["mean"] is not None]
        best = max(scored, key=lambda r: r["final_average_accuracy"]["mean"])
        ref = best["final_average_accuracy"]["values"]
        qualified = []
        for row in group:
            # Seeds where either run has no accuracy are left out of the pairing.
            pairs = zip(row["final_average_accuracy"]["values"], ref)
            gaps = [a - b for a, b in pairs if a is not None and b is not None]
            row["gap_to_best"] = dict(mean_std(gaps), se=None)
            if not gaps:
                continue
            n = len(gaps)
            se = row["gap_to_best"]["std"] / n**0.5 if n > 1 else 0.0
            row["gap_to_best"]["se"] = se
            if row["gap_to_best"]["mean"] >= -se:
                qualified.append(row)
        pick = (min if direction == "min" else max)(qualified, key=lambda r: r["point"][option])
        for row in group:
            row["selected"] = row is pick


def plot_sweep(rows: list[dict], keys: list[str], x: str, base: dict, path: Path) -> None:
    """Final accuracy and forgetting against option ``x``, one pair of curves per setting
    of the other options in the grid (e.g. one per scenario)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in keys if k != x]
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault(tuple(row["point"][k] for k in others), []).append(row)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs_all = [row["point"][x] for row in rows]
    for i, (setting, group) in enumerate(series.items()):
        group = sorted(group, key=lambda r: r["point"][x])
        xs = [r["point"][x] for r in group]
        name = ", ".join(f"{k}={v}" for k, v in zip(others, setting))
        suffix = f" ({name})" if name else ""
        color = f"C{i}"
        for key, marker, style, label in (
            ("final_average_accuracy", "o", "-", "final accuracy (%)"),
            ("forgetting", "s", "--", "forgetting (pp)"),
        ):
            ax.errorbar(
                xs,
                [100 * (r[key]["mean"] or 0) for r in group],
                yerr=[100 * (r[key]["std"] or 0) for r in group],
                marker=marker,
                linestyle=style,
                color=color,
                label=label + suffix,
            )
    numeric = all(isinstance(v, (int, float)) for v in xs_all)
    if numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 50:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_title(f"stability–plasticity ({base.get('strategy', 'hres-nsp')}, validation)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
