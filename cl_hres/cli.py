"""``cl-hres`` command line: run, compare, analyze, bench.

Errors caused by input (bad option values, missing or malformed data, foreign checkpoints)
print one line on stderr and exit with status 2; nothing in ``--out`` is created or
changed by a run that fails validation.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from cl_hres.errors import ClHresError, ConfigError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _ridge(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


# Run options: (flag, RunConfig field, type). Every default lives in RunConfig.
_RUN_OPTIONS: list[tuple[str, str, Any]] = [
    ("--benchmark", "benchmark", str),
    ("--strategy", "strategy", str),
    ("--scenario", "scenario", str),
    ("--experiences", "experiences", int),
    ("--backbone", "backbone", str),
    ("--weights", "weights", str),
    ("--img-size", "img_size", int),
    ("--epochs", "epochs", int),
    ("--batch-size", "batch_size", int),
    ("--eval-batch-size", "eval_batch_size", int),
    ("--lr", "lr", float),
    ("--weight-decay", "weight_decay", float),
    ("--seed", "seed", int),
    ("--device", "device", str),
    ("--data-root", "data_root", str),
    ("--head", "head", str),
    ("--ridge", "ridge", _ridge),
    ("--ridge-projection", "ridge_projection", int),
    ("--rank", "rank", int),
    ("--scale", "scale", float),
    ("--nsp-rule", "nsp_rule", str),
    ("--nsp-threshold", "nsp_threshold", float),
    ("--nsp-eta", "nsp_eta", float),
    ("--lora-rank", "lora_rank", int),
    ("--lora-alpha", "lora_alpha", float),
    ("--lora-targets", "lora_targets", str),
    ("--vpt-length", "vpt_length", int),
    ("--vpt-deep", "vpt_deep", _bool),
    ("--validation", "validation", float),
]


def _help(field_name: str) -> str:
    from cl_hres.run_config import RunConfig

    f = {f.name: f for f in dataclasses.fields(RunConfig)}[field_name]
    return f"{f.metadata.get('help', '')} (default: {f.default})"


def _add_run_options(p: argparse.ArgumentParser, *, with_strategy: bool = True) -> None:
    for flag, dest, typ in _RUN_OPTIONS:
        if dest == "strategy" and not with_strategy:
            continue
        p.add_argument(flag, dest=dest, type=typ, default=None, help=_help(dest))
    p.add_argument(
        "--pretrained",
        dest="pretrained",
        action="store_true",
        default=None,
        help=_help("pretrained"),
    )
    p.add_argument("--bf16", dest="bf16", action="store_true", default=None, help=_help("bf16"))
    p.add_argument("--config", type=Path, help="YAML run recipe; command-line options override it")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument(
        "--resume", action="store_true", help="continue after the last finished experience"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cl-hres", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run_p = sub.add_parser(
        "run", help="train one strategy on a stream (default: hres-nsp on split-digits)"
    )
    _add_run_options(run_p)
    cmp_p = sub.add_parser("compare", help="several strategies (and seeds) on the same stream")
    cmp_p.add_argument(
        "--strategies", default="hres-nsp,lora,vpt,linear,joint", help="comma-separated names"
    )
    cmp_p.add_argument(
        "--seeds", type=_int_list, default=None, help="comma-separated seeds (default: --seed)"
    )
    _add_run_options(cmp_p, with_strategy=False)
    ana_p = sub.add_parser(
        "analyze", help="null space, interference, attention entropy, collapse of a run"
    )
    ana_p.add_argument("--run", type=Path, required=True, help="a finished run directory")
    ana_p.add_argument(
        "--other-run", type=Path, help="a second run (e.g. vpt) measured on the same images"
    )
    ana_p.add_argument("--images", type=int, default=256, help="test images to measure on")
    bench_p = sub.add_parser("bench", help="throughput, memory and NSP costs of every method")
    bench_p.add_argument(
        "--config", choices=["tiny", "vit-s"], default="tiny", help="backbone size"
    )
    bench_p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    bench_p.add_argument("--iters", type=int, default=5, help="timed iterations (median)")
    bench_p.add_argument("--batch-size", type=int, help="override the configuration's batch")
    bench_p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    bench_p.add_argument("--out", type=Path, required=True, help="writes bench.json and bench.md")
    return parser


def _config_from_args(args: argparse.Namespace) -> Any:
    from cl_hres.run_config import RunConfig, load_yaml_config

    values: dict[str, Any] = load_yaml_config(args.config) if args.config else {}
    given = {dest: getattr(args, dest, None) for _, dest, _ in _RUN_OPTIONS}
    given["pretrained"] = args.pretrained
    given["bf16"] = args.bf16
    values.update({k: v for k, v in given.items() if v is not None})
    if getattr(args, "resume", False) and (args.out / "config.json").is_file():
        import json

        saved = json.loads((args.out / "config.json").read_text())
        for key, value in values.items():
            if key in saved and saved[key] != value and key not in ("device", "data_root"):
                raise ConfigError(
                    f"--resume: {key}={value!r} differs from the run in {args.out} ({saved[key]!r})"
                )
        saved.update({k: v for k, v in values.items() if k in ("device", "data_root")})
        values = saved
    return RunConfig.from_dict(values, source=str(args.config) if args.config else "options")


def _print_summary(rows: dict[str, dict[str, Any]]) -> None:
    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:6.2f}"

    def drift(v: float | None) -> str:
        return "–" if v is None else f"{v:.3g}"

    print(
        f"{'strategy':<10} {'final acc':>9} {'avg inc':>8} {'forget':>7} {'BWT':>7} {'FWT':>7} {'drift':>8}"
    )
    for name, r in rows.items():
        print(
            f"{name:<10} {pct(r['final_average_accuracy']):>9} {pct(r['average_incremental_accuracy']):>8} "
            f"{pct(r['forgetting']):>7} {pct(r['bwt']):>7} {pct(r['fwt']):>7} "
            f"{drift(r.get('final_feature_drift')):>8}"
        )


def _reports() -> bool:
    """Whether this process prints the summary: rank 0 reports for every torchrun rank."""
    from cl_hres import distributed

    return distributed.rank() == 0


def _cmd_run(args: argparse.Namespace) -> int:
    from cl_hres.runner import run

    config = _config_from_args(args)
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
    print(f"results: {args.out / 'results.json'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from cl_hres.compare import compare, markdown_table
    from cl_hres.run_config import STRATEGY_NAMES

    config = _config_from_args(args)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGY_NAMES]
    if bad or not names or len(set(names)) != len(names):
        raise ConfigError(
            f"--strategies must be distinct names from {', '.join(STRATEGY_NAMES)}; got {args.strategies!r}"
        )
    seeds = args.seeds or [config.seed]
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers >= 0, got {seeds}")
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
    from cl_hres.analysis import analysis_markdown, analyze_run

    if args.images < 2:
        raise ConfigError(f"--images must be at least 2, got {args.images}")
    report = analyze_run(args.run, other_run=args.other_run, images=args.images)
    print(analysis_markdown(report), end="")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from cl_hres.bench import markdown, run_bench, write_bench
    from cl_hres.run_config import RunConfig

    if args.iters < 1:
        raise ConfigError(f"--iters must be a positive integer, got {args.iters}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}")
    RunConfig(device=args.device).check_device()
    results = run_bench(
        args.config,
        device=args.device,
        iters=args.iters,
        autocast=args.bf16,
        batch_size=args.batch_size,
    )
    write_bench(results, args.out)
    print(markdown(results), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cl-hres`` console script."""
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
