"""A run once its input is valid: the ctx, and the start and restore stages.

A :class:`RunContext` holds what the stages after ``prepare`` share: the stream, the strategy
(with its evaluator and TensorBoard logger), the output directory and the
:class:`RunState` that the checkpoints carry. :func:`start` builds it and readies the
output directory; :func:`restore` brings it back from a checkpoint, or seeds a fresh
start and measures the untrained model. The train–evaluate loop is in
:mod:`cl_hres.run.loop`, the report in :mod:`cl_hres.run.report`.

The stages name no strategy and no plugin: a strategy that learns the whole stream in one
``train`` call says so (``trains_whole_stream``), and the plugins with state to keep are
the :class:`~cl_hres.avalanche.protocols.CheckpointablePlugin` s among ``strategy.plugins``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cl_hres import distributed
from cl_hres.avalanche.protocols import checkpointable_plugins
from cl_hres.errors import CheckpointError
from cl_hres.fileio import atomic_write_text
from cl_hres.reporting.metrics import accuracy_row_from_results, mask_untrained
from cl_hres.run.checkpoint import (
    load_model_state,
    prefixed,
    rebuild_structure,
    restore_rng,
)
from cl_hres.run.prepare import OUTPUT_FILES, Prepared, seed_everything

if TYPE_CHECKING:
    from cl_hres.avalanche.tensorboard import RunTensorboardLogger
    from cl_hres.data.loaders import LoaderSettings

__all__ = ["RunContext", "RunState", "make_strategy", "restore", "start"]


def make_strategy(
    prep: Prepared, tb_dir: Path | None, *, purge_step: int | None = None
) -> tuple[Any, RunTensorboardLogger | None]:
    """The configured strategy over ``prep.backbone`` and its TensorBoard logger.

    Args:
        prep: The prepared run.
        tb_dir: Directory of the event files; None: no TensorBoard (reference runs).
        purge_step: Passed to :class:`~cl_hres.avalanche.tensorboard.RunTensorboardLogger`.

    Returns:
        ``(strategy, logger)``; the logger is None off rank 0 or without ``tb_dir``.
    """
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from cl_hres.avalanche import FiniteLossPlugin
    from cl_hres.avalanche.strategies import strategy_class
    from cl_hres.avalanche.tensorboard import RunTensorboardLogger

    cfg = prep.config
    # Only rank 0 writes TensorBoard events; the event file is opened on the first event.
    logger = (
        RunTensorboardLogger(tb_dir, purge_step=purge_step)
        if distributed.rank() == 0 and tb_dir is not None
        else None
    )
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        loss_metrics(epoch=True),
        loggers=[logger] if logger else [],
    )
    strategy = strategy_class(cfg.strategy)(
        model=prep.backbone,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        train_mb_size=cfg.batch_size,
        train_epochs=cfg.epochs,
        eval_mb_size=cfg.eval_batch_size,
        device=cfg.device,
        evaluator=evaluator,
        head=cfg.head,
        ridge=cfg.ridge_value(),
        ridge_projection=cfg.ridge_projection,
        balanced_head=cfg.balanced_head,
        drift_compensation=cfg.drift_compensation,
        concat_pretrained=cfg.concat_pretrained,
        method_config=cfg.method_config(),
        nsp_config=cfg.nsp_config(),
        num_classes=prep.data.num_classes,
        seed=cfg.seed,
        bf16=cfg.bf16,
        plugins=[FiniteLossPlugin()],
    )
    return strategy, logger


@dataclass
class RunState:
    """What a checkpoint carries besides tensors (saved as JSON, in this field order).

    Attributes:
        rows: Rows of ``R`` so far (one per finished training step).
        baseline: Accuracy of the untrained model per experience (task-incremental only).
        train_seconds: Training time per step.
        histories: Each checkpointable plugin's history, by checkpoint key.
        clock: Avalanche's integer clock counters (TensorBoard steps continue on resume).
        within: Accuracy on each trained experience with logits restricted to its classes.
        train_images: Images through training steps per step (0 where the strategy ran
            no step: nothing but the training head would have learned).
    """

    rows: list[list[float]] = field(default_factory=list)
    baseline: list[float] | None = None
    train_seconds: list[float] = field(default_factory=list)
    histories: dict[str, list[dict]] = field(default_factory=dict)
    clock: dict[str, int] = field(default_factory=dict)
    within: list[float] = field(default_factory=list)
    train_images: list[int] | None = field(default_factory=list)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> RunState:
        """The state of a checkpoint's ``state.json``.

        ``train_images`` is None in checkpoints written before it was recorded.
        """
        fields = {f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved}
        return cls(**{"train_images": None, **fields})


@dataclass
class RunContext:
    """A run under way: what the stages after ``prepare`` share.

    Attributes:
        prep: The prepared run.
        out: Output directory.
        stream: The Avalanche benchmark (train and test streams).
        strategy: The strategy; its model is ``strategy.model``.
        logger: TensorBoard logger of Avalanche's metrics, whose step is the training
            iteration (rank 0 only, else None).
        pristine: A copy of the backbone before any training, for forward-transfer
            references (None when the run has none).
        loader: DataLoader settings of every loader of the run (:mod:`cl_hres.data.loaders`).
        started_at: ``time.perf_counter()`` when this call of ``execute`` began.
        state: What the checkpoints carry.
        test_sizes: Images per test experience (to combine accuracies over ranks).
        experience_logger: TensorBoard logger of the per-experience scalars (``cl/``,
            ``nsp/``, ``drift/``), whose step is the number of training steps done, in
            ``tensorboard/experiences`` (rank 0 only, else None).
    """

    prep: Prepared
    out: Path
    stream: Any
    strategy: Any
    logger: RunTensorboardLogger | None
    pristine: torch.nn.Module | None
    loader: LoaderSettings
    started_at: float
    state: RunState = field(default_factory=RunState)
    test_sizes: list[int] = field(default_factory=list)
    experience_logger: RunTensorboardLogger | None = None

    @property
    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``strategy.train`` / ``strategy.eval`` for the loaders."""
        return self.loader.strategy_kwargs()

    @property
    def whole_stream(self) -> bool:
        """The strategy learns every experience in one ``train`` call (joint)."""
        return self.strategy.trains_whole_stream

    @property
    def steps(self) -> int:
        """Training steps of the run: one per experience, or one for the whole stream."""
        return 1 if self.whole_stream else self.prep.experiences

    def evaluate(self) -> list[float]:
        """A row of ``R``: accuracy on every test experience, combined over ranks."""
        results = self.strategy.eval(self.stream.test_stream, **self.loader_kwargs)
        row = accuracy_row_from_results(results, self.prep.experiences)
        return distributed.gather_accuracy(row, self.test_sizes)

    def matrix(self) -> list[list[float | None]]:
        """``R`` so far, with null cells for experiences not trained yet."""
        cfg = self.prep.config
        return mask_untrained(self.state.rows, cfg.scenario, cfg.head, joint=self.whole_stream)


