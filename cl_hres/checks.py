"""Value checks shared by every config: one line naming the option and the bad value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from cl_hres.errors import ConfigError

__all__ = [
    "check_bool",
    "check_choice",
    "check_finite_nonneg",
    "check_finite_positive",
    "check_nonneg_int",
    "check_positive_int",
    "check_range",
    "is_number",
]


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> None:
    """Raises ConfigError unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_nonneg_int(name: str, value: Any) -> None:
    """Raises ConfigError unless ``value`` is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raises ConfigError unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raises ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_finite_nonneg(name: str, value: Any) -> None:
    """Raises ConfigError unless ``value`` is a finite number >= 0."""
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


def check_finite_positive(name: str, value: Any) -> None:
    """Raises ConfigError unless ``value`` is a finite number > 0."""
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def check_range(name: str, value: Any, low: float, high: float, *, closed: str = "[)") -> None:
    """Raises ConfigError unless ``value`` is a number in the interval from low to high.

    Args:
        name: The option's name, as the user writes it.
        value: Its value.
        low: Lower bound.
        high: Upper bound.
        closed: Which ends belong to the interval: ``"[)"``, ``"(]"``, ``"[]"`` or ``"()"``.
    """
    ok = is_number(value) and math.isfinite(value)
    if ok:
        ok = (value >= low if closed[0] == "[" else value > low) and (
            value <= high if closed[1] == "]" else value < high
        )
    if not ok:
        raise ConfigError(
            f"{name} must be in {closed[0]}{low:g}, {high:g}{closed[1]}, got {value!r}"
        )
