"""Resize, normalise and augment whole batches of in-memory images, on any device.

The per-image transforms of :mod:`cl_hres.data.transforms` call torchvision once per image and
epoch; for in-memory arrays that is most of the loader's time (the default run spent 13%
of its wall time there, README "Costs"). Here the same operations run on a batch:

* :class:`BatchTransform` takes ``(N, C, H, W)`` uint8 (0..255) or float (``[0, 1]``)
  images on any device (the GPU when there is one) and returns normalised float32 images
  at the input size: the evaluation transform (antialiased resize, as
  :mod:`cl_hres.data.transforms` does per image, bit for bit on float input) or a random
  resized crop (+ flip) drawn per image and sampled bilinearly in one ``grid_sample``.
* :func:`precompute_in_memory` applies the deterministic evaluation transform to
  in-memory datasets once, when the data is not augmented and the result fits
  :data:`PRECOMPUTE_BUDGET_BYTES`: every later pass (epochs, evaluation, statistics)
  then only indexes a tensor.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from cl_hres.data.datasets import SplitData, TensorImageDataset

__all__ = ["PRECOMPUTE_BUDGET_BYTES", "BatchTransform", "identity", "precompute_in_memory"]

# Precomputed float32 images of both splits may take this much memory; beyond it (e.g.
# CIFAR-sized arrays upsampled to 224 px: 30 GB) the per-image path is kept.
PRECOMPUTE_BUDGET_BYTES = 1 << 30
# Random-resized-crop scales and ratio of cl_hres.data.transforms' policies.
_SCALES = {"crop-flip": (0.05, 1.0), "crop": (0.6, 1.0)}
_RATIO = (3 / 4, 4 / 3)
_TRIES = 10  # torchvision's RandomResizedCrop draws up to 10 boxes, then falls back


def identity(x: Any) -> Any:
    """The transform of already transformed data (module level: picklable for workers)."""
    return x


class BatchTransform:
    """A batch version of :func:`cl_hres.data.transforms.build_transforms` for tensors.

    Args:
        data_cfg: From :func:`cl_hres.data.transforms.resolve_data_config`.
        augment: ``none`` (evaluation transform), ``crop`` or ``crop-flip``.
    """

    def __init__(self, data_cfg: dict[str, Any], augment: str = "none") -> None:
        if augment not in ("none", *_SCALES):
            raise ValueError(f"augment must be none, crop or crop-flip, got {augment!r}")
        self.size = tuple(int(s) for s in data_cfg["input_size"][1:])
        self.mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
        mode = data_cfg.get("interpolation", "bilinear")
        self.mode = mode if mode in ("bilinear", "bicubic") else "bilinear"
        self.augment = augment

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised float32 ``(N, C, size, size)`` images on ``images``' device."""
        x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        if self.augment == "none":
            x = self._resize(x)
        else:
            x = self._random_resized_crop(x, generator)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean).div_(std)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        # What torchvision's v2.Resize(antialias=True) does to a float tensor.
        return F.interpolate(x, size=self.size, mode=self.mode, antialias=True, align_corners=False)

    def _random_resized_crop(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        n, _, h, w = x.shape
        lo, hi = _SCALES[self.augment]
        # Draw boxes on the CPU (few numbers; one generator whatever the device).
        area = torch.empty(n, _TRIES).uniform_(lo, hi, generator=generator) * (h * w)
        log_r = torch.empty(n, _TRIES).uniform_(
            math.log(_RATIO[0]), math.log(_RATIO[1]), generator=generator
        )
        ratio = log_r.exp()
        bw = (area * ratio).sqrt().round()
        bh = (area / ratio).sqrt().round()
        ok = (bw >= 1) & (bw <= w) & (bh >= 1) & (bh <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        rows = torch.arange(n)
        # No valid box in 10 tries: the whole image (torchvision's fallback clamps the
        # ratio; these images are square, where that is the whole image).
        bw = torch.where(first >= 0, bw[rows, first.clamp(min=0)], torch.full((n,), float(w)))
        bh = torch.where(first >= 0, bh[rows, first.clamp(min=0)], torch.full((n,), float(h)))
        top = (torch.rand(n, generator=generator) * (h - bh + 1)).floor()
        left = (torch.rand(n, generator=generator) * (w - bw + 1)).floor()
        flip = torch.ones(n)
        if self.augment == "crop-flip":
            flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        # Affine map from output coordinates in [-1, 1] to the box in input coordinates.
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = flip * bw / w
        theta[:, 0, 2] = (2 * left + bw) / w - 1
        theta[:, 1, 1] = bh / h
        theta[:, 1, 2] = (2 * top + bh) / h - 1
        grid = F.affine_grid(theta.to(x.device), [n, x.shape[1], *self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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
    transform = BatchTransform(data_cfg, "none")
    with torch.no_grad():
        train, test = _precomputed(data.train, transform), _precomputed(data.test, transform)
    return replace(data, train=train, test=test), (identity, identity)
