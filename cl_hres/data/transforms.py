"""Input pipelines resolved from the backbone's pretrained config (timm's own helpers).

The backbone decides how images are presented: input size, mean/std, interpolation and
crop come from :func:`timm.data.resolve_model_data_config`, so an IN-21k augreg ViT is
normalised with its 0.5/0.5 and cl-hres's shipped backbone with Fashion-MNIST's
statistics. Datasets only say what they hold: PIL images (torchvision datasets, image
folders) or float tensors in ``[0, 1]`` (scikit-learn digits, ``.npz`` files).

Training augmentation (``augment``):

* ``crop-flip``: random resized crop (scale 0.05-1, ratio 3/4-4/3) and horizontal flip:
  the CIFAR-224 / ImageNet-R protocol of LAMDA-PILOT and RanPAC (``build_transform``).
* ``crop``: a milder random resized crop (scale 0.6-1), no flip: for digits and other
  data whose meaning changes under a mirror.
* ``none``: the evaluation transform.
* ``auto``: ``crop-flip`` for natural-image benchmarks (``split-cifar100``, ``imagenet-r``,
  image folders); ``none`` for ``split-digits`` and ``.npz`` arrays.

Evaluation is deterministic: PIL images go through timm's eval transform (resize to
``size / crop_pct``, centre crop); tensors are resized to the input size (no crop: small
in-memory images are whole objects).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cl_hres.errors import ConfigError

if TYPE_CHECKING:  # this module is imported by config validation: no torch at import
    from torch import nn

__all__ = ["AUGMENT_CHOICES", "INTERPOLATIONS", "build_transforms", "resolve_data_config"]

AUGMENT_CHOICES = ("auto", "crop-flip", "crop", "none")
# Resampling of a data config's "interpolation" that the pipelines implement.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# Random-resized-crop scales of the two augmentation policies.
_SCALES = {"crop-flip": (0.05, 1.0), "crop": (0.6, 1.0)}
_RATIO = (3 / 4, 4 / 3)


def resolve_data_config(backbone: nn.Module, channels: int) -> dict[str, Any]:
    """The backbone's data config for ``channels``-channel inputs, JSON-serialisable.

    The input size is the model's actual one (``--img-size`` resamples the position
    embeddings, which timm's pretrained config does not know). Mean and std are adapted
    when the data has another channel count than the pretrained weights (timm adapts the
    patch embedding the same way): a grey model's statistics are repeated for RGB data,
    an RGB model's averaged for grey data.
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(backbone)
    size = backbone.patch_embed.img_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    mean, std = list(cfg["mean"]), list(cfg["std"])
    if len(mean) != channels:
        if len(mean) == 1:
            mean, std = mean * channels, std * channels
        else:
            mean = [sum(mean) / len(mean)] * channels
            std = [sum(std) / len(std)] * channels
    return {
        "input_size": [channels, int(size[0]), int(size[1])],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "crop_mode": str(cfg.get("crop_mode", "center")),
    }


def build_transforms(data_cfg: dict[str, Any], *, kind: str, augment: str) -> tuple[Any, Any]:
    """``(train, eval)`` transforms for a dataset of ``kind`` ``pil`` or ``tensor``.

    Args:
        data_cfg: From :func:`resolve_data_config`.
        kind: ``pil`` (PIL images) or ``tensor`` (float ``(C, H, W)`` in ``[0, 1]``).
        augment: ``crop-flip``, ``crop`` or ``none`` (``auto`` resolved by the caller).
    """
    if augment not in AUGMENT_CHOICES[1:]:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENT_CHOICES)}, got {augment!r}")
    if kind == "pil":
        return _pil_transforms(data_cfg, augment)
    if kind == "tensor":
        return _tensor_transforms(data_cfg, augment)
    raise ValueError(f"unknown dataset kind {kind!r}")


def _pil_transforms(cfg: dict[str, Any], augment: str) -> tuple[Any, Any]:
    from timm.data import create_transform
    from torchvision import transforms

    common = {
        "input_size": tuple(cfg["input_size"]),
        "interpolation": cfg["interpolation"],
        "mean": tuple(cfg["mean"]),
        "std": tuple(cfg["std"]),
    }
    grey = cfg["input_size"][0] == 1
    eval_tf = create_transform(
        **common, is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"]
    )
    if augment == "none":
        train_tf = eval_tf
    else:
        train_tf = create_transform(
            **common,
            is_training=True,
            scale=_SCALES[augment],
            ratio=_RATIO,
            hflip=0.5 if augment == "crop-flip" else 0.0,
            color_jitter=None,
            re_prob=0.0,
        )
    if grey:  # timm's transforms keep the image's mode: make it one channel first
        to_grey = transforms.Grayscale(num_output_channels=1)
        train_tf = transforms.Compose([to_grey, train_tf])
        eval_tf = transforms.Compose([to_grey, eval_tf])
    else:
        train_tf = transforms.Compose([_to_rgb, train_tf])
        eval_tf = transforms.Compose([_to_rgb, eval_tf])
    return train_tf, eval_tf


def _to_rgb(image):
    """PIL image to RGB (a module-level function, so loader workers can pickle it)."""
    return image.convert("RGB")


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name) if name in INTERPOLATIONS else InterpolationMode.BILINEAR


def _tensor_transforms(cfg: dict[str, Any], augment: str) -> tuple[Any, Any]:
    from torchvision.transforms import v2

    size = tuple(cfg["input_size"][1:])
    mode = _interpolation(cfg["interpolation"])
    normalise = v2.Normalize(cfg["mean"], cfg["std"])
    eval_tf = v2.Compose([v2.Resize(size, interpolation=mode, antialias=True), normalise])
    if augment == "none":
        return eval_tf, eval_tf
    steps = [v2.RandomResizedCrop(size, scale=_SCALES[augment], ratio=_RATIO, interpolation=mode)]
    if augment == "crop-flip":
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, normalise]), eval_tf
