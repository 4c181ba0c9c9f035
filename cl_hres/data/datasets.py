"""Loading and validating image-classification data (no Avalanche here).

Every loader returns :class:`SplitData`: train and test datasets with integer ``targets``
in ``0..C-1``, holding raw images: PIL images (``kind="pil"``) or float tensors in
``[0, 1]`` (``kind="tensor"``). Resizing, normalisation and augmentation are the
backbone's business (:mod:`cl_hres.data.transforms`). Bad input raises
:class:`~cl_hres.errors.DataError` with a one-line message.
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
    """Images ``(N, C, H, W)`` float32 in ``[0, 1]`` with integer ``targets``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images = images
        self.targets = targets.long()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.targets[i]


@dataclass
class SplitData:
    """Train and test datasets of one benchmark, with what the backbone must accept.

    Attributes:
        image_size: The images' own side length (None when it varies, e.g. folders).
        channels: 1 (grey) or 3 (RGB): the backbone's patch embedding is adapted to it.
        kind: ``tensor`` (float tensors in ``[0, 1]``) or ``pil`` (PIL images).
        augment: The ``auto`` augmentation policy of this data (see cl_hres.data.transforms).
        domain_of_class: The domain of each class (``--experiences by-domain``), or None.
        domain_names: A name per domain id, or None.
    """

    train: Any
    test: Any
    num_classes: int
    image_size: int | None
    channels: int
    name: str
    kind: str = "tensor"
    augment: str = "none"
    domain_of_class: list[int] | None = None
    domain_names: list[str] | None = None


def _unit_range(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels into ``[0, 1]``.

    Integers are divided by 255 (8-bit) or their maximum, floats kept when already in
    ``[0, 1]``, else min-max scaled with the training split's range.
    """
    if np.issubdtype(train.dtype, np.integer) or train.dtype == np.bool_:
        top = max(255.0, float(train.max()), float(test.max())) if train.dtype != np.bool_ else 1.0
        lo, hi = 0.0, top
    elif train.min() >= 0 and train.max() <= 1:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(train.min()), float(train.max())
        hi = hi if hi > lo else lo + 1.0
    scale = lambda a: np.clip((a.astype(np.float64) - lo) / (hi - lo), 0, 1).astype(np.float32)  # noqa: E731
    return torch.from_numpy(scale(train)), torch.from_numpy(scale(test))


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
    x = digits.images.astype(np.float32)[:, None] / 16.0  # 4-bit grey levels 0..16
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    if validation:
        x_tr, x_te, y_tr, y_te = _holdout(x_tr, y_tr, validation, seed)
    tr, te = torch.from_numpy(x_tr), torch.from_numpy(x_te)
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
    """Loads a user ``.npz`` with ``x_train, y_train, x_test, y_test`` (never unpickles).

    Layout: ``x_*`` is ``N×H×W`` (grey) or ``N×H×W×C`` with C = 1 or 3 (channels last,
    as NumPy / PIL store images), any real dtype (8-bit integers are read as 0..255);
    ``y_*`` holds integer labels ``0..C-1``, every training class present.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0]})") from None
    validate_arrays(arrays, str(path))
    x_tr, x_te = arrays["x_train"], arrays["x_test"]
    if x_tr.ndim == 3:
        x_tr, x_te = x_tr[..., None], x_te[..., None]
    x_tr, x_te = x_tr.transpose(0, 3, 1, 2), x_te.transpose(0, 3, 1, 2)
    y_tr, y_te = arrays["y_train"].astype(np.int64), arrays["y_test"].astype(np.int64)
    if validation:
        x_tr, x_te, y_tr, y_te = _holdout(x_tr, y_tr, validation, seed)
    tr, te = _unit_range(x_tr, x_te)
    h, w = tr.shape[2:]
    if h != w:
        raise DataError(f"{path}: images are {h}×{w}; cl-hres needs square images")
    num_classes = int(y_tr.max()) + 1
    domains, names = _domains(arrays, num_classes, str(path))
    return SplitData(
        TensorImageDataset(tr, torch.from_numpy(y_tr)),
        TensorImageDataset(te, torch.from_numpy(y_te)),
        num_classes=num_classes,
        image_size=h,
        channels=tr.shape[1],
        name=path.name,
        domain_of_class=domains,
        domain_names=names,
    )


def _domains(
    arrays: dict[str, np.ndarray], num_classes: int, source: str
) -> tuple[list[int] | None, list[str] | None]:
    """The optional ``domain_of_class`` (ids 0..D-1) and ``domain_names`` arrays, checked."""
    if "domain_of_class" not in arrays:
        if "domain_names" in arrays:
            raise DataError(f"{source}: domain_names given without domain_of_class")
        return None, None
    d = arrays["domain_of_class"]
    if d.ndim != 1 or len(d) != num_classes or not np.issubdtype(d.dtype, np.integer):
        raise DataError(
            f"{source}: domain_of_class must be {num_classes} integers (one per class), "
            f"got shape {d.shape} of {d.dtype}"
        )
    ids = sorted(set(d.tolist()))
    if ids != list(range(len(ids))):
        raise DataError(f"{source}: domain_of_class must use the ids 0..D-1, got {ids[:8]}")
    names = None
    if "domain_names" in arrays:
        n = arrays["domain_names"]
        if n.ndim != 1 or len(n) != len(ids) or n.dtype.kind != "U":
            raise DataError(f"{source}: domain_names must be {len(ids)} strings (one per domain)")
        names = [str(v) for v in n]
    return [int(v) for v in d], names


