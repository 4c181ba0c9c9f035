"""The task-stream driver behind ``cl-hres run`` and ``cl-hres compare``, in stages.

1. **prepare** (:func:`prepare`): validates the configuration, loads the data and builds
   the backbone without touching the output directory, so bad input costs seconds and
   leaves ``--out`` as it was (:func:`check_output_dir` refuses to clobber results).
2. **start and restore** (:mod:`cl_hres.run_session`): builds the stream and the strategy,
   readies ``--out``, then restores the last checkpoint or measures the untrained model.
3. **train–evaluate loop** (:mod:`cl_hres.run_loop`): trains experience by experience,
   evaluating on the whole test stream after each one (a row of ``R``), logging to
   TensorBoard and writing an atomic checkpoint.
4. **report** (:mod:`cl_hres.run_report`): forward transfer against references,
   ``results.json`` and ``forgetting_curves.png``.

:func:`execute` runs stages 2 to 4; :func:`run` all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cl_hres import distributed
from cl_hres.benchmarks import BENCHMARKS, load_benchmark_data
from cl_hres.checkpoint import latest_checkpoint, load_checkpoint
from cl_hres.data import SplitData
from cl_hres.errors import CheckpointError, ConfigError
from cl_hres.run_config import RunConfig
from cl_hres.run_session import OUTPUT_FILES, holds_results, seed_everything

__all__ = ["OUTPUT_FILES", "Prepared", "check_output_dir", "execute", "prepare", "run"]


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


def prepare(config: RunConfig) -> Prepared:
    """Validates ``config`` against the data and builds the backbone; writes nothing."""
    from cl_hres.backbones import create_backbone, describe_weights
    from cl_hres.batch_transforms import precompute_in_memory
    from cl_hres.transforms import build_transforms, resolve_data_config

    config.validate()
    # Recorded explicitly: "unset" would mean another thing to a later version whose
    # strategy default differs (a resumed or analysed run must rebuild the same head).
    config.concat_pretrained = config.head_reads_pretrained()
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
    # Unaugmented in-memory data: the evaluation transform once, in batches, instead of
    # once per image and pass (identical numbers; cl_hres.batch_transforms).
    precomputed = precompute_in_memory(data, data_config, augment)
    if precomputed is not None:
        data, transforms = precomputed
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
    from cl_hres.run_loop import train_and_evaluate
    from cl_hres.run_report import report
    from cl_hres.run_session import restore, start

    started_at = time.perf_counter()
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    loaded = load_checkpoint(checkpoint, prep.config.to_dict()) if checkpoint else None
    # On resume, events an interrupted run logged after the checkpoint's step are purged.
    purge_step = loaded[0]["clock"].get("train_iterations", 0) + 1 if loaded else None
    experience_purge_step = len(loaded[0]["rows"]) + 1 if loaded else None
    fresh = loaded is None and (overwrite or not holds_results(out))
    session = start(
        prep,
        out,
        fresh=fresh,
        purge_step=purge_step,
        experience_purge_step=experience_purge_step,
        started_at=started_at,
    )
    restore(session, loaded)
    train_and_evaluate(session, progress=progress)
    return report(session, reference_cache=reference_cache or out)


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
