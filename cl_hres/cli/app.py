"""The ``cl-hres`` command line: run, compare, analyze, bench.

Errors caused by input (bad option values, missing or malformed data, foreign checkpoints)
print one line on stderr and exit with status 2; nothing in ``--out`` is created or
changed by a run that fails validation or stream building. Option values are validated
before torch and Avalanche are imported, so a bad one is reported within a second.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from cl_hres import _warnings, registry
from cl_hres.cli.options import (  # noqa: F401  (BENCHMARK_HELP, _RUN_FIELDS: read by tests)
    _RUN_FIELDS,
    BENCHMARK_HELP,
    OneLineParser,
    _add_run_options,
    _HelpFormatter,
    _int_list,
    strategy_help,
)
from cl_hres.errors import ClHresError, ConfigError, Preempted

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="cl-hres",
        description="Continual learning on a frozen Vision Transformer: run, compare, "
        "analyze, bench.",
        epilog="cl-hres COMMAND --help lists the options of a command.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND"
    )
    run_p = sub.add_parser(
        "run",
        help="train one strategy on a stream (default: hres-nsp on split-digits)",
        description="Train one strategy on a class- or task-incremental stream; write\n"
        "results.json, forgetting_curves.png, TensorBoard events and checkpoints into --out.",
        formatter_class=_HelpFormatter,
    )
    _add_run_options(run_p)
    _add_compare_parser(sub)
    _add_analyze_parser(sub)
    _add_bench_parser(sub)
    return parser


def _add_compare_parser(sub: Any) -> None:
    cmp_p = sub.add_parser(
        "compare",
        help="several strategies (and seeds) on the same stream",
        description="Run several strategies and seeds on the same stream; write\n"
        "comparison.md/.json/.png and one run directory per strategy and seed.",
        formatter_class=_HelpFormatter,
    )
    cmp_p.add_argument(
        "--strategies",
        default="hres-nsp,lora,vpt,linear,joint",
        metavar="LIST",
        help=f"comma-separated names from {', '.join(strategy_help())} (default: %(default)s)",
    )
    cmp_p.add_argument(
        "--seeds",
        type=_int_list,
        default=None,
        metavar="LIST",
        help="comma-separated seeds (default: --seed)",
    )
    _add_run_options(cmp_p, with_strategy=False)


def _add_analyze_parser(sub: Any) -> None:
    ana_p = sub.add_parser(
        "analyze",
        help="null space, interference, attention entropy, collapse of a run",
        description="Measure a finished run: null space and interference per block, "
        "attention entropy and neural collapse; writes analysis.json/.md into --run.",
    )
    ana_p.add_argument(
        "--run", type=Path, required=True, metavar="DIR", help="a finished run directory"
    )
    ana_p.add_argument(
        "--other-run",
        type=Path,
        metavar="DIR",
        help="a second run (e.g. vpt) measured on the same images (default: none)",
    )
    ana_p.add_argument(
        "--images", type=int, default=256, help="test images to measure on (default: %(default)s)"
    )


def _add_bench_parser(sub: Any) -> None:
    bench_p = sub.add_parser(
        "bench",
        help="throughput, memory and NSP costs of every method",
        description="Time training and inference steps of every method on random data.",
    )
    bench_p.add_argument(
        "--config",
        choices=["tiny", "vit-s"],
        default="tiny",
        help="backbone size: tiny or vit-s (ViT-S/16 at 224) (default: %(default)s)",
    )
    bench_p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)",
    )
    bench_p.add_argument(
        "--iters", type=int, default=5, help="timed iterations, median (default: %(default)s)"
    )
    bench_p.add_argument(
        "--batch-size", type=int, help="override the configuration's batch (default: its own)"
    )
    bench_p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="bf16 autocast (CUDA) (default: off)",
    )
    bench_p.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="writes bench.json and bench.md"
    )


def _config_from_args(args: argparse.Namespace) -> Any:
    from cl_hres.run.config import (
        RESUMABLE_KEYS,
        RunConfig,
        changed_on_resume,
        with_legacy_defaults,
    )
    from cl_hres.run.recipes import load_yaml_config

    values: dict[str, Any] = load_yaml_config(args.config) if args.config else {}
    given = {dest: getattr(args, dest, None) for dest in _RUN_FIELDS}
    values.update({k: v for k, v in given.items() if v is not None})
    if getattr(args, "resume", False) and (args.out / "config.json").is_file():
        import json

        saved = with_legacy_defaults(json.loads((args.out / "config.json").read_text()))
        if changed := changed_on_resume(saved, values):
            key, old, new = changed
            raise ConfigError(
                f"--resume: {key}={new!r} differs from the run in {args.out} ({old!r})"
            )
        saved.update({k: v for k, v in values.items() if k in RESUMABLE_KEYS})
        values = saved
    return RunConfig.from_dict(values, source=str(args.config) if args.config else "options")


def _print_summary(rows: dict[str, dict[str, Any]]) -> None:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:6.2f}"

    def drift(v: float | None) -> str:
        return "–" if v is None else f"{v:.3g}"

    w = max([10, *(len(name) for name in rows)])
    print(
        f"{'strategy':<{w}} {'final acc':>9} {'avg inc':>8} {'forget':>7} {'BWT':>7} {'FWT':>7} "
        f"{'drift':>8}"
    )
    for name, r in rows.items():
        print(
            f"{name:<{w}} {pct(r['final_average_accuracy']):>9} {pct(r['average_incremental_accuracy']):>8} "
            f"{pct(r['forgetting']):>7} {pct(r['bwt']):>7} {pct(r['fwt']):>7} "
            f"{drift(r.get('final_feature_drift')):>8}"
        )


def _reports() -> bool:
    """Whether this process prints the summary: rank 0 reports for every torchrun rank."""
    from cl_hres import distributed

    return distributed.rank() == 0


def _cmd_run(args: argparse.Namespace) -> int:
    # Validate first: a bad option costs a fraction of a second, not the torch and
    # Avalanche imports (several seconds).
    config = _config_from_args(args)
    from cl_hres.run.runner import run

    results = run(
        config,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if not _reports():
        return 0
    _print_summary({results["strategy"]: results})
    t = results["timing"]
    print(
        f"throughput: {t['train_images']} training images in {t['stepping_seconds']:.1f} s "
        f"({t['train_images_per_s']:.1f} images/s); wall time {t['wall_seconds']:.1f} s"
    )
    print(f"results: {args.out / 'results.json'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    known = registry.strategy_names()
    bad = [s for s in names if s not in known]
    if bad or not names or len(set(names)) != len(names):
        raise ConfigError(
            f"--strategies must be distinct names from {', '.join(known)}; got {args.strategies!r}"
        )
    seeds = args.seeds or [config.seed]
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0, got {seeds}")
    from cl_hres.commands.compare import compare
    from cl_hres.reporting.tables import markdown_table

    summary = compare(
        config,
        names,
        seeds,
        args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
    )
    if not _reports():
        return 0
    print(markdown_table(summary["strategies"]), end="")
    print(f"comparison: {args.out / 'comparison.md'}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from cl_hres.commands.analyze import analysis_markdown, analyze_run

    if args.images < 2:
        raise ConfigError(f"--images must be at least 2, got {args.images}")
    report = analyze_run(args.run, other_run=args.other_run, images=args.images)
    print(analysis_markdown(report), end="")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from cl_hres.commands.bench import markdown, run_bench, write_bench
    from cl_hres.run.config import RunConfig

    if args.iters < 1:
        raise ConfigError(f"--iters must be a positive integer, got {args.iters}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
    device = RunConfig(device=args.device).resolve_device()
    results = run_bench(
        args.config,
        device=device,
        iters=args.iters,
        autocast=args.bf16,
        batch_size=args.batch_size,
    )
    write_bench(results, args.out)
    print(markdown(results), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cl-hres`` console script."""
    # OpenMP threads that spin while they wait made a default run 26× slower on a shared
    # 2-core machine (docs/costs.md); sleeping waits cost little. Set before torch loads
    # OpenMP (the CLI imports torch lazily); an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Scoped, so that a caller of main() (a test, a notebook) gets its warning settings back.
    with warnings.catch_warnings():
        _warnings.install()  # also done on `import cl_hres`; kept for an explicit guarantee
        _warnings.show_as_one_line()
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "run": _cmd_run,
        "compare": _cmd_compare,
        "analyze": _cmd_analyze,
        "bench": _cmd_bench,
    }
    try:
        return handlers[args.command](args)
    except ClHresError as exc:
        print(f"cl-hres: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        out = getattr(args, "out", None)
        print(
            f"cl-hres: SIGTERM: stopped after experience {exc.steps_done}, checkpointed in "
            f"{out}; continue with --resume",
            file=sys.stderr,
        )
        return 143
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        print(
            f"cl-hres: interrupted; finished experiences are checkpointed in {out}; continue with --resume",
            file=sys.stderr,
        )
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroys the torchrun process group, if a command joined one.

    Looked up in ``sys.modules`` so that commands which never touch torch (``--help``,
    config errors) do not import it here.
    """
    dist_helpers = sys.modules.get("cl_hres.distributed")
    if dist_helpers is not None:
        dist_helpers.shutdown()


if __name__ == "__main__":
    sys.exit(main())