_CIFAR_FILES = ("train", "test", "meta")
# Test hook: md5 per CIFAR-100 file accepted instead of torchvision's (None: torchvision's,
# the official files'). Tests set it to their small fake files' checksums, so that the
# verification below runs on every load.
_CIFAR_MD5: dict[str, str] | None = None


def _cifar_md5() -> dict[str, str]:
    """The md5 of each CIFAR-100 file that is accepted: torchvision's, or the test hook's."""
    if _CIFAR_MD5 is not None:
        return dict(_CIFAR_MD5)
    from torchvision.datasets import CIFAR100

    table = dict(CIFAR100.train_list + CIFAR100.test_list)
    table[CIFAR100.meta["filename"]] = CIFAR100.meta["md5"]
    return table


def _verify_cifar(folder: Path) -> None:
    """Refuses (DataError) any of the three files whose md5 is not the expected one.

    The files are unpickled, and unpickling runs whatever code a file names: only the
    official files (by checksum) may be opened.
    """
    from torchvision.datasets.utils import check_md5

    expected = _cifar_md5()
    for name in _CIFAR_FILES:
        path = folder / name
        if not path.is_file():  # an archive without it
            raise DataError(f"{path}: missing from CIFAR-100's files")
        if not check_md5(str(path), expected[name]):
            raise DataError(
                f"{path}: md5 checksum does not match the official CIFAR-100 file; the files "
                "are unpickled, so only the official ones are accepted (delete cifar-100-python/ "
                "to download them again)"
            )


def load_cifar100(root: str | Path, download: bool = True) -> SplitData:
    """CIFAR-100 in torchvision's layout (``root/cifar-100-python/{train,test,meta}``).

    Missing files are downloaded by torchvision (which checks the archive's md5). Every
    load then checks the md5 of the three files against torchvision's table before
    unpickling them, so a file that is not the official one is refused, never opened.

    Args:
        root: The folder holding ``cifar-100-python/`` (or to download it into).
        download: Whether to download missing files.

    Raises:
        DataError: The files are missing and cannot be downloaded, a checksum does not
            match, or a file cannot be read.
    """
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    class _Verified(CIFAR100):
        """torchvision's CIFAR-100 reading files whose md5 :func:`_verify_cifar` checked."""

        # Checked once, above, against the accepted table (torchvision would hash each
        # ~150 MB file again, and would refuse the test hook's files).
        meta = dict(CIFAR100.meta, md5=None)

        def _check_integrity(self) -> bool:
            return True

    folder = Path(root) / CIFAR100.base_folder
    if not all((folder / f).is_file() for f in _CIFAR_FILES):
        if not download:
            raise DataError(
                f"CIFAR-100 not found under {root}; put cifar-100-python/ (or its .tar.gz) "
                "there and pass --data-root DIR"
            )
        try:
            download_and_extract_archive(
                CIFAR100.url, str(root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5
            )
        except Exception as exc:  # torchvision raises URLError/RuntimeError/OSError offline
            raise DataError(
                f"CIFAR-100 not found under {root} and could not be downloaded "
                f"({type(exc).__name__}); put cifar-100-python/ (or its .tar.gz) there and pass "
                "--data-root DIR"
            ) from None
    _verify_cifar(folder)
    try:
        train = _Verified(str(root), train=True)
        test = _Verified(str(root), train=False)
    except Exception as exc:  # a verified file that still does not load (test hook only)
        raise DataError(f"{folder}: not readable as CIFAR-100 ({type(exc).__name__})") from None
    return SplitData(train, test, 100, 32, 3, "split-cifar100", kind="pil", augment="crop-flip")


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


def load_image_folder(path: str | Path, name: str | None = None, seed: int = 0) -> SplitData:
    """An ImageFolder tree, with ``train/`` and ``test/`` or split 80/20 per class.

    Either ``path/train/<class>/*`` and ``path/test/<class>/*`` (a published split, e.g.
    ImageNet-R as distributed with LAMDA-PILOT), or one ``path/<class>/*`` tree split
    80/20 per class (stratified) with ``seed``. Images load as RGB PIL images.
    """
    from torchvision.datasets import ImageFolder

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder not found: {path}")
    try:
        if (path / "train").is_dir() and (path / "test").is_dir():
            train, test = ImageFolder(str(path / "train")), ImageFolder(str(path / "test"))
            if train.classes != test.classes:
                raise DataError(f"{path}: train/ and test/ have different class folders")
        else:
            train, test = _folder_split(ImageFolder(str(path)), 0.2, seed)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: {str(exc).splitlines()[0]}") from None
    num_classes = len(set(train.targets))
    if num_classes < 2:
        raise DataError(f"{path}: need at least 2 class folders with images")
    size = _first_image_size(train)
    return SplitData(
        train, test, num_classes, size, 3, name or path.name, kind="pil", augment="crop-flip"
    )


def _first_image_size(dataset) -> int | None:
    """The side of the first image (None if it is not square or cannot be read)."""
    try:
        image = dataset[0][0]
    except (OSError, IndexError):
        return None
    w, h = image.size
    return w if w == h else None
