"""Create timm ViT backbones, with pretrained weights from the hub, a local file, or shipped.

cl-hres ships one small pretrained ViT as package data, registered with timm like any
pretrained tag: ``vit_pico_patch7_28.fmnist`` (6 blocks, width 96, patch 7 on 28×28 grey
images: 16 patch tokens), pretrained on Fashion-MNIST by ``scripts/pretrain_fmnist.py``.
Its weights (``cl_hres/pretrained/fmnist.safetensors``) and timm-style pretrained config
with provenance (``fmnist.json``) come with ``pip install``, so
``timm.create_model("vit_pico_patch7_28.fmnist", pretrained=True)`` works offline once
``cl_hres.nn.backbones`` has been imported.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch import nn

from cl_hres.errors import ConfigError, DataError

__all__ = [
    "SHIPPED_BACKBONE",
    "create_backbone",
    "describe_weights",
    "register_shipped_backbone",
    "shipped_architecture",
    "shipped_card",
    "weights_card",
]

SHIPPED_ARCH = "vit_pico_patch7_28"
SHIPPED_TAG = "fmnist"
SHIPPED_BACKBONE = f"{SHIPPED_ARCH}.{SHIPPED_TAG}"
# The architecture of the shipped backbone: timm's VisionTransformer at 28×28, 1 channel.
_SHIPPED_ARGS: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 7,
    "in_chans": 1,
    "embed_dim": 96,
    "depth": 6,
    "num_heads": 3,
    "mlp_ratio": 4.0,
}
_PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"
_registered = False


def shipped_card() -> dict[str, Any] | None:
    """The shipped backbone's pretrained config and provenance, or None if not built yet."""
    path = _PRETRAINED_DIR / f"{SHIPPED_TAG}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _build_pico(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    from timm.models import build_model_with_cfg
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(_SHIPPED_ARGS, **kwargs),
    )


# timm's register_model reads the pretrained cfgs from the entrypoint's module: filled lazily
# by register_shipped_backbone so that importing this module does not import timm.
default_cfgs: dict[str, Any] = {}


def vit_pico_patch7_28(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-Pico/7 at 28×28 (6 blocks, width 96, 3 heads): cl-hres's shipped backbone."""
    return _build_pico(SHIPPED_ARCH, pretrained, **kwargs)


def register_shipped_backbone() -> None:
    """Registers ``vit_pico_patch7_28`` (and its ``.fmnist`` tag) in timm's model registry.

    The tag's pretrained config (input size, mean, std, interpolation) is read from the
    card the pretraining script wrote; ``file`` points at the shipped safetensors, so timm
    loads it without a hub. Idempotent.
    """
    global _registered
    if _registered:
        return
    from timm.models import generate_default_cfgs, register_model

    cfgs: dict[str, dict[str, Any]] = {SHIPPED_ARCH: {"num_classes": 10}}
    card = shipped_card()
    if card is not None:
        cfg = dict(card["pretrained_cfg"])
        cfg["input_size"] = tuple(cfg["input_size"])
        cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
        cfg["file"] = str(_PRETRAINED_DIR / f"{SHIPPED_TAG}.safetensors")
        cfgs = {SHIPPED_BACKBONE: cfg}
    default_cfgs.clear()
    default_cfgs.update(generate_default_cfgs(cfgs))
    register_model(vit_pico_patch7_28)
    _registered = True


def shipped_architecture(**kwargs: Any) -> nn.Module:
    """The shipped backbone's architecture, randomly initialised (for pretraining)."""
    import timm

    register_shipped_backbone()
    return timm.create_model(SHIPPED_ARCH, pretrained=False, **kwargs)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (one TCP connect, not ~20 retried requests)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached_hub_file(name: str) -> str | None:
    """A local copy of ``name``'s hub weights in the Hugging Face cache, if any."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        if filename:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return found
    return None


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    # Keyed by size and mtime too: ``compare`` prepares every run from the same file, and
    # a ViT-B checkpoint takes about a second to hash.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_weights(name: str, pretrained: bool, weights: str | Path | None) -> dict[str, Any]:
    """Where a backbone's weights come from, for results.json."""
    if weights is not None:
        path = Path(weights).resolve()
        desc = {"name": name, "weights": "file", "file": str(path), "sha256": _sha256(path)}
        card = _card_path(weights)
        if card.is_file():
            desc["card"] = str(card.resolve())
        return desc
    if not pretrained:
        return {"name": name, "weights": "random (seeded)"}
    card = shipped_card() if name == SHIPPED_BACKBONE else None
    if card is not None:
        prov = card["provenance"]
        return {
            "name": name,
            "weights": "shipped with cl-hres",
            "sha256": prov["sha256"],
            "pretrained_on": prov["data"],
            "pretraining_test_accuracy": prov["test_accuracy"],
            "pretraining_command": prov["command"],
        }
    return {"name": name, "weights": "timm pretrained (Hugging Face hub or its cache)"}


# The data keys of a timm pretrained config that a card beside a --weights file may set.
_CARD_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def weights_card(weights: str | Path) -> dict[str, Any]:
    """The input-pipeline part of the card beside a weights file (``FILE.json``), or ``{}``.

    A weights file made by ``scripts/pretrain_fmnist.py`` (or by hand) may come with a
    timm-style card, ``<stem>.json`` holding ``pretrained_cfg``: its input size, mean,
    std, interpolation and crop then describe the inputs the weights were trained on,
    instead of those of the architecture's default tag.

    Raises:
        DataError: the card exists but is not JSON with a ``pretrained_cfg`` object.
    """
    card_path = _card_path(weights)
    if not card_path.is_file():
        return {}
    try:
        cfg = json.loads(card_path.read_text())["pretrained_cfg"]
        if not isinstance(cfg, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(
            f"{card_path} (the card beside --weights) is not JSON with a 'pretrained_cfg' "
            "object; fix or remove it"
        ) from None
    data = {
        k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in _CARD_DATA_KEYS
    }
    problem = _card_problem(data)
    if problem:
        raise DataError(f"{card_path} (the card beside --weights): {problem}; fix or remove it")
    return data


def _card_path(weights: str | Path) -> Path:
    # Beside the file as named (a symlinked weights file may have its own card).
    return Path(weights).with_suffix(".json")


def _numbers(value: Any) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )


def _card_problem(cfg: dict[str, Any]) -> str | None:
    """What is wrong with a card's data keys, or None (timm would fail later, obscurely)."""
    from cl_hres.data.transforms import INTERPOLATIONS

    for key in ("mean", "std"):
        if key in cfg and not (_numbers(cfg[key]) and cfg[key]):
            return f"{key} must be a list of finite numbers, got {cfg[key]!r}"
    if "std" in cfg and min(cfg["std"]) <= 0:
        return f"std must be positive, got {cfg['std']!r}"
    size = cfg.get("input_size")
    if size is not None and not (
        isinstance(size, tuple) and len(size) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):  # fmt: skip
        return f"input_size must be [channels, height, width], got {size!r}"
    if cfg.get("interpolation", "bilinear") not in INTERPOLATIONS:
        return f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {cfg['interpolation']!r}"
    crop = cfg.get("crop_pct", 1.0)
    if not (_numbers((crop,)) and 0 < crop <= 1):
        return f"crop_pct must be in (0, 1], got {crop!r}"
    if cfg.get("crop_mode", "center") not in ("center", "squash", "border"):
        return f"crop_mode must be center, squash or border, got {cfg['crop_mode']!r}"
    return None


def _weights_overlay(name: str, base: str, weights: str | Path | None) -> dict | None:
    """Where timm reads the pretrained weights: a local file, the hub cache, or the hub.

    Raises:
        ConfigError: the model has no pretrained weights in timm.
        DataError: the file is missing, or offline with nothing cached.
    """
    import timm

    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise DataError(f"weights file not found: {path}")
        return {**weights_card(path), "file": str(path.resolve())}
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.file or cfg.url or cfg.hf_hub_id):
        raise ConfigError(
            f"backbone {name!r} has no pretrained weights in timm; name a pretrained tag "
            f"(e.g. {base}.augreg_in21k), pass --weights FILE, or --no-pretrained"
        )
    if cfg.file or _hub_reachable():
        return None
    # Offline: use the hub cache if it has the weights, else fail at once instead of
    # letting huggingface_hub retry for a minute.
    cached = _cached_hub_file(name)
    if cached is None:
        raise DataError(
            f"pretrained weights for {name!r} are not cached and the Hugging Face hub "
            "cannot be reached; download them where there is network and pass "
            "--weights PATH (a .safetensors file), or pass --no-pretrained"
        )
    return {"file": cached}


