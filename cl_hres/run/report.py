"""The report stage of a run: forward transfer against references, ``results.json``, plot.

The plugins with state contribute their own entries (``null_space``, ``feature_drift``,
...) through :meth:`~cl_hres.avalanche.protocols.CheckpointablePlugin.results`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_hres import distributed
from cl_hres.fileio import atomic_write_text
from cl_hres.reporting.metrics import summarise
from cl_hres.run.config import RunConfig
from cl_hres.run.context import RunContext, make_strategy
from cl_hres.run.prepare import seed_everything

__all__ = ["build_results", "forward_transfer_against_references", "report"]

# Entries a plugin fills in when the strategy has it (null otherwise), so that every
# results.json has the same keys.
PLUGIN_RESULTS = ("null_space", "feature_drift", "final_feature_drift")


def report(ctx: RunContext, *, reference_cache: Path) -> dict[str, Any]:
    """Report stage: forward transfer, then ``results.json`` and the forgetting plot.

    Args:
        ctx: A ctx whose loop has finished.
        reference_cache: Folder of the forward-transfer reference cache.

    Returns:
        The results (on every rank; only rank 0 writes them).
    """
    from cl_hres.reporting.plots import plot_forgetting_curves

    transfer = None
    if ctx.pristine is not None:
        transfer = forward_transfer_against_references(ctx, reference_cache)
    results = build_results(ctx, transfer)
    if distributed.rank() != 0:
        return results
    cfg = ctx.prep.config
    atomic_write_text(ctx.out / "results.json", json.dumps(results, indent=1))
    plot_forgetting_curves(
        results["accuracy_matrix"],
        ctx.out / "forgetting_curves.png",
        f"{cfg.strategy} on {cfg.benchmark} ({cfg.scenario}-incremental)",
    )
    return results


def _experience_domains(prep: Any) -> list[str] | None:
    """The domain of each experience's classes (data that names domains), else None."""
    data = prep.data
    if data.domain_of_class is None:
        return None
    names, out, start = data.domain_names, [], 0
    for size in prep.classes_per_experience:
        ids = sorted({data.domain_of_class[c] for c in prep.class_order[start : start + size]})
        out.append("+".join(names[i] if names else str(i) for i in ids))
        start += size
    return out


def build_results(ctx: RunContext, transfer: dict[str, Any] | None) -> dict[str, Any]:
    """The content of ``results.json``."""
    from cl_hres.avalanche.protocols import checkpointable_plugins

    prep, state, model = ctx.prep, ctx.state, ctx.strategy.model
    cfg = prep.config
    # Cells of experiences not trained yet are null, not 0 (see mask_untrained).
    r = ctx.matrix()
    plugin_results: dict[str, Any] = dict.fromkeys(PLUGIN_RESULTS)
    for plugin in checkpointable_plugins(ctx.strategy).values():
        plugin_results.update(plugin.results())
    return {
        "strategy": cfg.strategy,
        "benchmark": cfg.benchmark,
        "scenario": cfg.scenario,
        "seed": cfg.seed,
        "experiences": prep.experiences,
        "class_order": prep.class_order,
        "classes_per_experience": prep.classes_per_experience,
        "experience_domains": _experience_domains(prep),
        "evaluation_split": "validation" if cfg.validation else "test",
        "backbone": prep.backbone_info,
        "data_config": prep.data_config,
        "head_protocol": _head_protocol(ctx),
        "accuracy_matrix": r,
        **summarise(r, state.baseline, cfg.scenario, cfg.head),
        "untrained_accuracy": state.baseline,
        # Forward transfer as every table reports it: learned in the stream vs alone.
        "fwt": transfer["mean"] if transfer else None,
        "forward_transfer": transfer,
        "trainable_parameters": {
            "adapter_total": model.adapter_parameter_count_total(),
            "adapter_last_experience": model.adapter_parameter_count(),
            "head": model.train_head.weight.numel() + model.train_head.bias.numel(),
        },
        **plugin_results,
        "timing": _timing(ctx),
        "config": cfg.to_dict(),
        "versions": _versions(),
        "world_size": distributed.world_size(),
    }