def _stream(prep: Prepared) -> Any:
    """The run's Avalanche benchmark, in the class order prepared (and recorded)."""
    from cl_hres.data.streams import build_stream

    cfg = prep.config
    return build_stream(
        prep.data,
        experiences=cfg.experiences,
        scenario=cfg.scenario,
        seed=cfg.seed,
        transforms=prep.transforms,
        class_order=prep.class_order,
        initial_classes=cfg.initial_classes,
        increment=cfg.increment,
    )


def start(
    prep: Prepared,
    out: Path,
    *,
    fresh: bool,
    purge_step: int | None = None,
    experience_purge_step: int | None = None,
    started_at: float | None = None,
    before_writing: Callable[[], object] | None = None,
) -> RunContext:
    """Chooses the loaders, builds the stream and the strategy, then readies ``out`` (rank 0).

    Nothing in ``out`` is touched before the stream is built and the strategy
    constructed: a run that fails there (e.g. a test split missing a class) leaves no
    trace.

    Args:
        prep: The prepared run.
        out: Output directory.
        fresh: No checkpoint is resumed: outputs of earlier runs are replaced.
        purge_step: First TensorBoard step to purge (events logged after the checkpoint).
        experience_purge_step: The same for the per-experience events.
        started_at: When the run (this call of ``execute``) began; default now.
        before_writing: Called on every rank just before ``out`` is first written (the
            runner takes the output lock there).
    """
    from cl_hres.data.loaders import apply_threads, resolve_loader_settings

    started_at = time.perf_counter() if started_at is None else started_at
    cfg = prep.config
    # Workers and threads chosen together (cl_hres.data.loaders), for every loader of the run.
    loader = resolve_loader_settings(cfg.num_workers, device=cfg.device, kind=prep.data.kind)
    apply_threads(loader)
    seed_everything(cfg.seed)
    stream = _stream(prep)
    # The references of forward transfer start from the backbone as it is now. A run on
    # the whole stream at once has no experience learned in the stream to compare.
    wants_references = cfg.fwt_reference and not cfg.spec.trains_whole_stream
    pristine = copy.deepcopy(prep.backbone) if wants_references else None
    # The logger opens its event file on the first event: nothing is written yet.
    strategy, logger = make_strategy(prep, out / "tensorboard", purge_step=purge_step)
    if before_writing is not None:
        before_writing()
    if distributed.rank() == 0:
        _ready_output_dir(out, cfg.to_dict(), fresh=fresh)
    sizes = [len(exp.dataset) for exp in stream.test_stream]
    return RunContext(
        prep,
        out,
        stream,
        strategy,
        logger,
        pristine,
        loader,
        started_at,
        test_sizes=sizes,
        experience_logger=_experience_logger(out, logger, experience_purge_step),
    )