def _known_model(name: str) -> str:
    """The architecture part of ``name``; ConfigError (with a close match) if timm lacks it."""
    import timm

    base = name.split(".")[0]
    if base not in timm.list_models():
        close = difflib.get_close_matches(base, timm.list_models("vit_*"), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown timm backbone {name!r}{hint}")
    return base


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    img_size: int | None = None,
    in_chans: int = 3,
    **overrides: Any,
) -> nn.Module:
    """Builds ``timm.create_model(name, num_classes=0, ...)`` with drop-out and drop-path off.

    Args:
        name: A timm VisionTransformer name, e.g. ``vit_base_patch16_224.augreg_in21k``.
        pretrained: Load pretrained weights from the Hugging Face hub (needs network).
        weights: A local ``.safetensors``/``.bin``/``.pth`` file with the pretrained weights
            (implies ``pretrained``); the way to use pretrained weights offline. A card
            beside it (:func:`weights_card`) sets the input pipeline.
        img_size: Input resolution (timm resamples the position embeddings).
        in_chans: Input channels.
        **overrides: Further ``VisionTransformer`` arguments (``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``, ``class_token``, ``reg_tokens``...).

    Raises:
        ConfigError: unknown model name or arguments timm rejects.
        DataError: pretrained weights cannot be obtained (offline) or read.
    """
    import timm  # deferred: importing timm costs ~1 s, and the CLI's --help needs none
    from timm.models.vision_transformer import VisionTransformer

    register_shipped_backbone()
    base = _known_model(name)
    kwargs: dict[str, Any] = dict(overrides, num_classes=0, drop_rate=0.0, drop_path_rate=0.0)
    if img_size is not None:
        kwargs["img_size"] = img_size
    kwargs["in_chans"] = in_chans
    if weights is not None:
        pretrained = True
    overlay = _weights_overlay(name, base, weights) if pretrained else None
    if overlay is not None:
        kwargs["pretrained_cfg_overlay"] = overlay
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, AssertionError) as exc:  # timm asserts e.g. embed_dim % heads
        raise ConfigError(f"backbone {name!r} rejected its arguments: {exc}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise ConfigError(f"backbone {name!r} could not be built: {exc}") from None
        if weights is not None:
            raise DataError(
                f"could not load weights {weights}: {str(exc).splitlines()[0]}"
            ) from None
        raise DataError(
            f"pretrained weights for {name!r} could not be downloaded "
            f"({type(exc).__name__}); download them where there is network and pass "
            "--weights PATH (a .safetensors file), or drop --pretrained"
        ) from None
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"backbone {name!r} is a {type(model).__name__}, not a VisionTransformer")
    return model
