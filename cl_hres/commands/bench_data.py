"""Input-pipeline rates for ``cl-hres bench``: can the loader keep up with the model?

Each pipeline is timed alone (no model), with the loader settings a run would use on
the bench's device (:func:`cl_hres.data.loaders.resolve_loader_settings` with ``auto``), as
images/s of batches delivered on the device, after two warm-up batches (worker start-up
and the first prefetch are not counted). ``ratio_to_train`` divides that by the model's
training rate at the same batch: above 1 the GPU (or CPU) never waits for data.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from cl_hres.data.loaders import loader_kwargs, resolve_loader_settings
from cl_hres.data.transforms import build_transforms

__all__ = ["data_figures"]

_SOURCE_SIZE = 32  # CIFAR's side
_JPEG_SIZE = (500, 375)  # a typical ImageNet-R photo
_WARMUP = 2


class _PerImage:
    """In-memory images with a per-image transform, as a run's in-memory data loads.

    Args:
        images: ``(N, C, H, W)`` uint8 images.
        kind: ``pil`` (kept as PIL images, as torchvision's CIFAR holds them) or
            ``tensor`` (float ``(C, H, W)`` in ``[0, 1]``, as ``.npz`` arrays are held).
        transform: The per-image training transform of that kind.
    """

    def __init__(self, images: torch.Tensor, kind: str, transform: Any) -> None:
        if kind == "pil":
            from PIL import Image

            self.images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
        else:
            self.images = list(images.float().div(255).unbind(0))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), 0


def _write_jpegs(root: Path, count: int, generator: torch.Generator) -> None:
    """``count`` smooth random photos-sized JPEGs in two class folders."""
    import torch.nn.functional as F
    from PIL import Image

    w, h = _JPEG_SIZE
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        # Upsampled noise compresses like a photo (a flat or white-noise image would not).
        small = torch.rand(1, 3, h // 16, w // 16, generator=generator)
        image = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        array = (image[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"{i:05d}.jpg", quality=90)


def _rate(loader: DataLoader, device: torch.device, batches: int) -> float:
    """Images/s of ``batches`` batches after the warm-up ones, delivered on ``device``."""
    seen, t0 = 0, None
    for i, (x, _) in enumerate(loader):
        if i == _WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, seen = time.perf_counter(), 0
        x = x.to(device, non_blocking=True)
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del loader  # stops persistent workers
    return seen / (time.perf_counter() - t0)


def data_figures(
    *,
    img_size: int,
    batch_size: int,
    device: torch.device,
    train_images_per_s: float,
    batches: int = 8,
) -> dict[str, dict[str, Any]]:
    """Rates of the ``in_memory``, ``in_memory_pil`` and ``file`` pipelines.

    Args:
        img_size: The model's input size (images are resized / cropped to it).
        batch_size: Images per batch (the training batch of the bench).
        device: Where batches are delivered.
        train_images_per_s: The model's training rate at this batch, for the ratios.
        batches: Timed batches per pipeline.
    """
    g = torch.Generator().manual_seed(0)
    count = batch_size * (batches + _WARMUP)
    data_cfg = {
        "input_size": [3, img_size, img_size],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bicubic",
        "crop_pct": 0.9,
        "crop_mode": "center",
    }
    images = torch.randint(0, 256, (count, 3, _SOURCE_SIZE, _SOURCE_SIZE), generator=g)
    images = images.to(torch.uint8)
    tensor_train_tf = build_transforms(data_cfg, kind="tensor", augment="crop-flip")[0]
    pil_train_tf = build_transforms(data_cfg, kind="pil", augment="crop-flip")[0]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="cl-hres-bench-") as tmp:
        _write_jpegs(Path(tmp), count, g)
        from torchvision.datasets import ImageFolder

        pipelines = {
            "in_memory": (_PerImage(images, "tensor", tensor_train_tf), "tensor"),
            "in_memory_pil": (_PerImage(images, "pil", pil_train_tf), "pil"),
            "file": (ImageFolder(tmp, transform=pil_train_tf), "pil"),
        }
        for name, (dataset, kind) in pipelines.items():
            settings = resolve_loader_settings("auto", device=str(device), kind=kind)
            kwargs = loader_kwargs(
                device, settings.num_workers, settings.pin_memory, settings.persistent_workers
            )
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, **kwargs)
            with torch.no_grad():
                rate = _rate(loader, device, batches)
            results[name] = {
                "images_per_s": rate,
                "ratio_to_train": rate / train_images_per_s,
                "num_workers": settings.num_workers,
                "pin_memory": settings.pin_memory,
            }
    return results