def _experience_logger(
    out: Path, logger: RunTensorboardLogger | None, purge_step: int | None
) -> RunTensorboardLogger | None:
    """The per-experience TensorBoard logger (where the run logs at all: rank 0).

    Per-experience curves get their own axis (experiences learned), so strategies compare
    point by point and experiences without an SGD step (aper, linear) still advance it.
    """
    from cl_hres.avalanche.tensorboard import RunTensorboardLogger

    if logger is None:
        return None
    return RunTensorboardLogger(out / "tensorboard" / "experiences", purge_step=purge_step)


def _ready_output_dir(out: Path, config: dict[str, Any], *, fresh: bool) -> None:
    """Clears what a fresh run replaces and writes ``config.json``.

    A fresh start replaces what ``--overwrite`` names, or what a run that failed before its
    first checkpoint left (stale ``config.json``, TensorBoard events); ``check_output_dir``
    has refused a fresh start over results without ``--overwrite``.
    """
    if fresh:
        for name in OUTPUT_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(config, indent=1))


def restore(ctx: RunContext, loaded: tuple[dict, dict, dict] | None) -> None:
    """Restore stage: the checkpoint's model, plugins, RNG and clock, or a fresh start.

    A fresh start is seeded; a task-incremental one measures the untrained model first
    (``b_j`` of forward transfer).

    Args:
        ctx: From :func:`start`.
        loaded: From :func:`cl_hres.run.checkpoint.load_checkpoint`, or None.
    """
    cfg, strategy = ctx.prep.config, ctx.strategy
    model = strategy.model
    if loaded is None:
        seed_everything(cfg.seed)
        if cfg.scenario == "task":
            with _every_task_head(model, ctx.stream.test_stream):
                ctx.state.baseline = ctx.evaluate()
        return
    saved, model_tensors, extra = loaded
    rebuild_structure(model, saved["structure"])
    load_model_state(model, model_tensors)
    model.to(cfg.device)
    for key, plugin in checkpointable_plugins(strategy).items():
        if key not in saved["histories"]:
            raise CheckpointError(f"checkpoint holds no state of the {key!r} plugin")
        plugin.load_state_dict(prefixed(extra, key), saved["histories"][key], strategy)
    restore_rng(extra, saved["rng"])
    ctx.state = RunState.from_saved(saved)
    # Avalanche's counters: TensorBoard steps and experience numbers continue.
    for name, value in ctx.state.clock.items():
        setattr(strategy.clock, name, value)


@contextmanager
def _every_task_head(model: torch.nn.Module, test_stream) -> Iterator[None]:
    """The untrained model with one head per task of ``test_stream``, for a measurement."""
    before = model.task_classes
    model.task_classes = dict(before)
    for exp in test_stream:
        model.task_classes[exp.task_label] = sorted(exp.classes_in_this_experience)
    try:
        yield
    finally:
        model.task_classes = before
