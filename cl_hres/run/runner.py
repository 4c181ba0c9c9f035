"""The task-stream driver behind ``cl-hres run`` and ``cl-hres compare``, in stages.

1. **prepare** (:mod:`cl_hres.run.prepare`): validates the configuration, loads the data and builds
   the backbone without touching the output directory, so bad input costs seconds and
   leaves ``--out`` as it was (``check_output_dir`` refuses to clobber results).
2. **start and restore** (:mod:`cl_hres.run.context`): builds the stream and the strategy,
   readies ``--out``, then restores the last checkpoint or measures the untrained model.
3. **train–evaluate loop** (:mod:`cl_hres.run.loop`): trains experience by experience,
   evaluating on the whole test stream after each one (a row of ``R``), logging to
   TensorBoard and writing an atomic checkpoint.
4. **report** (:mod:`cl_hres.run.report`): forward transfer against references,
   ``results.json`` and ``forgetting_curves.png``.

:func:`execute` runs stages 2 to 4; :func:`run` all of them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cl_hres import distributed
from cl_hres.run.checkpoint import latest_checkpoint, load_checkpoint
from cl_hres.run.config import RunConfig
from cl_hres.run.context import restore, start
from cl_hres.run.loop import train_and_evaluate
from cl_hres.run.preemption import output_lock
from cl_hres.run.prepare import Prepared, check_output_dir, holds_results, prepare
from cl_hres.run.report import report

__all__ = ["execute", "join_process_group", "run"]


def execute(
    prep: Prepared,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    reference_cache: Path | None = None,
) -> dict[str, Any]:
    """Trains the stream and writes every output into ``out``; returns the results.

    Args:
        prep: From :func:`prepare`.
        out: Output directory.
        resume: Continue after the last checkpoint in ``out``.
        overwrite: Replace results already in ``out``.
        progress: Show a progress bar.
        reference_cache: Folder of the forward-transfer reference cache (default ``out``);
            ``compare`` passes one folder for all its runs, so they share references.
    """
    with contextlib.ExitStack() as lock:
        return _execute(
            prep,
            out,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            reference_cache=reference_cache,
            take_lock=lambda: lock.enter_context(output_lock(out, prep.config.device)),
        )


def _execute(
    prep: Prepared,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    reference_cache: Path | None,
    take_lock: Callable[[], object],
) -> dict[str, Any]:
    started_at = time.perf_counter()
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    loaded = load_checkpoint(checkpoint, prep.config.to_dict()) if checkpoint else None
    # On resume, events an interrupted run logged after the checkpoint's step are purged.
    purge_step = loaded[0]["clock"].get("train_iterations", 0) + 1 if loaded else None
    experience_purge_step = len(loaded[0]["rows"]) + 1 if loaded else None
    fresh = loaded is None and (overwrite or not holds_results(out))
    ctx = start(
        prep,
        out,
        fresh=fresh,
        purge_step=purge_step,
        experience_purge_step=experience_purge_step,
        started_at=started_at,
        # The lock is held from before the first write in ``out`` until the report is out.
        before_writing=take_lock,
    )
    restore(ctx, loaded)
    train_and_evaluate(ctx, progress=progress)
    return report(ctx, reference_cache=reference_cache or out)


def join_process_group(config: RunConfig) -> None:
    """Under ``torchrun``, joins the process group and sets this rank's device."""
    # Avalanche builds a logger at import time, which it refuses on a non-main rank once a
    # process group exists: import it before joining the group.
    import cl_hres.avalanche.strategies  # noqa: F401

    config.device = distributed.init_from_env(config.resolve_device())


def run(
    config: RunConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Validates, then executes one run (the ``cl-hres run`` command)."""
    join_process_group(config)
    check_output_dir(out, resume=resume, overwrite=overwrite)
    prep = prepare(config)
    # Every rank has checked --out before rank 0 writes into it.
    distributed.barrier()
    return execute(prep, out, resume=resume, overwrite=overwrite, progress=progress)
