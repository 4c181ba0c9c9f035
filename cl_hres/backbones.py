"""Create timm ViT backbones, with pretrained weights from the hub or from a local file."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from torch import nn

from cl_hres.errors import ConfigError, DataError

__all__ = ["create_backbone"]


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
            (implies ``pretrained``); the way to use pretrained weights offline.
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

    base = name.split(".")[0]
    if base not in timm.list_models():
        close = difflib.get_close_matches(base, timm.list_models("vit_*"), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown timm backbone {name!r}{hint}")
    kwargs: dict[str, Any] = dict(overrides, num_classes=0, drop_rate=0.0, drop_path_rate=0.0)
    if img_size is not None:
        kwargs["img_size"] = img_size
    kwargs["in_chans"] = in_chans
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise DataError(f"weights file not found: {path}")
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {"file": str(path.resolve())}
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
