"""Loading and validating image-classification data (no Avalanche here).

Every loader returns :class:`SplitData`: train and test datasets with integer ``targets``
in ``0..C-1``. Bad input raises :class:`~cl_hres.errors.DataError` with a one-line message.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cl_hres.errors import DataError

__all__ = ["SplitData", "TensorImageDataset", "load_digits_data", "load_npz", "validate_arrays"]


class TensorImageDataset(Dataset):
    """Images ``(N, C, H, W)`` float32 with integer ``targets`` (what Avalanche needs)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images = images
        self.targets = targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.targets[i]


@dataclass
class SplitData:
    """Train and test datasets of one benchmark, with what the backbone must accept."""

    train: Any
    test: Any
    num_classes: int
    image_size: int
    channels: int
    name: str


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Per-channel statistics of the training split only (the test split never informs
    # preprocessing).
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return (
        torch.from_numpy(((train - mean) / std).astype(np.float32)),
        torch.from_numpy(((test - mean) / std).astype(np.float32)),
    )


def _holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Stratified split of the training arrays into (train, validation)."""
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=fraction, stratify=y, random_state=seed)


def load_digits_data(validation: float = 0.0, seed: int = 0) -> SplitData:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes; ships with scikit-learn).

    A fixed stratified 75/25 train/test split. With ``validation`` > 0 the test split is
    set aside and a stratified fraction of the training split is returned as ``test``:
    use it to choose hyper-parameters without looking at the test data.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float64)[:, None] / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    if validation:
        x_tr, x_te, y_tr, y_te = _holdout(x_tr, y_tr, validation, seed)
    tr, te = _standardise(x_tr, x_te)
    return SplitData(
        TensorImageDataset(tr, torch.from_numpy(y_tr)),
        TensorImageDataset(te, torch.from_numpy(y_te)),
        num_classes=10,
        image_size=8,
        channels=1,
        name="split-digits",
    )


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def validate_arrays(arrays: dict[str, np.ndarray], source: str) -> None:
    """Checks ``x_train, y_train, x_test, y_test`` arrays; raises DataError naming the problem."""
    missing = [k for k in _NPZ_KEYS if k not in arrays]
    if missing:
        raise DataError(f"{source}: missing array(s) {', '.join(missing)}")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype == object or y.dtype == object:
            raise DataError(f"{source}: x_{split}/y_{split} must be numeric arrays, not objects")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
            raise DataError(f"{source}: x_{split} has dtype {x.dtype}, expected a real number type")
        if x.ndim not in (3, 4):
            raise DataError(f"{source}: x_{split} has shape {x.shape}, expected N×H×W or N×H×W×C")
        if x.shape[0] == 0:
            raise DataError(f"{source}: x_{split} is empty")
        if min(x.shape[1:3]) < 1:
            raise DataError(f"{source}: x_{split} has empty image dimensions {x.shape}")
        if x.ndim == 4 and x.shape[3] not in (1, 3):
            raise DataError(f"{source}: x_{split} has {x.shape[3]} channels, expected 1 or 3")
        if y.ndim != 1:
            raise DataError(f"{source}: y_{split} has shape {y.shape}, expected a 1-D label vector")
        if len(y) != len(x):
            raise DataError(
                f"{source}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{source}: y_{split} has dtype {y.dtype}, expected integer labels")
        if not np.isfinite(x.astype(np.float64, copy=False)).all():
            raise DataError(f"{source}: x_{split} contains NaN or Inf pixels")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{source}: train images {arrays['x_train'].shape[1:]} and test images "
            f"{arrays['x_test'].shape[1:]} differ in shape"
        )
    y_tr, y_te = arrays["y_train"], arrays["y_test"]
    if y_tr.min() < 0 or y_te.min() < 0:
        raise DataError(f"{source}: labels must be >= 0")
    classes = np.unique(y_tr)
    if not np.array_equal(classes, np.arange(len(classes))):
        absent = sorted(set(range(int(classes.max()) + 1)) - set(classes.tolist()))
        raise DataError(
            f"{source}: training labels must be 0..C-1 with none empty; missing {absent[:5]}"
        )
    if not set(np.unique(y_te).tolist()) <= set(classes.tolist()):
        raise DataError(f"{source}: y_test has labels that y_train lacks")
    if len(classes) < 2:
        raise DataError(f"{source}: need at least 2 classes, found {len(classes)}")


def load_npz(path: str | Path, validation: float = 0.0, seed: int = 0) -> SplitData:
    """Loads a user ``.npz`` with ``x_train, y_train, x_test, y_test`` (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0]})") from None
    validate_arrays(arrays, str(path))
    x_tr, x_te = (arrays[k].astype(np.float64) for k in ("x_train", "x_test"))
    if x_tr.ndim == 3:
        x_tr, x_te = x_tr[..., None], x_te[..., None]
    x_tr, x_te = x_tr.transpose(0, 3, 1, 2), x_te.transpose(0, 3, 1, 2)
    y_tr, y_te = arrays["y_train"].astype(np.int64), arrays["y_test"].astype(np.int64)
    if validation:
        x_tr, x_te, y_tr, y_te = _holdout(x_tr, y_tr, validation, seed)
    tr, te = _standardise(x_tr, x_te)
    h, w = tr.shape[2:]
    if h != w:
        raise DataError(f"{path}: images are {h}×{w}; cl-hres needs square images")
    return SplitData(
        TensorImageDataset(tr, torch.from_numpy(y_tr)),
        TensorImageDataset(te, torch.from_numpy(y_te)),
        num_classes=int(y_tr.max()) + 1,
        image_size=h,
        channels=tr.shape[1],
        name=path.name,
    )


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image_transform(image_size: int):
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(_IMAGENET_MEAN, _IMAGENET_STD),
        ]
    )


