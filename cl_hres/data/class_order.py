"""Class order and experience sizes of a stream, as a user controls them.

The conventions of PILOT, Mammoth and LibContinual: the order is a permutation of the
labels 0..C-1 (``seeded`` by the run's seed, ``fixed`` label order, or given), the first
experience has ``initial`` classes and every later one ``increment`` (B0Inc10, B50Inc10);
or the data says which domain each class belongs to, and each domain is one experience in
the order the domains first appear in the file. Everything here is NumPy and plain
Python, checked before any image is read; the errors name the option.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cl_hres.errors import ConfigError

__all__ = ["BY_DOMAIN", "ORDER_CHOICES", "class_order", "domain_experiences", "experience_sizes"]

ORDER_CHOICES = ("seeded", "fixed")
# The value of ``experiences`` that asks for one experience per domain.
BY_DOMAIN = "by-domain"


def _parse_list(text: str, source: str) -> list[int]:
    items = [t for t in text.replace("\n", ",").replace(" ", ",").split(",") if t.strip()]
    try:
        return [int(t) for t in items]
    except ValueError:
        raise ConfigError(
            f"class_order {source} must hold integers, got {text.strip()[:40]!r}"
        ) from None


def class_order(spec: Any, num_classes: int, seed: int) -> list[int]:
    """The class order a ``class_order`` option names.

    Args:
        spec: ``seeded`` (a permutation drawn from ``seed``), ``fixed`` (0..C-1), a list
            of integers, a comma-separated string of them, or the path of a text file
            holding them (commas, spaces or new lines).
        num_classes: C, the classes of the data.
        seed: Seed of the ``seeded`` order.

    Raises:
        ConfigError: the order is not a permutation of 0..C-1, or the file is unreadable.
    """
    if spec == "seeded":
        return np.random.default_rng(seed).permutation(num_classes).tolist()
    if spec == "fixed":
        return list(range(num_classes))
    source = "list"
    if isinstance(spec, str) and "," not in spec and not spec.strip().isdigit():
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(
                f"class_order must be seeded, fixed, a comma list or a file; {spec!r} is "
                "none of them (no such file)"
            )
        try:
            spec = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"class_order file {path}: not readable ({exc})") from None
        source = f"file {path}"
    order = _parse_list(spec, source) if isinstance(spec, str) else list(spec)
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in order):
        raise ConfigError(f"class_order {source} must hold integers, got {order[:5]!r}")
    order = [int(c) for c in order]
    if sorted(order) != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(order))
        extra = sorted({c for c in order if not 0 <= c < num_classes})
        repeated = sorted({c for c in order if order.count(c) > 1})
        what = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}" if missing else "",
                f"outside 0..{num_classes - 1}: {extra[:5]}" if extra else "",
                f"repeated {repeated[:5]}" if repeated else "",
            )
            if part
        )
        raise ConfigError(
            f"class_order {source} is not a permutation of the {num_classes} classes ({what})"
        )
    return order


def experience_sizes(
    num_classes: int,
    experiences: int | None = None,
    initial: int | None = None,
    increment: int | None = None,
) -> list[int]:
    """Classes per experience.

    ``initial``/``increment`` (either may be given; the other defaults to it) split the
    order as B``initial``Inc``increment``; a last experience with fewer classes takes the
    remainder. Otherwise ``experiences`` experiences keep every class: the first ``C mod
    k`` get one class more (Avalanche's helper would drop the leftover classes).

    Raises:
        ConfigError: the numbers do not fit the classes.
    """
    if initial is None and increment is None:
        k = experiences or min(5, num_classes)
        if not 1 <= k <= num_classes:
            raise ConfigError(f"cannot split {num_classes} classes into {k} experiences")
        base, extra = divmod(num_classes, k)
        return [base + (1 if i < extra else 0) for i in range(k)]
    initial = initial if initial is not None else increment
    increment = increment if increment is not None else initial
    if not 1 <= initial <= num_classes:
        raise ConfigError(f"initial_classes must be in 1..{num_classes}, got {initial}")
    rest = num_classes - initial
    if rest and increment < 1:
        raise ConfigError(f"increment must be >= 1, got {increment}")
    sizes = (
        [initial]
        + [increment] * (rest // increment)
        + ([rest % increment] if rest % increment else [])
    )
    if experiences is not None and experiences != len(sizes):
        raise ConfigError(
            f"initial_classes {initial} and increment {increment} give {len(sizes)} "
            f"experiences over {num_classes} classes, but experiences is {experiences}"
        )
    return sizes


def domain_experiences(
    order: Sequence[int], domain_of_class: Sequence[int]
) -> tuple[list[int], list[int]]:
    """One experience per domain, domains in the order they first appear in the file.

    Within a domain the classes keep their place in ``order``.

    Returns:
        ``(order, classes per experience)``: the order regrouped by domain.
    """
    domains = list(dict.fromkeys(int(d) for d in domain_of_class))
    regrouped = [c for d in domains for c in order if int(domain_of_class[c]) == d]
    sizes = [sum(1 for c in order if int(domain_of_class[c]) == d) for d in domains]
    return regrouped, sizes
