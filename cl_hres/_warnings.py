"""Filters for the known, harmless warnings that third-party libraries print on import or use.

Each filter names the warning's category, the module that issues it and the start of its
message, so no other warning is hidden. The filters are appended to the filter list:
``python -W default`` / ``PYTHONWARNINGS`` (which go in front) still show everything, for
debugging. :func:`install` runs when :mod:`cl_hres` is imported; importing it before
Avalanche also silences the warning qpsolvers prints on import.
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["KNOWN_WARNINGS", "ClHresWarning", "install", "show_as_one_line"]

# (category, issuing module (a regex matched at the start of its __name__), message start).
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # qpsolvers (imported by Avalanche's GEM plugin, which cl-hres never uses) warns when no
    # QP solver package is installed, on every import.
    (UserWarning, r"qpsolvers(\.|$)", "no QP solver found"),
    # jaxopt (pulled in by one of qpsolvers' optional solvers) announces its deprecation.
    (DeprecationWarning, r"jaxopt(\.|$)", "JAXopt is no longer maintained"),
    # An EvaluationPlugin without loggers is deliberate (README example, non-zero ranks).
    (UserWarning, r"avalanche\.training\.plugins\.evaluation$", "No loggers specified"),
    # ContinualViT starts with a zero-width training head that grows with the classes;
    # torch warns when nn.Linear initialises it (issued from torch.nn.modules.linear).
    (UserWarning, r"torch\.nn\.modules\.linear$", "Initializing zero-element tensors"),
)


class ClHresWarning(UserWarning):
    """A note from cl-hres about a legal but probably unintended setting."""


def install() -> None:
    """Adds the filters of :data:`KNOWN_WARNINGS` (idempotent)."""
    for category, module, message in KNOWN_WARNINGS:
        # append=True: filters given with -W or PYTHONWARNINGS stay in front and win.
        warnings.filterwarnings(
            "ignore", message=message, category=category, module=module, append=True
        )


_original_showwarning = warnings.showwarning


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, ClHresWarning):
        # Under torchrun every rank meets the same condition: rank 0 speaks for them.
        if os.environ.get("RANK", "0") == "0":
            print(f"cl-hres: warning: {message}", file=file or sys.stderr)
    else:
        _original_showwarning(message, category, filename, lineno, file, line)


def show_as_one_line() -> None:
    """Prints :class:`ClHresWarning` s as one ``cl-hres: warning: ...`` line (the CLI's format)."""
    warnings.showwarning = _show
