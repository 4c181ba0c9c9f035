"""Validation of a run's options: one ConfigError naming the first bad value.

Kept apart from :class:`~cl_hres.run.config.RunConfig` so the dataclass lists the options
and this module says what each may hold; it runs before torch is imported.
"""

from __future__ import annotations

import difflib
from typing import Any

from cl_hres import registry
from cl_hres.checks import (
    check_bool,
    check_choice,
    check_finite_nonneg,
    check_finite_positive,
    check_nonneg_int,
    check_positive_int,
    check_range,
)
from cl_hres.data.class_order import BY_DOMAIN
from cl_hres.data.loaders import parse_num_workers
from cl_hres.data.transforms import AUGMENT_CHOICES
from cl_hres.errors import ConfigError
from cl_hres.nn.config import HEAD_CHOICES

__all__ = ["validate"]

_BOOLEANS = (
    "pretrained",
    "vpt_deep",
    "bf16",
    "fwt_reference",
    "drift_compensation",
    "nsp_separate_prefix",
    "balanced_head",
)


def _check_strategy(name: Any) -> None:
    names = registry.strategy_names()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown strategy {name!r}{hint} (choose from {', '.join(names)})")


def _check_device(device: Any) -> None:
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda") or device.startswith("cuda:")
    ):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _check_class_order(order: Any) -> None:
    # The order's fit to the data is checked once the data is loaded (stream_layout).
    if isinstance(order, (list, tuple)):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in order):
            raise ConfigError(f"class_order must hold integers, got {list(order)[:5]!r}")
    elif not isinstance(order, str) or not order.strip():
        raise ConfigError(
            f"class_order must be seeded, fixed, a comma list or a file, got {order!r}"
        )


def validate(cfg: Any) -> None:
    """Raises ConfigError naming the first bad value of a RunConfig; normalises workers.

    Args:
        cfg: The :class:`~cl_hres.run.config.RunConfig` to check.
    """
    _check_strategy(cfg.strategy)
    check_choice("scenario", cfg.scenario, ("class", "task"))
    check_choice("augment", cfg.augment, AUGMENT_CHOICES)
    if cfg.head is not None:
        check_choice("head", cfg.head, HEAD_CHOICES)
    for name in ("epochs", "batch_size", "eval_batch_size"):
        check_positive_int(name, getattr(cfg, name))
    if cfg.experiences != BY_DOMAIN and cfg.experiences is not None:
        if isinstance(cfg.experiences, str) and cfg.experiences.isdigit():
            cfg.experiences = int(cfg.experiences)
        if isinstance(cfg.experiences, str):
            raise ConfigError(
                f"experiences must be a positive integer or by-domain, got {cfg.experiences!r}"
            )
        check_positive_int("experiences", cfg.experiences)
    for name in ("img_size", "initial_classes", "increment"):
        if getattr(cfg, name) is not None:
            check_positive_int(name, getattr(cfg, name))
    _check_class_order(cfg.class_order)
    if cfg.ridge_projection is not None:
        check_nonneg_int("ridge_projection", cfg.ridge_projection)
    check_nonneg_int("seed", cfg.seed)
    check_finite_positive("lr", cfg.lr)
    if cfg.ridge != "auto":
        check_finite_positive("ridge", cfg.ridge)
    check_finite_nonneg("weight_decay", cfg.weight_decay)
    check_range("validation", cfg.validation, 0, 1)
    if cfg.backbone_kwargs is not None and not isinstance(cfg.backbone_kwargs, dict):
        raise ConfigError("backbone_kwargs must be a mapping")
    for name in _BOOLEANS:
        check_bool(name, getattr(cfg, name))
    if cfg.concat_pretrained is not None:
        check_bool("concat_pretrained", cfg.concat_pretrained)
    if cfg.concat_pretrained and not cfg.spec.method_spec.switchable:
        raise ConfigError(
            f"concat_pretrained needs a method that can be switched off "
            f"(hres, lora, vpt), not {cfg.strategy}"
        )
    cfg.num_workers = parse_num_workers(cfg.num_workers)
    _check_device(cfg.device)
    # The method configs validate their own fields.
    cfg.mirrored_configs()
