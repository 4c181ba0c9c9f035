"""Exceptions that the CLI turns into one-line messages: exit code 2, or 143 for SIGTERM."""

from __future__ import annotations

__all__ = ["CheckpointError", "ClHresError", "ConfigError", "DataError", "Preempted"]


class ClHresError(Exception):
    """Base class of the errors caused by user input rather than by a bug."""


class ConfigError(ClHresError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class DataError(ClHresError):
    """Input data is missing, malformed or cannot be obtained offline."""


class CheckpointError(ClHresError):
    """A checkpoint is unreadable or does not belong to the run being resumed."""


class Preempted(Exception):
    """SIGTERM arrived; the run stopped after a checkpointed step (not an input error).

    Attributes:
        steps_done: Steps (experiences) finished and checkpointed.
    """

    def __init__(self, steps_done: int) -> None:
        super().__init__(f"stopped by SIGTERM after step {steps_done}")
        self.steps_done = steps_done