def load_cifar100(root: str | Path, image_size: int = 224, download: bool = True) -> SplitData:
    """CIFAR-100 through torchvision, resized to ``image_size`` (224 in the published tables)."""
    from torchvision.datasets import CIFAR100

    tf = _image_transform(image_size)
    try:
        train = CIFAR100(str(root), train=True, download=download, transform=tf)
        test = CIFAR100(str(root), train=False, download=download, transform=tf)
    except Exception as exc:  # torchvision raises URLError/RuntimeError/OSError offline
        raise DataError(
            f"CIFAR-100 not found under {root} and could not be downloaded "
            f"({type(exc).__name__}); put cifar-100-python/ (or its .tar.gz) there and pass "
            "--data-root DIR"
        ) from None
    return SplitData(train, test, 100, image_size, 3, "split-cifar100")


def _folder_split(folder, test_fraction: float, seed: int):
    """Stratified index split of an ImageFolder into two Subsets with ``targets``."""
    from sklearn.model_selection import train_test_split
    from torch.utils.data import Subset

    targets = np.asarray(folder.targets)
    idx_tr, idx_te = train_test_split(
        np.arange(len(targets)), test_size=test_fraction, stratify=targets, random_state=seed
    )
    out = []
    for idx in (idx_tr, idx_te):
        sub = Subset(folder, idx.tolist())
        sub.targets = targets[idx].tolist()
        out.append(sub)
    return out


def load_image_folder(
    path: str | Path, image_size: int = 224, name: str | None = None, seed: int = 0
) -> SplitData:
    """An ImageFolder tree, with ``train/`` and ``test/`` or split 80/20 per class.

    Either ``path/train/<class>/*`` and ``path/test/<class>/*``, or one ``path/<class>/*``
    tree split 80/20 per class with ``seed``.
    """
    from torchvision.datasets import ImageFolder

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    tf = _image_transform(image_size)
    try:
        if (path / "train").is_dir() and (path / "test").is_dir():
            train, test = ImageFolder(str(path / "train"), tf), ImageFolder(str(path / "test"), tf)
            if train.classes != test.classes:
                raise DataError(f"{path}: train/ and test/ have different class folders")
        else:
            train, test = _folder_split(ImageFolder(str(path), tf), 0.2, seed)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: {str(exc).splitlines()[0]}") from None
    num_classes = len(set(train.targets))
    if num_classes < 2:
        raise DataError(f"{path}: need at least 2 class folders with images")
    return SplitData(train, test, num_classes, image_size, 3, name or path.name)
