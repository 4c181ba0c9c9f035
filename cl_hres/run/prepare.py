"""The first stage of a run: validate everything and load the data and backbone, writing nothing.

:func:`prepare` checks the configuration against the data and builds the backbone without
touching the output directory, so bad input costs seconds and leaves ``--out`` as it was;
:func:`check_output_dir` refuses to clobber results.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_hres.data.benchmarks import BENCHMARKS, load_benchmark_data
from cl_hres.data.datasets import SplitData
from cl_hres.data.streams import stream_layout
from cl_hres.errors import CheckpointError, ConfigError
from cl_hres.run.checkpoint import latest_checkpoint
from cl_hres.run.config import RunConfig

__all__ = [
    "OUTPUT_FILES",
    "Prepared",
    "check_output_dir",
    "holds_results",
    "prepare",
    "seed_everything",
]

OUTPUT_FILES = (
    "results.json",
    "config.json",
    "forgetting_curves.png",
    "metrics.csv",
    "tensorboard",
    "checkpoints",
)


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def holds_results(out: Path) -> bool:
    """Whether ``out`` holds a finished run or a resumable checkpoint."""
    return (out / "results.json").exists() or latest_checkpoint(out / "checkpoints") is not None


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
    class_order: list[int]
    classes_per_experience: list[int]
    data_config: dict[str, Any]
    transforms: tuple[Any, Any]
    backbone_info: dict[str, Any]


def _check_room(config: RunConfig, experiences: int) -> None:
    """ConfigError before any training if the method's pool cannot hold the stream.

    Methods with a fixed pool of per-experience parts (DualPrompt, CODA-Prompt) name its
    size as ``max_experiences`` in their config.
    """
    limit = getattr(config.method_config(), "max_experiences", None)
    if limit is not None and experiences > limit:
        raise ConfigError(
            f"{config.strategy} has room for {limit} experiences (its pool), the stream has "
            f"{experiences}: raise its pool size / tasks option"
        )


def _layout(config: RunConfig, data: SplitData) -> tuple[list[int], list[int]]:
    """Class order and classes per experience; fills the benchmark's experience count."""
    if config.experiences is None and config.initial_classes is None and config.increment is None:
        spec = BENCHMARKS.get(config.benchmark)
        config.experiences = spec.experiences if spec else min(5, data.num_classes)
    return stream_layout(
        data,
        experiences=config.experiences,
        seed=config.seed,
        class_order=config.class_order,
        initial_classes=config.initial_classes,
        increment=config.increment,
    )


def prepare(config: RunConfig) -> Prepared:
    """Validates ``config`` against the data and builds the backbone; writes nothing."""
    from cl_hres.data.batch_transforms import precompute_in_memory
    from cl_hres.data.transforms import build_transforms, resolve_data_config
    from cl_hres.nn.backbones import create_backbone, describe_weights

    config.validate()
    # Recorded explicitly: "unset" would mean another thing to a later version whose
    # strategy default differs (a resumed or analysed run must rebuild the same head).
    config.concat_pretrained = config.head_reads_pretrained()
    config.resolve_strategy_defaults()
    config.resolve_device()
    data = load_benchmark_data(
        config.benchmark,
        data_root=config.data_root,
        validation=config.validation,
        seed=config.seed,
    )
    order, sizes = _layout(config, data)
    experiences = len(sizes)
    _check_room(config, experiences)
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
    # Unaugmented in-memory data: the evaluation transform once, in batches, instead of
    # once per image and pass (identical numbers; cl_hres.data.batch_transforms).
    precomputed = precompute_in_memory(data, data_config, augment)
    if precomputed is not None:
        data, transforms = precomputed
    config.img_size = int(size[0])
    return Prepared(
        config,
        data,
        backbone,
        experiences,
        order,
        sizes,
        data_config,
        transforms,
        describe_weights(config.backbone, config.pretrained, config.weights),
    )


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
    has_results = holds_results(out)
    if resume:
        if not (out / "config.json").is_file():
            raise CheckpointError(f"nothing to resume in {out} (no config.json)")
        return
    if has_results and not overwrite:
        raise ConfigError(
            f"{out} already holds results; pass --overwrite to replace them or --resume"
        )
