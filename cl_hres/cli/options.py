"""Options of ``cl-hres run`` / ``compare``: types, help tables and groups by concern.

Every option is a :class:`~cl_hres.run.config.RunConfig` field; its default and help come
from the field (and, for method options, from the method's own dataclass), so this module
only says which group a field appears in and how its value is parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from cl_hres import registry
from cl_hres.data.benchmarks import BENCHMARKS
from cl_hres.data.loaders import parse_num_workers
from cl_hres.errors import ConfigError


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one stderr line and exit 2 (no usage dump).

    Used by ``cl-hres`` and by the scripts in ``scripts/``.
    """

    def error(self, message: str) -> None:  # argparse would print the usage too
        """Prints ``message`` as one stderr line and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def json_option(self, flag: str, text: str) -> Any:
        """``text`` parsed as JSON, or a one-line error naming ``flag``."""
        import json

        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            self.error(f"{flag}: not valid JSON ({exc})")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the group descriptions (the lists of choices)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


def _ridge(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _workers(text: str) -> int | str:
    """``--num-workers``: the loaders' own parser (the one a YAML recipe's value goes through)."""
    try:
        return parse_num_workers(text)
    except ConfigError as exc:  # argparse prints it as its one-line usage error
        raise argparse.ArgumentTypeError(str(exc)) from None


def _experiences(text: str) -> int | str:
    if text == "by-domain":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or by-domain, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def strategy_help() -> dict[str, str]:
    """One line per registered strategy (the registry imports neither torch nor Avalanche)."""
    return {name: spec.summary for name, spec in registry.STRATEGIES.items()}


# One line per choice, shown in `run --help` (cl_hres.data.benchmarks imports no torch).
BENCHMARK_HELP: dict[str, str] = {
    **{name: spec.description for name, spec in BENCHMARKS.items()},
    "FILE.npz": "x_train, y_train, x_test, y_test; images N×H×W or N×H×W×C (docs/data.md)",
    "DIRECTORY": "an ImageFolder (one sub-folder per class, or train/ and test/)",
}
_SCENARIO_HELP = {
    "class": "no task id at test time; logits over every class seen",
    "task": "task id given at test time; one head per task",
}
_HEAD_HELP = {
    "ridge": "closed-form ridge classifier on accumulated feature statistics (RanPAC)",
    "ncm": "nearest class mean",
    "linear": "the trained linear head",
}
_NSP_RULE_HELP = {
    "relative": "null space: eigenvalues <= threshold × largest, threshold in (0, 1)",
    "energy": "protect the leading directions holding threshold of the energy (GPM)",
    "ratio": "null space: eigenvalues <= threshold × smallest, threshold >= 1 (Adam-NSCL)",
}


def _choices(table: dict[str, str]) -> str:
    width = max(map(len, table))
    return "\n".join(f"  {name:<{width}}  {text}" for name, text in table.items())


# Option groups of `run` / `compare`: (title, description, options). Each option is
# (flag, RunConfig field, type); type None marks a --flag/--no-flag boolean. Every default
# lives in RunConfig.
_GROUPS: list[tuple[str, str, list[tuple[str, str, Any]]]] = [
    (
        "data and stream",
        f"Benchmarks (--benchmark):\n{_choices(BENCHMARK_HELP)}\n"
        f"Scenarios (--scenario):\n{_choices(_SCENARIO_HELP)}",
        [
            ("--benchmark", "benchmark", str),
            ("--scenario", "scenario", str),
            ("--experiences", "experiences", _experiences),
            ("--class-order", "class_order", str),
            ("--initial-classes", "initial_classes", int),
            ("--increment", "increment", int),
            ("--data-root", "data_root", str),
            ("--img-size", "img_size", int),
            ("--augment", "augment", str),
            ("--validation", "validation", float),
        ],
    ),
    (
        "backbone",
        "A frozen timm ViT. backbone_kwargs (e.g. {patch_size: 2}) go in a --config recipe.",
        [
            ("--backbone", "backbone", str),
            ("--pretrained", "pretrained", None),
            ("--weights", "weights", str),
        ],
    ),
    (
        "method",
        f"Strategies (--strategy):\n{_choices(strategy_help())}",
        [
            ("--strategy", "strategy", str),
            ("--rank", "rank", int),
            ("--scale", "scale", float),
            ("--blocks", "blocks", str),
            ("--hres-input", "hres_input", str),
            ("--lora-rank", "lora_rank", int),
            ("--lora-alpha", "lora_alpha", float),
            ("--lora-targets", "lora_targets", str),
            ("--lora-blocks", "lora_blocks", str),
            ("--vpt-length", "vpt_length", int),
            ("--vpt-deep", "vpt_deep", None),
            ("--l2p-pool-size", "l2p_pool_size", int),
            ("--l2p-length", "l2p_length", int),
            ("--l2p-top-k", "l2p_top_k", int),
            ("--l2p-key-loss-weight", "l2p_key_loss_weight", float),
            ("--dualprompt-g-length", "dualprompt_g_length", int),
            ("--dualprompt-g-blocks", "dualprompt_g_blocks", str),
            ("--dualprompt-e-length", "dualprompt_e_length", int),
            ("--dualprompt-e-blocks", "dualprompt_e_blocks", str),
            ("--dualprompt-pool-size", "dualprompt_pool_size", int),
            ("--dualprompt-key-loss-weight", "dualprompt_key_loss_weight", float),
            ("--coda-prompt-pool-size", "coda_prompt_pool_size", int),
            ("--coda-prompt-length", "coda_prompt_length", int),
            ("--coda-prompt-blocks", "coda_prompt_blocks", str),
            ("--coda-prompt-tasks", "coda_prompt_tasks", int),
            ("--coda-prompt-ortho-weight", "coda_prompt_ortho_weight", float),
        ],
    ),
    (
        "null-space projection (hres-nsp, lora-nsp)",
        f"Rules (--nsp-rule):\n{_choices(_NSP_RULE_HELP)}",
        [
            ("--nsp-rule", "nsp_rule", str),
            ("--nsp-threshold", "nsp_threshold", float),
            ("--nsp-eta", "nsp_eta", float),
            ("--nsp-min-free-energy", "nsp_min_free_energy", float),
            ("--nsp-min-selectivity", "nsp_min_selectivity", float),
            ("--nsp-separate-prefix", "nsp_separate_prefix", None),
            ("--nsp-precision", "nsp_precision", str),
        ],
    ),
    (
        "evaluation head and metrics",
        f"Heads (--head):\n{_choices(_HEAD_HELP)}",
        [
            ("--head", "head", str),
            ("--ridge", "ridge", _ridge),
            ("--ridge-projection", "ridge_projection", int),
            ("--balanced-head", "balanced_head", None),
            ("--drift-compensation", "drift_compensation", None),
            ("--concat-pretrained", "concat_pretrained", None),
            ("--fwt-reference", "fwt_reference", None),
        ],
    ),
    (
        "training",
        None,
        [
            ("--epochs", "epochs", int),
            ("--batch-size", "batch_size", int),
            ("--eval-batch-size", "eval_batch_size", int),
            ("--lr", "lr", float),
            ("--weight-decay", "weight_decay", float),
            ("--seed", "seed", int),
            ("--device", "device", str),
            ("--bf16", "bf16", None),
            ("--num-workers", "num_workers", _workers),
        ],
    ),
]
_RUN_FIELDS = [dest for _, _, options in _GROUPS for _, dest, _ in options]
# What a None default means, for the help text.
_NONE_DEFAULTS = {
    "experiences": "the benchmark's (5 for split-digits, min(5, classes) for files)",
    "initial_classes": "an equal split into --experiences",
    "increment": "--initial-classes",
    "head": "the strategy's: ncm for simplecil, else ridge",
    "ridge_projection": "the strategy's: 2000 for ranpac, else 0",
    "img_size": "the backbone's",
    "weights": "none",
    "blocks": "all",
    "lora_blocks": "all",
}


def _help(field_name: str) -> str:
    from cl_hres.run.config import RunConfig

    f = {f.name: f for f in dataclasses.fields(RunConfig)}[field_name]
    text = f.metadata.get("help", "")
    if "(default:" not in text:  # some field helps explain their default themselves
        default = _NONE_DEFAULTS.get(field_name, f.default) if f.default is None else f.default
        if isinstance(default, bool):
            default = "on" if default else "off"
        text = f"{text} (default: {default})"
    # argparse expands %-formats in help: a literal % must be doubled.
    return text.replace("%", "%%")


def _add_run_options(p: argparse.ArgumentParser, *, with_strategy: bool = True) -> None:
    p.add_argument(
        "--config", type=Path, metavar="YAML", help="run recipe; command-line options override it"
    )
    for title, description, options in _GROUPS:
        if not with_strategy and title == "method":
            description = "Options of the strategies named by --strategies."
        group = p.add_argument_group(title, description)
        for flag, dest, typ in options:
            if dest == "strategy" and not with_strategy:
                continue
            if typ is None:  # --flag / --no-flag; None keeps the recipe's or RunConfig's
                group.add_argument(
                    flag,
                    dest=dest,
                    action=argparse.BooleanOptionalAction,
                    default=None,
                    help=_help(dest),
                )
            else:
                metavar = {str: "NAME", int: "N", float: "X"}.get(typ, "X")
                if dest in ("data_root", "weights"):
                    metavar = "PATH"
                elif dest in ("blocks", "lora_blocks"):
                    metavar = "I,J,..."
                elif dest == "num_workers":
                    metavar = "N|auto"
                group.add_argument(
                    flag, dest=dest, type=typ, default=None, metavar=metavar, help=_help(dest)
                )
    out = p.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="output directory (required)"
    )
    out.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    out.add_argument(
        "--resume", action="store_true", help="continue after the last finished experience"
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
