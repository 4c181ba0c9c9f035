"""The task-stream driver behind ``cl-hres run`` and ``cl-hres compare``.

A run goes in two phases. :func:`prepare` validates the configuration, loads the data and
builds the backbone without touching the output directory, so bad input costs seconds
and leaves ``--out`` as it was. :func:`execute` then trains experience by experience,
evaluating on the whole test stream after each one (a row of ``R``) and writing an
atomic checkpoint, and finally writes ``results.json``, TensorBoard events and
``forgetting_curves.png``.
"""

from __future__ import annotations

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
from cl_hres.metrics import accuracy_row_from_results, summarise
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
    """Everything validated and loaded before any output is written."""

    config: RunConfig
    data: SplitData
    backbone: torch.nn.Module
    experiences: int


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare(config: RunConfig) -> Prepared:
    """Validates ``config`` against the data and builds the backbone; writes nothing."""
    from cl_hres.backbones import create_backbone

    config.validate()
    config.check_device()
    spec = BENCHMARKS.get(config.benchmark)
    data = load_benchmark_data(
        config.benchmark,
        data_root=config.data_root,
        image_size=config.img_size,
        validation=config.validation,
        seed=config.seed,
    )
    experiences = config.experiences or (spec.experiences if spec else min(5, data.num_classes))
    if experiences > data.num_classes:
        raise ConfigError(
            f"{experiences} experiences need at least as many classes; {data.name} has {data.num_classes}"
        )
    config.experiences = experiences
    kwargs = config.backbone_arguments(data.image_size, data.channels)
    seed_everything(config.seed)
    backbone = create_backbone(
        config.backbone, pretrained=config.pretrained, weights=config.weights, **kwargs
    )
    patch = backbone.patch_embed.patch_size
    patch = patch if isinstance(patch, tuple) else (patch, patch)
    if kwargs["img_size"] % patch[0]:
        raise ConfigError(
            f"image size {kwargs['img_size']} is not a multiple of the backbone's patch size "
            f"{patch[0]}; pass --img-size or backbone_kwargs: {{patch_size: ...}} in --config"
        )
    if config.backbone_kwargs is None:
        config.backbone_kwargs = {
            k: v for k, v in kwargs.items() if k not in ("img_size", "in_chans")
        }
    config.img_size = kwargs["img_size"]
    return Prepared(config, data, backbone, experiences)


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses to clobber finished or resumable results unless asked to."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    has_results = out.is_dir() and any((out / name).exists() for name in OUTPUT_FILES)
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


def _make_strategy(prep: Prepared, tb_dir: Path):
    from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
    from avalanche.logging import TensorboardLogger
    from avalanche.training.plugins import EvaluationPlugin

    from cl_hres.plugins import FiniteLossPlugin
    from cl_hres.strategies import STRATEGIES

    cfg = prep.config
    # Only rank 0 writes TensorBoard events.
    logger = TensorboardLogger(tb_log_dir=str(tb_dir)) if distributed.rank() == 0 else None
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
) -> dict[str, Any]:
    """Trains the stream and writes every output into ``out``; returns the results."""
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
    }
    checkpoint = latest_checkpoint(ckpt_dir) if resume else None
    loaded = load_checkpoint(checkpoint, config_dict) if checkpoint else None
    if overwrite and main_rank:
        for name in OUTPUT_FILES:
            target = out / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(
                missing_ok=True
            )
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(config_dict, indent=1))

    seed_everything(cfg.seed)
    bm = build_stream(prep.data, experiences=prep.experiences, scenario=cfg.scenario, seed=cfg.seed)
    strategy, logger = _make_strategy(prep, out / "tensorboard")
    model = strategy.model
    sizes = [len(exp.dataset) for exp in bm.test_stream]

    def evaluate() -> list[float]:
        row = accuracy_row_from_results(strategy.eval(bm.test_stream), prep.experiences)
        return distributed.gather_accuracy(row, sizes)

    joint = cfg.strategy == "joint"
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
        plugins = _stateful_plugins(strategy)
        state["histories"] = {prefix: p.history for prefix, p in plugins.items()}
        state["clock"] = {k: v for k, v in vars(strategy.clock).items() if type(v) is int}
        if main_rank:
            writer = logger.writer
            for j, acc in enumerate(row):
                writer.add_scalar(f"cl/accuracy_exp{j:03d}", acc, i)
            writer.add_scalar("cl/average_accuracy_seen", float(np.mean(row[: i + 1])), i)
            writer.flush()
            save_checkpoint(
                ckpt_dir,
                i,
                model=model,
                plugin_states={prefix: p.state_dict() for prefix, p in plugins.items()},
                state=dict(state, config=config_dict),
            )
        bar.update(1)
        bar.set_postfix(avg_acc=f"{np.mean(row[: i + 1]):.3f}")
    bar.close()
    if logger is not None:
        logger.writer.close()

    r = state["rows"]
    results: dict[str, Any] = {
        "strategy": cfg.strategy,
        "benchmark": cfg.benchmark,
        "scenario": cfg.scenario,
        "seed": cfg.seed,
        "experiences": prep.experiences,
        "evaluation_split": "validation" if cfg.validation else "test",
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
