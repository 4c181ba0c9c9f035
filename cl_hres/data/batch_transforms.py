"""Resize and normalise whole batches of in-memory images, on any device.

The per-image transforms of :mod:`cl_hres.data.transforms` call torchvision once per image and
epoch; for in-memory arrays that is most of the loader's time (the default run spent 13%
of its wall time there, docs/costs.md). Here the deterministic evaluation transform runs
on a batch:

* :class:`BatchTransform` takes ``(N, C, H, W)`` uint8 (0..255) or float (``[0, 1]``)
  images on any device and returns normalised float32 images at the input size
  (antialiased resize, as :mod:`cl_hres.data.transforms` does per image, bit for bit on
  float input).
* :func:`precompute_in_memory` applies it to in-memory datasets once, when the data is
  not augmented and the result fits :data:`PRECOMPUTE_BUDGET_BYTES`: every later pass
  (epochs, evaluation, statistics) then only indexes a tensor.

Augmented training keeps the per-image path (random crops are drawn per image and epoch
by :mod:`cl_hres.data.transforms`, the one definition of the crop policies).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from cl_hres.data.datasets import SplitData, TensorImageDataset

__all__ = ["PRECOMPUTE_BUDGET_BYTES", "BatchTransform", "identity", "precompute_in_memory"]

# Precomputed float32 images of both splits may take this much memory; beyond it (e.g.
# CIFAR-sized arrays upsampled to 224 px: 30 GB) the per-image path is kept.
PRECOMPUTE_BUDGET_BYTES = 1 << 30


def identity(x: Any) -> Any:
    """The transform of already transformed data (module level: picklable for workers)."""
    return x


class BatchTransform:
    """The evaluation transform of :func:`cl_hres.data.transforms.build_transforms`, batched.

    Args:
        data_cfg: From :func:`cl_hres.data.transforms.resolve_data_config`.
    """

    def __init__(self, data_cfg: dict[str, Any]) -> None:
        self.size = tuple(int(s) for s in data_cfg["input_size"][1:])
        self.mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
        mode = data_cfg.get("interpolation", "bilinear")
        self.mode = mode if mode in ("bilinear", "bicubic") else "bilinear"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float32 ``(N, C, size, size)`` images on ``images``' device."""
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        x = self._resize(x)
        if x is images:  # float32 at the input size: nothing copied it yet
            x = x.clone()  # normalising in place must not change the caller's images
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean).div_(std)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        # What torchvision's v2.Resize(antialias=True) does to a float tensor.
        return F.interpolate(x, size=self.size, mode=self.mode, antialias=True, align_corners=False)


def _precomputed(dataset: TensorImageDataset, transform: BatchTransform) -> TensorImageDataset:
    chunks = [transform(dataset.images[i : i + 1024]) for i in range(0, len(dataset), 1024)]
    return TensorImageDataset(torch.cat(chunks), dataset.targets)


def precompute_in_memory(
    data: SplitData, data_cfg: dict[str, Any], augment: str
) -> tuple[SplitData, tuple[Any, Any]] | None:
    """In-memory data with the evaluation transform applied once, and identity transforms.

    Returns None (keep the per-image path) for PIL data, augmented training, or when the
    transformed images of both splits would exceed :data:`PRECOMPUTE_BUDGET_BYTES`.
    """
    if augment != "none" or data.kind != "tensor":
        return None
    if not all(isinstance(d, TensorImageDataset) for d in (data.train, data.test)):
        return None
    c, h, w = data_cfg["input_size"]
    if 4 * c * h * w * (len(data.train) + len(data.test)) > PRECOMPUTE_BUDGET_BYTES:
        return None
    transform = BatchTransform(data_cfg)
    with torch.no_grad():
        train, test = _precomputed(data.train, transform), _precomputed(data.test, transform)
    return replace(data, train=train, test=test), (identity, identity)
