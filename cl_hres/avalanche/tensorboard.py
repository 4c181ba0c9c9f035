"""TensorBoard logging of a run: Avalanche's logger, made resumable and lazy.

A run writes two step axes, each in its own event directory:

- ``tensorboard/``: Avalanche's metrics (loss per epoch, accuracy of each evaluation)
  at Avalanche's step, training iterations (``strategy.clock.train_iterations``);
- ``tensorboard/experiences/``: after each training step the train–evaluate loop
  (:mod:`cl_hres.run.loop`) logs the ``cl/`` scalars (accuracies, forgetting, BWT, FWT)
  and the plugins' ``nsp/`` and ``drift/`` scalars as Avalanche ``MetricValue`` s at the
  number of training steps done (1, 2, ...). Per-experience curves of strategies that run
  different numbers of iterations line up there, and an experience in which a strategy
  runs no SGD step (a frozen probe, first-session adaptation) still advances the axis.

Separate directories keep TensorBoard's purge on resume exact for each axis.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from avalanche.logging import BaseLogger, TensorboardLogger
from torch.utils.tensorboard import SummaryWriter

__all__ = ["RunTensorboardLogger"]


class RunTensorboardLogger(TensorboardLogger):
    """Avalanche's :class:`TensorboardLogger` that opens its event file on first use.

    Args:
        tb_log_dir: Directory of the event files.
        purge_step: When resuming after the checkpoint taken at step ``T - 1``: events an
            interrupted run logged at steps ``>= T`` (after that checkpoint) are purged,
            so the resumed run's do not duplicate them (TensorBoard's ``purge_step``).
        skip: Prefixes of Avalanche metric names not to write. By default its
            per-experience accuracy (``Top1_Acc_Exp/``), which logs experiences not
            trained yet as 0; ``cl/accuracy_expNNN`` holds the same values without them.
    """

    def __init__(
        self,
        tb_log_dir: str | Path,
        *,
        purge_step: int | None = None,
        skip: tuple[str, ...] = ("Top1_Acc_Exp/",),
    ) -> None:
        # TensorboardLogger.__init__ would create the directory and the event file at
        # once; a run must leave --out untouched until its input has been validated.
        BaseLogger.__init__(self)
        self.log_dir = Path(tb_log_dir)
        self.purge_step = purge_step
        self.skip = skip
        self._writer: SummaryWriter | None = None

    @property
    def writer(self) -> SummaryWriter:
        """The event writer, created (with its directory) on first use."""
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
            # As Avalanche does: close the file on exit or when the logger is collected.
            weakref.finalize(self, SummaryWriter.close, self._writer)
        return self._writer

    def log_single_metric(self, name: str, value, x_plot: int) -> None:
        """Logs one scalar unless its name starts with a skipped prefix."""
        if not name.startswith(self.skip):
            super().log_single_metric(name, value, x_plot)

    def flush(self) -> None:
        """Writes pending events to disk (before a checkpoint marks them as done)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file; a later log opens a new one."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            # Events of this writer are complete: no purge needed for the next one.
            self.purge_step = None
