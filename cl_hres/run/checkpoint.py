"""Per-experience checkpoints: tensors in safetensors, everything else in JSON.

Nothing is ever unpickled. A checkpoint is written into ``exp003.tmp/`` and renamed to
``exp003/`` when complete, so a crash leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cl_hres.errors import CheckpointError
from cl_hres.nn.model import ContinualViT
from cl_hres.run.config import RESUMABLE_KEYS, changed_on_resume

__all__ = [
    "capture_rng",
    "latest_checkpoint",
    "load_checkpoint",
    "prefixed",
    "restore_rng",
    "save_checkpoint",
]

IDENTITY_KEYS = ("benchmark", "strategy", "scenario", "experiences", "backbone", "seed")


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch, numpy and Python RNG states as (tensors, JSON-able values)."""
    np_state = np.random.get_state()
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    py = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state(
        (name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    )
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def model_structure(model: ContinualViT) -> dict[str, Any]:
    """What must be rebuilt before a state dict of ``model`` can be loaded."""
    return {
        "experts": [b.num_experts for b in model.banks],
        # NSP state (covariance, projector) is part of the model's state dict.
        "null_space": any(b.null_space is not None for b in model.banks),
        # A bank that took no expert this experience has only frozen ones.
        "trainable_expert": [bool(b.trainable_down_weights()) for b in model.banks],
        "head_classes": model.train_head.out_features,
        "stats_heads": {k: h.num_classes for k, h in model.stats_heads.items()},
        "task_classes": {str(k): v for k, v in model.task_classes.items()},
        "experiences_seen": model.experiences_seen,
        "num_features": model.num_features,
    }


def load_model_state(model: ContinualViT, tensors: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict`` with a one-line error when the layouts disagree."""
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"checkpoint does not fit this run's model: {first}") from None


def rebuild_structure(model: ContinualViT, meta: dict[str, Any]) -> None:
    """Adds experts and grows heads so that ``model`` matches ``meta``."""
    from cl_hres.nsp.guard import attach_null_space

    if len(meta["experts"]) != len(model.banks):
        raise CheckpointError("checkpoint has a different number of adapted layers")
    # Before the key existed, heads read the adapted features only.
    saved = meta.get("num_features", model.backbone.num_features)
    if saved != model.num_features:
        raise CheckpointError(
            f"checkpoint's head reads {saved} features, this run's {model.num_features}: "
            "it was written with another --concat-pretrained setting (older runs: "
            "--no-concat-pretrained)"
        )
    for bank, count in zip(model.banks, meta["experts"]):
        if meta.get("null_space"):
            attach_null_space(bank)
        while bank.num_experts < count:
            # The saved layout wins, whatever the bank's state says now.
            bank.add_expert(force=True)
    for bank, trainable in zip(model.banks, meta.get("trainable_expert") or []):
        if not trainable:
            bank.requires_grad_(False)
    model.ensure_classes(meta["head_classes"])
    for key, n in meta["stats_heads"].items():
        head = model.stats_head(int(key))
        head._grow(n)
        if hasattr(head, "weight"):
            head.weight = torch.zeros(n, head.num_features, device=model.device)
            head.bias = torch.zeros(n, device=model.device)
    model.task_classes = {int(k): v for k, v in meta["task_classes"].items()}
    model.experiences_seen = meta["experiences_seen"]


def save_checkpoint(
    directory: Path,
    index: int,
    *,
    model: ContinualViT,
    plugin_states: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
) -> Path:
    """Writes checkpoint ``index`` atomically and removes older ones.

    ``plugin_states`` maps a key prefix to a plugin's tensors (stored as
    ``prefix.name``). The optimizer is rebuilt at every experience (fresh state), so at
    an experience boundary there is no optimizer state to keep; the RNG states are kept.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"exp{index:03d}"
    tmp = directory / f"exp{index:03d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rng_tensors, rng_meta = capture_rng()
    model_tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(model_tensors, str(tmp / "model.safetensors"))
    extra = dict(rng_tensors)
    for prefix, tensors in plugin_states.items():
        for k, v in tensors.items():
            extra[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    save_file(extra, str(tmp / "state.safetensors"))
    meta = dict(state, structure=model_structure(model), rng=rng_meta, index=index)
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in directory.glob("exp*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_checkpoint` stored under ``prefix.``, without the prefix."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (``.tmp`` ones are ignored)."""
    done = sorted(p for p in directory.glob("exp[0-9][0-9][0-9]") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, config: dict[str, Any]) -> tuple[dict[str, Any], dict, dict]:
    """Reads a checkpoint written for ``config``; refuses one of another run.

    Returns:
        ``(state, model_tensors, extra_tensors)``.
    """
    try:
        state = json.loads((path / "state.json").read_text())
        model_tensors = load_file(str(path / "model.safetensors"))
        extra = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(
            f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})"
        ) from None
    saved = state.get("config", {})
    for key in IDENTITY_KEYS:
        if saved.get(key) != config.get(key):
            raise CheckpointError(
                f"{path}: checkpoint is for {key}={saved.get(key)!r}, this run has {config.get(key)!r}"
            )
    # Every other option the checkpoint knows must agree too (``run`` and ``compare``
    # alike), or the resumed experiences would learn with other settings than the first.
    if changed := changed_on_resume(saved, config):
        key, old, new = changed
        raise CheckpointError(
            f"{path}: checkpoint was written with {key}={old!r}, this run has "
            f"{new!r} (only {', '.join(RESUMABLE_KEYS)} may change on --resume)"
        )
    return state, model_tensors, extra
