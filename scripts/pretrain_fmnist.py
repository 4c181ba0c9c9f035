"""Pretrain cl-hres's shipped backbone ``vit_pico_patch7_28.fmnist`` on Fashion-MNIST.

Real data, offline: the IDX files of Debian's ``dataset-fashion-mnist`` package
(``apt-get install dataset-fashion-mnist``; ``/usr/share/datasets/fashion-mnist/``).

Recipe (DeiT-style, scaled down): AdamW, linear warm-up then cosine decay, weight decay
0.05 on matrices only, label smoothing 0.1, stochastic depth 0.05; augmentation done in
batches on uint8 tensors: random translation (±3 px), scale (0.9-1.1) and rotation
(±10°) through one affine resampling, horizontal flip, random erasing (p 0.25). The last
5,000 training images of a seeded permutation are held out to watch for overfitting; the
test split is evaluated once, after training. Everything is seeded.

Writes ``<out>/<tag>.safetensors`` (weights), ``<out>/<tag>.json`` (timm-style pretrained
config plus provenance: data, epochs, accuracies, command, sha256) and a training log.

    python scripts/pretrain_fmnist.py --epochs 12 --out cl_hres/pretrained

A held-out-class testbed (a stream the backbone has partly never seen): ``--classes 0,1,2,3,4``
pretrains on those classes only, ``--holdout N`` keeps N training images (all classes,
seeded) out of pretraining and of its validation, and ``--stream-npz FILE`` writes them as
the stream's training split with the full test split as its test split (an ``.npz`` for
``cl-hres --benchmark FILE``). Writing the stream needs no training (``--epochs 0``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: Path) -> dict[str, torch.Tensor]:
    missing = [f for f in FILES.values() if not (root / f).is_file()]
    if missing:
        print(
            f"pretrain_fmnist.py: error: {root} lacks {missing[0]}; "
            "apt-get install dataset-fashion-mnist (or pass --data-dir)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return {k: torch.from_numpy(read_idx(root / f).copy()) for k, f in FILES.items()}


# Augmentation strengths: (max rotation in degrees, scale range, max shift in px, erasing p).
AUGMENT = {"strong": (10.0, 0.1, 3.0, 0.25), "light": (0.0, 0.0, 2.0, 0.0)}


def augment(x: torch.Tensor, gen: torch.Generator, strength: str = "strong") -> torch.Tensor:
    """Random affine (translate, scale, rotate) + flip + erasing on a float batch (N,1,H,W)."""
    degrees, scale_range, shift_px, erase_p = AUGMENT[strength]
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    scale = 1 - scale_range + 2 * scale_range * torch.rand(n, generator=gen)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (shift_px * 2 / w)  # in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Random erasing: one rectangle of 2-20% of the image in a fraction of the images.
    erase = torch.rand(n, generator=gen) < erase_p
    area = (0.02 + 0.18 * torch.rand(n, generator=gen)) * h * w
    ratio = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * math.log(3.0))
    eh = (area * ratio).sqrt().clamp(1, h).long()
    ew = (area / ratio).sqrt().clamp(1, w).long()
    top = (torch.rand(n, generator=gen) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=gen) * (w - ew + 1)).long()
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    mask = (
        erase.view(n, 1, 1)
        & (rows >= top.view(n, 1, 1))
        & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + ew).view(n, 1, 1))
    )
    return x.masked_fill(mask.unsqueeze(1), 0.0)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, mean: float, std: float) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 1000):
        xb = (x[i : i + 1000].float().unsqueeze(1) / 255 - mean) / std
        correct += (model(xb).argmax(1) == y[i : i + 1000]).sum().item()
    return correct / len(x)


def main(argv: list[str] | None = None) -> int:
    from cl_hres.cli.options import OneLineParser  # errors: one stderr line, exit 2

    p = OneLineParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--out", type=Path, default=Path("cl_hres/pretrained"))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val", type=int, default=5000, help="training images held out")
    p.add_argument("--augment", choices=sorted(AUGMENT), default="strong")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.05)
    p.add_argument("--limit", type=int, default=0, help="train on this many images (smoke test)")
    p.add_argument("--classes", default="", help="pretrain on these classes only (e.g. 0,1,2,3,4)")
    p.add_argument("--holdout", type=int, default=0, help="training images kept for a stream")
    p.add_argument("--stream-npz", type=Path, default=None, help="write the held-out stream here")
    args = p.parse_args(argv)
    if args.stream_npz is not None and not args.holdout:
        p.error("--stream-npz needs --holdout N (the stream's training images)")
    if args.val < 0 or args.holdout < 0 or args.epochs < 0:
        p.error("--val, --holdout and --epochs must be >= 0")
    try:
        classes = sorted({int(c) for c in args.classes.split(",") if c.strip()}) or list(range(10))
    except ValueError:
        p.error(f"--classes takes comma-separated class indices 0-9, got {args.classes!r}")
    if not set(classes) <= set(range(10)) or len(classes) < 2:
        p.error(f"--classes needs at least two of the classes 0-9, got {args.classes!r}")

    from cl_hres.nn.backbones import SHIPPED_ARCH, SHIPPED_TAG, shipped_architecture

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    data = load_fashion_mnist(args.data_dir)
    perm = torch.randperm(len(data["train_y"]), generator=gen)
    if args.val + args.holdout >= len(perm):
        p.error(f"--val + --holdout leave none of the {len(perm)} training images to pretrain on")
    # perm = [validation | held out for the stream | pretraining pool]: disjoint by slicing.
    val_idx = perm[: args.val]
    held_idx = perm[args.val : args.val + args.holdout]
    tr_idx = perm[args.val + args.holdout :]
    if args.stream_npz is not None:
        args.stream_npz.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.stream_npz.with_name(args.stream_npz.name + ".tmp.npz")
        np.savez_compressed(
            tmp,
            x_train=data["train_x"][held_idx].numpy(),
            y_train=data["train_y"][held_idx].numpy().astype(np.int64),
            x_test=data["test_x"].numpy(),
            y_test=data["test_y"].numpy().astype(np.int64),
        )
        tmp.replace(args.stream_npz)
        print(f"wrote the held-out stream {args.stream_npz} ({len(held_idx)} training images)")
        if args.epochs == 0:
            return 0
    # Train / validate / test on the chosen classes only, relabelled 0..len(classes)-1.
    relabel = torch.full((10,), -1, dtype=torch.long)
    relabel[classes] = torch.arange(len(classes))

    def only(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = relabel[y.long()] >= 0
        return x[keep], relabel[y.long()[keep]]

    if args.limit:
        tr_idx = tr_idx[: args.limit]
    x_tr, y_tr = only(data["train_x"][tr_idx], data["train_y"][tr_idx])
    x_val, y_val = only(data["train_x"][val_idx], data["train_y"][val_idx])
    x_te, y_te = only(data["test_x"], data["test_y"])
    # Normalisation statistics of the images trained on (never of the test split).
    pix = x_tr.float() / 255
    mean, std = pix.mean().item(), pix.std().item()
    del pix

    model = shipped_architecture(num_classes=len(classes), drop_path_rate=args.drop_path)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p_ for n, p_ in model.named_parameters() if p_.ndim < 2 or "pos_embed" in n]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.999),
    )
    steps_per_epoch = len(x_tr) // args.batch_size
    total, warm = steps_per_epoch * args.epochs, int(steps_per_epoch * args.warmup_epochs)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"{SHIPPED_TAG}.log"
    log = log_path.open("w")
    start, step, history = time.time(), 0, []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        running, seen = 0.0, 0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            xb = augment(x_tr[idx].float().unsqueeze(1) / 255, gen, args.augment)
            xb = (xb - mean) / std
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            running += loss.item() * len(idx)
            seen += len(idx)
        val = accuracy(model, x_val, y_val, mean, std)
        row = {
            "epoch": epoch + 1,
            "train_loss": round(running / seen, 4),
            "val_acc": round(val, 4),
            "minutes": round((time.time() - start) / 60, 2),
        }
        history.append(row)
        print(json.dumps(row), file=log, flush=True)
        print(json.dumps(row), flush=True)
    test = accuracy(model, x_te, y_te, mean, std)

    from safetensors.torch import save_file

    weights = args.out / f"{SHIPPED_TAG}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    import timm

    card = {
        "architecture": SHIPPED_ARCH,
        "tag": SHIPPED_TAG,
        "pretrained_cfg": {
            "input_size": [1, 28, 28],
            "mean": [round(mean, 4)],
            "std": [round(std, 4)],
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "num_classes": len(classes),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "provenance": {
            "data": "Fashion-MNIST (Debian dataset-fashion-mnist, IDX files); "
            f"classes {classes}: {len(x_tr)} training images, {len(x_val)} for validation, "
            f"{len(x_te)} test images; {len(held_idx)} training images held out for a stream",
            "epochs": args.epochs,
            "val_accuracy": round(val, 4),
            "test_accuracy": round(test, 4),
            "history": history,
            "train_minutes": round((time.time() - start) / 60, 1),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "sha256": digest,
            "torch": torch.__version__,
            "timm": timm.__version__,
        },
    }
    (args.out / f"{SHIPPED_TAG}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"test accuracy {test:.4f}; wrote {weights} (sha256 {digest[:12]})", file=log, flush=True)
    print(f"test accuracy {test:.4f}; wrote {weights} (sha256 {digest[:12]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
