"""The train–evaluate loop of a run: train a step, evaluate, log, checkpoint.

Each step trains one experience (or, for a strategy that ``trains_whole_stream``, the
whole stream once), evaluates on the whole test stream (a row of ``R``), logs the
``cl/`` scalars and those of the checkpointable plugins to TensorBoard (on the
per-experience axis, :mod:`cl_hres.avalanche.tensorboard`), and writes an atomic checkpoint (rank 0).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from cl_hres import distributed
from cl_hres.avalanche.protocols import checkpointable_plugins
from cl_hres.errors import Preempted
from cl_hres.fileio import atomic_write_text
from cl_hres.reporting.metrics import (
    AVALANCHE_NAMES,
    average_accuracy_seen,
    experience_scalars,
    metrics_csv,
)
from cl_hres.run.checkpoint import save_checkpoint
from cl_hres.run.context import RunContext
from cl_hres.run.preemption import SigtermFlag

__all__ = ["train_and_evaluate"]


def train_and_evaluate(ctx: RunContext, *, progress: bool = True) -> None:
    """Train–evaluate loop: each step trains, evaluates, logs and checkpoints.

    Starts after the steps already in ``ctx.state`` (a resumed run); closes the
    TensorBoard logger at the end. On SIGTERM it stops after the step under way and its
    checkpoint (:class:`~cl_hres.errors.Preempted`).
    """
    from tqdm import tqdm

    cfg = ctx.prep.config
    start_at = len(ctx.state.rows)
    bar = tqdm(
        total=ctx.steps,
        initial=start_at,
        desc=f"{cfg.strategy}",
        unit="exp",
        disable=not (progress and distributed.rank() == 0),
        file=sys.stderr,
    )
    try:
        with SigtermFlag() as sigterm:
            for i in range(start_at, ctx.steps):
                _train_step(ctx, i)
                if distributed.rank() == 0:
                    _log_step(ctx)
                    _save_step(ctx, i)
                bar.update(1)
                r = ctx.matrix()
                bar.set_postfix(avg_acc=f"{average_accuracy_seen(r, joint=ctx.whole_stream):.3f}")
                # After the checkpoint: the step is kept, the run resumes after it.
                if i + 1 < ctx.steps and sigterm.stop_now(cfg.device):
                    raise Preempted(i + 1)
    finally:
        bar.close()
        for logger in (ctx.logger, ctx.experience_logger):
            if logger is not None:
                logger.close()


def _train_step(ctx: RunContext, i: int) -> None:
    """Trains step ``i`` (experience ``i``, or the whole stream) and records it."""
    strategy, stream, state = ctx.strategy, ctx.stream, ctx.state
    t0 = time.perf_counter()
    experiences = stream.train_stream if ctx.whole_stream else stream.train_stream[i]
    strategy.train(experiences, **ctx.loader_kwargs)
    state.train_seconds.append(time.perf_counter() - t0)
    if state.train_images is not None:
        trained = getattr(strategy, "trained_last_experience", True)
        parts = experiences if ctx.whole_stream else [experiences]
        epochs = ctx.prep.config.epochs
        state.train_images.append(epochs * sum(len(e.dataset) for e in parts) if trained else 0)
    state.rows.append(ctx.evaluate())
    if not ctx.whole_stream:
        state.within.append(_within(ctx, i))
    state.histories = {k: p.history for k, p in checkpointable_plugins(strategy).items()}
    state.clock = {k: v for k, v in vars(strategy.clock).items() if type(v) is int}


def _save_step(ctx: RunContext, i: int) -> None:
    """Checkpoint ``i``: the model, every checkpointable plugin's tensors, the run state."""
    strategy = ctx.strategy
    save_checkpoint(
        ctx.out / "checkpoints",
        i,
        model=strategy.model,
        plugin_states={k: p.state_dict() for k, p in checkpointable_plugins(strategy).items()},
        state=dict(dataclasses.asdict(ctx.state), config=ctx.prep.config.to_dict()),
    )


def _log_step(ctx: RunContext) -> None:
    """TensorBoard scalars of the step just done, on the per-experience axis.

    Their step is the number of training steps done (1 after the first experience), not
    Avalanche's training iterations: curves of strategies that run different numbers of
    iterations line up, and an experience without any SGD step still gets its own point.
    Everything up to it is flushed before the checkpoint says the step is done.
    """
    from avalanche.evaluation.metric_results import MetricValue

    cfg, strategy = ctx.prep.config, ctx.strategy
    scalars = experience_scalars(
        ctx.matrix(), ctx.state.baseline, cfg.scenario, cfg.head, joint=ctx.whole_stream
    )
    # The same figures beside TensorBoard, one CSV row per step (rebuilt, so resume-safe).
    atomic_write_text(
        ctx.out / "metrics.csv",
        metrics_csv(
            ctx.matrix(), ctx.state.baseline, cfg.scenario, cfg.head, joint=ctx.whole_stream
        ),
    )
    scalars.update({AVALANCHE_NAMES[k]: v for k, v in scalars.items() if k in AVALANCHE_NAMES})
    for plugin in checkpointable_plugins(strategy).values():
        scalars.update(plugin.scalars())
    step = len(ctx.state.rows)
    # None is undefined (e.g. forgetting after one experience), not 0: not logged.
    values = [MetricValue(None, k, float(v), step) for k, v in scalars.items() if v is not None]
    if ctx.experience_logger is not None:
        ctx.experience_logger.log_metrics(values)
        ctx.experience_logger.flush()
    if ctx.logger is not None:
        ctx.logger.flush()


def _within(ctx: RunContext, i: int) -> float:
    """Accuracy on test experience ``i`` with logits restricted to its classes."""
    from cl_hres.reporting.forward_transfer import within_accuracy

    cfg, stream = ctx.prep.config, ctx.stream
    classes = sorted(int(c) for c in stream.train_stream[i].classes_in_this_experience)
    return within_accuracy(
        ctx.strategy.model,
        stream.test_stream[i],
        classes,
        device=cfg.device,
        batch_size=cfg.eval_batch_size,
    )