def _timing(ctx: RunContext) -> dict[str, Any]:
    state, cfg = ctx.state, ctx.prep.config
    if state.train_images is not None:
        train_images = sum(state.train_images)
        # The rate over the steps that trained: the others ran no SGD step.
        seconds = sum(s for s, n in zip(state.train_seconds, state.train_images) if n)
    else:  # resumed from a checkpoint that did not record them: nominal, every epoch
        train_images = cfg.epochs * sum(len(exp.dataset) for exp in ctx.stream.train_stream)
        seconds = sum(state.train_seconds)
    return {
        "train_seconds": sum(state.train_seconds),
        "per_experience": state.train_seconds,
        # Images through training steps (all epochs) and their rate over the seconds of
        # the steps that ran any.
        "train_images": train_images,
        "stepping_seconds": seconds,
        "train_images_per_s": train_images / max(seconds, 1e-9),
        # This call of execute, start to results (a resumed run: since resuming).
        "wall_seconds": time.perf_counter() - ctx.started_at,
        "loader": ctx.loader.to_dict(),
    }


def _head_protocol(ctx: RunContext) -> dict[str, Any]:
    cfg, model = ctx.prep.config, ctx.strategy.model
    return {
        "head": cfg.head,
        "features": "[pretrained, adapted]" if cfg.head_reads_pretrained() else "adapted",
        "train_head": "linear head, cross-entropy restricted to the classes of the experience",
        "task_incremental": "logits restricted to the task's classes (one head per task)"
        if cfg.scenario == "task"
        else None,
        "class_incremental": "all classes seen, no task id" if cfg.scenario == "class" else None,
        "ridge_chosen": {k: getattr(h, "chosen_ridge", None) for k, h in model.stats_heads.items()}
        or None,
    }


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


def forward_transfer_against_references(ctx: RunContext, cache_dir: Path) -> dict[str, Any]:
    """Forward transfer against references that learn each experience alone (cached).

    A reference is the strategy's method family trained on one experience from the
    pristine backbone; references are cached in ``cache_dir`` and shared by runs of the
    same family and settings.
    """
    from cl_hres.reporting.forward_transfer import (
        ReferenceCache,
        forward_transfer_summary,
        method_family,
        reference_accuracies,
    )

    prep, stream = ctx.prep, ctx.stream
    cfg = prep.config
    # prepare() recorded the stream's concat_pretrained explicitly, so the reference reads
    # the same features as the stream whatever its own strategy's default.
    ref_cfg = RunConfig.from_dict(
        dict(cfg.to_dict(), strategy=method_family(cfg.strategy), fwt_reference=False)
    )

    def train_alone(j: int) -> torch.nn.Module:
        ref = dataclasses.replace(prep, config=ref_cfg, backbone=copy.deepcopy(ctx.pristine))
        # Seeded as the stream's run is (before building the strategy and before training),
        # so experience 0 learned alone is learned exactly as the stream learns it.
        seed_everything(cfg.seed)
        strategy, _ = make_strategy(ref, None)
        seed_everything(cfg.seed)
        strategy.train(stream.train_stream[j], **ctx.loader_kwargs)
        return strategy.model

    # Every rank reads the same snapshot of the cache, so all train the same references.
    distributed.barrier()
    cache = ReferenceCache(cache_dir / "fwt_reference.json", write=distributed.rank() == 0)
    reference = reference_accuracies(
        train_stream=stream.train_stream,
        test_stream=stream.test_stream,
        config=cfg.to_dict(),
        weights_id=str(prep.backbone_info.get("sha256", prep.backbone_info["weights"])),
        cache=cache,
        train_alone=train_alone,
        device=cfg.device,
        batch_size=cfg.eval_batch_size,
    )
    return forward_transfer_summary(ctx.state.within, reference)
