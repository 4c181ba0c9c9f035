"""The train–evaluate loop of a run: train a step, evaluate, log, checkpoint.

Each step trains one experience (or, for a strategy that ``trains_whole_stream``, the
whole stream once), evaluates on the whole test stream (a row of ``R``), logs the
``cl/`` scalars and those of the checkpointable plugins to TensorBoard (on the
per-experience axis, :mod:`cl_hres.tb_logger`), and writes an atomic checkpoint (rank 0).
"""

from __future__ import annotations

import dataclasses
import sys
import time

from cl_hres import distributed
from cl_hres.checkpoint import save_checkpoint
from cl_hres.metrics import average_accuracy_seen, experience_scalars
from cl_hres.plugin_protocols import checkpointable_plugins
from cl_hres.run_session import Session

__all__ = ["train_and_evaluate"]


def train_and_evaluate(session: Session, *, progress: bool = True) -> None:
    """Train–evaluate loop: each step trains, evaluates, logs and checkpoints.

    Starts after the steps already in ``session.state`` (a resumed run); closes the
    TensorBoard logger at the end.
    """
    from tqdm import tqdm

    cfg = session.prep.config
    start_at = len(session.state.rows)
    bar = tqdm(
        total=session.steps,
        initial=start_at,
        desc=f"{cfg.strategy}",
        unit="exp",
        disable=not (progress and distributed.rank() == 0),
        file=sys.stderr,
    )
    for i in range(start_at, session.steps):
        _train_step(session, i)
        if distributed.rank() == 0:
            _log_step(session)
            _save_step(session, i)
        bar.update(1)
        r = session.matrix()
        bar.set_postfix(avg_acc=f"{average_accuracy_seen(r, joint=session.whole_stream):.3f}")
    bar.close()
    for logger in (session.logger, session.experience_logger):
        if logger is not None:
            logger.close()


def _train_step(session: Session, i: int) -> None:
    """Trains step ``i`` (experience ``i``, or the whole stream) and records it."""
    strategy, stream, state = session.strategy, session.stream, session.state
    t0 = time.perf_counter()
    experiences = stream.train_stream if session.whole_stream else stream.train_stream[i]
    strategy.train(experiences, **session.loader_kwargs)
    state.train_seconds.append(time.perf_counter() - t0)
    if state.train_images is not None:
        trained = getattr(strategy, "trained_last_experience", True)
        parts = experiences if session.whole_stream else [experiences]
        epochs = session.prep.config.epochs
        state.train_images.append(epochs * sum(len(e.dataset) for e in parts) if trained else 0)
    state.rows.append(session.evaluate())
    if not session.whole_stream:
        state.within.append(_within(session, i))
    state.histories = {k: p.history for k, p in checkpointable_plugins(strategy).items()}
    state.clock = {k: v for k, v in vars(strategy.clock).items() if type(v) is int}


def _save_step(session: Session, i: int) -> None:
    """Checkpoint ``i``: the model, every checkpointable plugin's tensors, the run state."""
    strategy = session.strategy
    save_checkpoint(
        session.out / "checkpoints",
        i,
        model=strategy.model,
        plugin_states={k: p.state_dict() for k, p in checkpointable_plugins(strategy).items()},
        state=dict(dataclasses.asdict(session.state), config=session.prep.config.to_dict()),
    )


def _log_step(session: Session) -> None:
    """TensorBoard scalars of the step just done, on the per-experience axis.

    Their step is the number of training steps done (1 after the first experience), not
    Avalanche's training iterations: curves of strategies that run different numbers of
    iterations line up, and an experience without any SGD step still gets its own point.
    Everything up to it is flushed before the checkpoint says the step is done.
    """
    from avalanche.evaluation.metric_results import MetricValue

    cfg, strategy = session.prep.config, session.strategy
    scalars = experience_scalars(
        session.matrix(), session.state.baseline, cfg.scenario, cfg.head, joint=session.whole_stream
    )
    for plugin in checkpointable_plugins(strategy).values():
        scalars.update(plugin.scalars())
    step = len(session.state.rows)
    # None is undefined (e.g. forgetting after one experience), not 0: not logged.
    values = [MetricValue(None, k, float(v), step) for k, v in scalars.items() if v is not None]
    if session.experience_logger is not None:
        session.experience_logger.log_metrics(values)
        session.experience_logger.flush()
    if session.logger is not None:
        session.logger.flush()


def _within(session: Session, i: int) -> float:
    """Accuracy on test experience ``i`` with logits restricted to its classes."""
    from cl_hres.forward_transfer import within_accuracy

    cfg, stream = session.prep.config, session.stream
    classes = sorted(int(c) for c in stream.train_stream[i].classes_in_this_experience)
    return within_accuracy(
        session.strategy.model,
        stream.test_stream[i],
        classes,
        device=cfg.device,
        batch_size=cfg.eval_batch_size,
    )
