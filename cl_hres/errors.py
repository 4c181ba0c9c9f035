"""Exceptions that the CLI turns into one-line messages and exit code 2."""

from __future__ import annotations

__all__ = ["CheckpointError", "ClHresError", "ConfigError", "DataError"]


class ClHresError(Exception):
    """Base class of the errors caused by user input rather than by a bug."""


class ConfigError(ClHresError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class DataError(ClHresError):
    """Input data is missing, malformed or cannot be obtained offline."""


class CheckpointError(ClHresError):
    """A checkpoint is unreadable or does not belong to the run being resumed."""
