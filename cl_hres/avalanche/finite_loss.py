"""Stopping a run whose loss became NaN or Inf."""

from __future__ import annotations

import torch
from avalanche.core import SupervisedPlugin

from cl_hres import distributed
from cl_hres.errors import ClHresError

__all__ = ["FiniteLossPlugin", "TrainingDivergedError"]


class TrainingDivergedError(ClHresError):
    """The loss became NaN or Inf."""


class FiniteLossPlugin(SupervisedPlugin, supports_distributed=True):
    """Stops training when the loss is not finite, checked once per epoch.

    The per-step check stays on the device (a running flag), so it adds no host-device
    synchronisation to the training step.
    """

    def __init__(self) -> None:
        super().__init__()
        self._bad: torch.Tensor | None = None

    def before_backward(self, strategy, **kwargs) -> None:
        """Notes whether this step's loss is NaN or Inf (checked once per epoch)."""
        bad = ~torch.isfinite(strategy.loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def after_training_epoch(self, strategy, **kwargs) -> None:
        """Raises TrainingDivergedError on every process if any step's loss was not finite."""
        bad = (
            self._bad
            if self._bad is not None
            else torch.zeros((), dtype=torch.bool, device=strategy.device)
        )
        self._bad = None
        # Every rank must stop together, or the others would wait forever in the next
        # all-reduce.
        if distributed.any_rank(bad):
            raise TrainingDivergedError(
                f"loss became NaN/Inf in experience {strategy.clock.train_exp_counter + 1}, "
                f"epoch {strategy.clock.train_exp_epochs + 1}; lower --lr"
            )
