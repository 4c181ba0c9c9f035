"""The task-stream driver behind ``cl-hres run`` and ``cl-hres compare``.

A run goes in two phases. :func:`prepare` validates the configuration, loads the data and
builds the backbone without touching the output directory, so bad input costs seconds
and leaves ``--out`` as it was. :func:`execute` then trains experience by experience,
evaluating on the whole test stream after each one (a row of ``R``) and writing an
atomic checkpoint, and finally writes ``results.json``, TensorBoard events and
``forgetting_curves.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_hres import distributed
from cl_hres.benchmarks import BENCHMARKS, load_benchmark_data
from cl_hres.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    rebuild_structure,
    restore_rng,
    save_checkpoint,
)
from cl_hres.data import SplitData
from cl_hres.errors import CheckpointError, ConfigError
from cl_hres.metrics import (
    accuracy_row_from_results,
    average_accuracy_seen,
    experience_scalars,
    mask_untrained,
    plugin_scalars,
    summarise,
)
from cl_hres.run_config import RunConfig

__all__ = ["OUTPUT_FILES", "Prepared", "check_output_dir", "execute", "prepare", "run"]

OUTPUT_FILES = (
    "results.json",
    "config.json",
    "forgetting_curves.png",
    "tensorboard",
    "checkpoints",
)


@dataclass
class Prepared:
    """Everything validated and loaded before any output is written.

    Attributes:
        data_config: The input pipeline resolved from the backbone's pretrained config
            (size, mean, std, interpolation, crop, augmentation), recorded in results.json.
        transforms: ``(train, eval)`` transforms built from ``data_config``.
        backbone_info: Which weights the backbone carries and where they came from.
    """

    config: RunConfig
    data: SplitData
    backbone: torch.nn.Module
    experiences: int
    data_config: dict[str, Any]
    transforms: tuple[Any, Any]
    backbone_info: dict[str, Any]


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(config: RunConfig) -> Prepared:
    """Validates ``config`` against the data and builds the backbone; writes nothing."""
    from cl_hres.backbones import create_backbone, describe_weights
    from cl_hres.transforms import build_transforms, resolve_data_config

    config.validate()
    config.check_device()
    spec = BENCHMARKS.get(config.benchmark)
    data = load_benchmark_data(
        config.benchmark,
        data_root=config.data_root,
        validation=config.validation,
        seed=config.seed,
    )
    experiences = config.experiences or (spec.experiences if spec else min(5, data.num_classes))
    if experiences > data.num_classes:
        raise ConfigError(
            f"{experiences} experiences need at least as many classes; {data.name} has {data.num_classes}"
        )
    config.experiences = experiences
    kwargs = config.backbone_arguments(data.channels)
    seed_everything(config.seed)
    backbone = create_backbone(
        config.backbone, pretrained=config.pretrained, weights=config.weights, **kwargs
    )
    patch = backbone.patch_embed.patch_size
    patch = patch if isinstance(patch, tuple) else (patch, patch)
    size = backbone.patch_embed.img_size
    size = size if isinstance(size, tuple) else (size, size)
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ConfigError(
            f"image size {size[0]} is not a multiple of the backbone's patch size {patch[0]}; "
            "pass another --img-size"
        )
    data_config = resolve_data_config(backbone, data.channels)
    augment = data.augment if config.augment == "auto" else config.augment
    data_config["augment"] = augment
    transforms = build_transforms(data_config, kind=data.kind, augment=augment)
    config.img_size = int(size[0])
    return Prepared(
        config,
        data,
        backbone,
        experiences,
        data_config,
        transforms,
        describe_weights(config.backbone, config.pretrained, config.weights),
    )


def _holds_results(out: Path) -> bool:
    """Whether ``out`` holds a finished run or a resumable checkpoint."""
    return (out / "results.json").exists() or latest_checkpoint(out / "checkpoints") is not None


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses to clobber finished or resumable results unless asked to.

    Results are ``results.json`` or a finished checkpoint. What a run that failed before
    its first checkpoint left (``config.json``, TensorBoard events) is no result: the next
    run replaces it, with or without ``--resume``.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    has_results = _holds_results(out)
    if resume:
        if not (out / "config.json").is_file():
            raise CheckpointError(f"nothing to resume in {out} (no config.json)")
        return
    if has_results and not overwrite:
        raise ConfigError(
            f"{out} already holds results; pass --overwrite to replace them or --resume"
        )


def _versions() -> dict[str, str]:
    import avalanche
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "avalanche": getattr(avalanche, "__version__", "unknown"),
        "numpy": np.__version__,
    }


def _make_strategy(prep: Prepared, tb_dir: Path | None, *, purge_step: int | None = None):
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from cl_hres.plugins import FiniteLossPlugin
    from cl_hres.strategies import STRATEGIES
    from cl_hres.tb_logger import RunTensorboardLogger

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
    strategy = STRATEGIES[cfg.strategy](
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
        drift_compensation=cfg.drift_compensation,
        method_config=cfg.method_config(),
        nsp_config=cfg.nsp_config(),
        num_classes=prep.data.num_classes,
        seed=cfg.seed,
        bf16=cfg.bf16,
        plugins=[FiniteLossPlugin()],
    )
    return strategy, logger


def _stateful_plugins(strategy) -> dict[str, Any]:
    """The strategy's plugins with checkpointed tensors and history, by key prefix."""
    plugins = {"drift": strategy.drift_plugin}
    if strategy.nsp_plugin is not None:
        plugins["nsp"] = strategy.nsp_plugin
    return plugins


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
    from tqdm import tqdm

    from cl_hres.benchmarks import build_stream
    from cl_hres.plots import plot_forgetting_curves

    cfg = prep.config
    main_rank = distributed.rank() == 0
    config_dict = cfg.to_dict()
    ckpt_dir = out / "checkpoints"
    state: dict[str, Any] = {
        "rows": [],
        "baseline": None,
        "train_seconds": [],
        "histories": {},
        "clock": {},
        "within": [],
    }
    checkpoint = latest_checkpoint(ckpt_dir) if resume else None
    loaded = load_checkpoint(checkpoint, config_dict) if checkpoint else None

    # Nothing in `out` is touched before the stream is built and the strategy constructed:
    # a run that fails here (e.g. a test split missing a class) leaves no trace.
    seed_everything(cfg.seed)
    bm = build_stream(
        prep.data,
        experiences=prep.experiences,
        scenario=cfg.scenario,
        seed=cfg.seed,
        transforms=prep.transforms,
    )
    # On resume, events an interrupted run logged after the checkpoint's step are purged.
    purge_step = loaded[0]["clock"].get("train_iterations", 0) + 1 if loaded else None
    joint = cfg.strategy == "joint"
    # The references of forward transfer start from the backbone as it is now.
    pristine = copy.deepcopy(prep.backbone) if cfg.fwt_reference and not joint else None
    strategy, logger = _make_strategy(prep, out / "tensorboard", purge_step=purge_step)
    model = strategy.model
    if main_rank:
        if loaded is None and (overwrite or not _holds_results(out)):
            # A fresh start replaces what --overwrite names, or what a run that failed
            # before its first checkpoint left (stale config.json, TensorBoard events).
            for name in OUTPUT_FILES:
                target = out / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(
                    missing_ok=True
                )
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(config_dict, indent=1))
    sizes = [len(exp.dataset) for exp in bm.test_stream]

    def evaluate() -> list[float]:
        row = accuracy_row_from_results(strategy.eval(bm.test_stream), prep.experiences)
        return distributed.gather_accuracy(row, sizes)

    steps = 1 if joint else prep.experiences
    if loaded is not None:
        saved, model_tensors, extra = loaded
        rebuild_structure(model, saved["structure"])
        model.load_state_dict(model_tensors)
        model.to(cfg.device)
        for prefix, plugin in _stateful_plugins(strategy).items():
            plugin.load_state_dict(
                {k[len(prefix) + 1 :]: v for k, v in extra.items() if k.startswith(f"{prefix}.")},
                saved["histories"][prefix],
                strategy,
            )
        restore_rng({k: v for k, v in extra.items() if k.startswith("rng.")}, saved["rng"])
        state = {k: saved[k] for k in state}
        # Avalanche's counters: TensorBoard steps and experience numbers continue.
        for name, value in state["clock"].items():
            setattr(strategy.clock, name, value)
    else:
        seed_everything(cfg.seed)
        if cfg.scenario == "task":
            # b_j for FWT: the untrained model with one head per task.
            for exp in bm.test_stream:
                model.task_classes[exp.task_label] = sorted(exp.classes_in_this_experience)
            state["baseline"] = evaluate()
            model.task_classes = {}

    start = len(state["rows"])
    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"{cfg.strategy}",
        unit="exp",
        disable=not (progress and main_rank),
        file=sys.stderr,
    )
    for i in range(start, steps):
        t0 = time.perf_counter()
        strategy.train(bm.train_stream if joint else bm.train_stream[i])
        state["train_seconds"].append(time.perf_counter() - t0)
        row = evaluate()
        state["rows"].append(row)
        if not joint:
            state["within"].append(_within(prep, model, bm, i))
        plugins = _stateful_plugins(strategy)
        state["histories"] = {prefix: p.history for prefix, p in plugins.items()}
        state["clock"] = {k: v for k, v in vars(strategy.clock).items() if type(v) is int}
        r_so_far = mask_untrained(state["rows"], cfg.scenario, cfg.head, joint=joint)
        if main_rank:
            # Same step as Avalanche's metrics of this evaluation: training iterations.
            step = strategy.clock.train_iterations
            logger.log_scalars(
                experience_scalars(
                    r_so_far, state["baseline"], cfg.scenario, cfg.head, joint=joint
                ),
                step,
            )
            histories = state["histories"]
            logger.log_scalars(
                plugin_scalars(
                    (histories.get("nsp") or [None])[-1], (histories["drift"] or [None])[-1]
                ),
                step,
            )
            # Everything up to this step is on disk before the checkpoint says it is done.
            logger.flush()
            save_checkpoint(
                ckpt_dir,
                i,
                model=model,
                plugin_states={prefix: p.state_dict() for prefix, p in plugins.items()},
                state=dict(state, config=config_dict),
            )
        bar.update(1)
        bar.set_postfix(avg_acc=f"{average_accuracy_seen(r_so_far, joint=joint):.3f}")
    bar.close()
    if logger is not None:
        logger.close()

    transfer = None
    if pristine is not None:
        transfer = _forward_transfer(prep, pristine, bm, state["within"], reference_cache or out)
    # Cells of experiences not trained yet are null, not 0 (see mask_untrained).
    r = mask_untrained(state["rows"], cfg.scenario, cfg.head, joint=joint)
    results: dict[str, Any] = {
        "strategy": cfg.strategy,
        "benchmark": cfg.benchmark,
        "scenario": cfg.scenario,
        "seed": cfg.seed,
        "experiences": prep.experiences,
        "evaluation_split": "validation" if cfg.validation else "test",
        "backbone": prep.backbone_info,
        "data_config": prep.data_config,
        "head_protocol": {
            "head": cfg.head,
            "train_head": "linear head, cross-entropy restricted to the classes of the experience",
            "task_incremental": "logits restricted to the task's classes (one head per task)"
            if cfg.scenario == "task"
            else None,
            "class_incremental": "all classes seen, no task id"
            if cfg.scenario == "class"
            else None,
            "ridge_chosen": {
                k: getattr(h, "chosen_ridge", None) for k, h in model.stats_heads.items()
            }
            or None,
        },
        "accuracy_matrix": r,
        **summarise(r, state["baseline"], cfg.scenario, cfg.head),
        "untrained_accuracy": state["baseline"],
        "forward_transfer": transfer,
        "trainable_parameters": {
            "adapter_total": model.adapter_parameter_count_total(),
            "adapter_last_experience": model.adapter_parameter_count(),
            "head": model.train_head.weight.numel() + model.train_head.bias.numel(),
        },
        "null_space": state["histories"].get("nsp") or None,
        "feature_drift": state["histories"]["drift"] or None,
        "final_feature_drift": strategy.drift_plugin.final_drift(),
        "timing": {
            "train_seconds": sum(state["train_seconds"]),
            "per_experience": state["train_seconds"],
        },
        "config": config_dict,
        "versions": _versions(),
        "world_size": distributed.world_size(),
    }
    if not main_rank:
        return results
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    plot_forgetting_curves(
        r,
        out / "forgetting_curves.png",
        f"{cfg.strategy} on {cfg.benchmark} ({cfg.scenario}-incremental)",
    )
    return results


