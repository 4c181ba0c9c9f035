"""Stopping cleanly on SIGTERM (cluster pre-emption) and one writer per ``--out``.

SIGTERM sets a flag; the train–evaluate loop finishes the step it is in (one experience),
writes that step's checkpoint as usual, and then raises :class:`~cl_hres.errors.Preempted`, so the run
resumes with ``--resume`` exactly where it stopped. A second SIGTERM ends the process at
once (the default action), for a scheduler that does not wait. Under ``torchrun`` every
rank gets the signal; they agree on stopping through one all-reduce per step, so all stop
after the same step.

:func:`output_lock` holds an exclusive ``flock`` on ``OUT/.cl-hres.lock`` while a run
writes into ``OUT``: a second run on the same directory is refused with one line instead
of interleaving checkpoints. The lock dies with its process (no stale locks after a kill).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from cl_hres import distributed
from cl_hres.errors import ConfigError

__all__ = ["LOCK_NAME", "SigtermFlag", "output_lock"]

LOCK_NAME = ".cl-hres.lock"


class SigtermFlag:
    """Context manager: while inside, SIGTERM only sets :attr:`requested`.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum: int, frame) -> None:
        self.requested = True
        # The next SIGTERM takes the default action: the scheduler may not wait.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def __enter__(self) -> SigtermFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def stop_now(self, device: str) -> bool:
        """Whether any rank got SIGTERM (a collective: every rank calls it each step)."""
        return distributed.any_rank(torch.tensor(self.requested, device=device))


@contextmanager
def output_lock(out: Path, device: str) -> Iterator[None]:
    """Holds ``OUT``'s lock (taken by rank 0); ConfigError if another process holds it.

    Every rank learns whether rank 0 got it (a collective), so all stop together.
    """
    fd, error = _acquire(out) if distributed.rank() == 0 else (None, None)
    if distributed.any_rank(torch.tensor(error is not None, device=device)):
        raise error or ConfigError(f"another cl-hres run is writing into {out}")
    try:
        yield
    finally:
        if fd is not None:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _acquire(out: Path) -> tuple[int | None, ConfigError | None]:
    """``(fd, None)`` holding the lock, or ``(None, error)``; ``(None, None)`` without flock."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): no lock
        return None, None
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        return None, ConfigError(
            f"another cl-hres run (pid {holder}) is writing into {out}; "
            "wait for it or choose another --out"
        )
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd, None