def _within(prep: Prepared, model: torch.nn.Module, bm, i: int) -> float:
    """Accuracy on test experience ``i`` with logits restricted to its classes."""
    from cl_hres.forward_transfer import within_accuracy

    classes = sorted(int(c) for c in bm.train_stream[i].classes_in_this_experience)
    cfg = prep.config
    return within_accuracy(
        model, bm.test_stream[i], classes, device=cfg.device, batch_size=cfg.eval_batch_size
    )


def _forward_transfer(
    prep: Prepared, pristine: torch.nn.Module, bm, within: list[float], cache_dir: Path
) -> dict[str, Any]:
    """Forward transfer against references that learn each experience alone (cached)."""
    from cl_hres.forward_transfer import (
        ReferenceCache,
        forward_transfer_summary,
        method_family,
        reference_accuracies,
    )

    cfg = prep.config
    ref_cfg = RunConfig.from_dict(
        dict(cfg.to_dict(), strategy=method_family(cfg.strategy), fwt_reference=False)
    )

    def train_alone(j: int) -> torch.nn.Module:
        ref = dataclasses.replace(prep, config=ref_cfg, backbone=copy.deepcopy(pristine))
        # Seeded as the stream's run is (before building the strategy and before training),
        # so experience 0 learned alone is learned exactly as the stream learns it.
        seed_everything(cfg.seed)
        strategy, _ = _make_strategy(ref, None)
        seed_everything(cfg.seed)
        strategy.train(bm.train_stream[j])
        return strategy.model

    # Every rank reads the same snapshot of the cache, so all train the same references.
    distributed.barrier()
    cache = ReferenceCache(cache_dir / "fwt_reference.json", write=distributed.rank() == 0)
    reference = reference_accuracies(
        train_stream=bm.train_stream,
        test_stream=bm.test_stream,
        config=cfg.to_dict(),
        weights_id=str(prep.backbone_info.get("sha256", prep.backbone_info["weights"])),
        cache=cache,
        train_alone=train_alone,
        device=cfg.device,
        batch_size=cfg.eval_batch_size,
    )
    return forward_transfer_summary(within, reference)


def join_process_group(config: RunConfig) -> None:
    """Under ``torchrun``, joins the process group and sets this rank's device."""
    # Avalanche builds a logger at import time, which it refuses on a non-main rank once a
    # process group exists: import it before joining the group.
    import cl_hres.strategies  # noqa: F401

    config.device = distributed.init_from_env(config.device)


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
