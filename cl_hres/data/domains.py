"""``split-domains``: a cross-domain stream built offline, one domain per experience.

Domains, in this fixed order (the VTAB convention: the order is part of the benchmark):

1. ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images), upsampled;
2. ``fashion``: Fashion-MNIST images from its test file (the shipped backbone was
   pretrained on the training file only), so a domain near the pretraining one;
3. ``latin``, 4. ``greek``, 5. ``cyrillic``, 6. ``hebrew``: ten letters of each script,
   rendered from the installed font files, with the fonts' families split between
   training and test so that no test font is ever seen in training.

Every image is 28×28 grey, white on black, the glyph fitted into a 20×20 box and
centred as MNIST does. Domains differ in training size as real ones do: the numbers
are in :data:`TRAIN_PER_CLASS`. The build is deterministic for a given set of fonts;
``manifest.json`` beside the ``.npz`` records the fonts of each split and the file's
SHA-256, which is checked at every load.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cl_hres.errors import DataError
from cl_hres.fileio import atomic_write_text

__all__ = [
    "DOMAINS",
    "SCRIPTS",
    "TRAIN_PER_CLASS",
    "build_split_domains",
    "load_split_domains",
]

BUILD_VERSION = 1
DOMAINS = ("digits", "fashion", "latin", "greek", "cyrillic", "hebrew")
# Ten letters per script, chosen to look unlike each other and unlike the other scripts'
# (no Latin-looking Greek or Cyrillic capitals such as A, B, E, H, K, M, O, P, T, X).
SCRIPTS: dict[str, str] = {
    "latin": "ABDEFGHKMR",
    "greek": "ΓΔΘΛΞΠΣΦΨΩ",
    "cyrillic": "БДЖЗИЦЧШЮЯ",
    "hebrew": "אבגדהחטכלמ",
}
TRAIN_PER_CLASS = {"fashion": 500, "latin": 500, "greek": 350, "cyrillic": 250, "hebrew": 100}
TEST_PER_CLASS = {"fashion": 100, "latin": 100, "greek": 100, "cyrillic": 100, "hebrew": 100}
FONT_DIRS = ("/usr/share/fonts",)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_FONT_PACKAGES = "fonts-dejavu fonts-freefont-ttf fonts-noto-core culmus"


def _progress(total: int, desc: str) -> Any:
    """A stderr progress bar when stderr is a terminal (tqdm, which Avalanche installs)."""
    try:
        from tqdm import tqdm
    except ImportError:  # not a declared dependency of cl-hres: build without a bar
        return _Silent()
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False)


class _Silent:
    """The part of tqdm's interface the build uses, doing nothing."""

    def update(self, n: int = 1) -> None:
        """Counts nothing."""

    def close(self) -> None:
        """Closes nothing."""


# ------------------------------------------------------------------- glyph rendering
def _fit_28(ink: np.ndarray) -> np.ndarray:
    """An ink image fitted into a 20×20 box and centred by mass in 28×28 (MNIST's way)."""
    from PIL import Image

    ys, xs = np.nonzero(ink > 16)
    crop = ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(crop).resize(size, Image.LANCZOS), dtype=np.float64)
    out = np.zeros((28, 28))
    total = small.sum()
    cy = (small.sum(1) * np.arange(small.shape[0])).sum() / total
    cx = (small.sum(0) * np.arange(small.shape[1])).sum() / total
    top = int(np.clip(round(14 - cy), 0, 28 - small.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - small.shape[1]))
    out[top : top + small.shape[0], left : left + small.shape[1]] = small
    return np.clip(out, 0, 255).astype(np.uint8)


def _render(font: Any, char: str, rng: np.random.Generator) -> np.ndarray | None:
    """One augmented 28×28 rendering of ``char`` (None when the font draws no ink)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (96, 96))
    ImageDraw.Draw(canvas).text((48, 48), char, fill=255, font=font, anchor="mm")
    # Small rotations and shears: handwriting-like variety without changing the letter.
    angle = float(rng.uniform(-10, 10))
    shear = float(rng.uniform(-0.15, 0.15))
    canvas = canvas.rotate(angle, resample=Image.BILINEAR, center=(48, 48))
    canvas = canvas.transform(
        canvas.size, Image.AFFINE, (1, shear, -shear * 48, 0, 1, 0), resample=Image.BILINEAR
    )
    ink = np.asarray(canvas)
    if (ink > 16).sum() < 12:
        return None
    return _fit_28(ink)


def _font_families(chars: str, dirs: Sequence[str]) -> dict[str, list[str]]:
    """Font files whose character map covers every one of ``chars``, by family name."""
    from fontTools.ttLib import TTFont, TTLibError

    families: dict[str, list[str]] = {}
    files = sorted(
        str(p)
        for d in dirs
        for p in Path(d).rglob("*")
        if p.suffix.lower() in (".ttf", ".otf", ".ttc")
    )
    for path in files:
        try:
            font = TTFont(path, fontNumber=0, lazy=True)
            cmap = font.getBestCmap() or {}
            family = font["name"].getDebugName(1) or Path(path).stem
        except (TTLibError, OSError, KeyError, AssertionError):
            continue
        if all(ord(c) in cmap for c in chars):
            families.setdefault(family, []).append(path)
    return families


def _split_families(families: dict[str, list[str]], rng: np.random.Generator):
    """A quarter of the families (at least one) for test, the rest for training."""
    names = sorted(families)
    if len(names) < 2:
        return None
    rng.shuffle(names)
    n_test = max(1, len(names) // 4)
    return sorted(names[n_test:]), sorted(names[:n_test])


def _glyph_images(
    files: list[str], chars: str, per_class: int, rng: np.random.Generator, tick: Callable
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` renderings of each character, cycling through the font files."""
    from PIL import ImageFont

    fonts = [ImageFont.truetype(f, size=56) for f in files]
    images, labels = [], []
    for label, char in enumerate(chars):
        made, tries = 0, 0
        while made < per_class:
            image = _render(fonts[tries % len(fonts)], char, rng)
            tries += 1
            if tries > 20 * per_class + len(fonts):
                raise DataError(f"the fonts draw no ink for {char!r}; check the font packages")
            if image is None:
                continue
            images.append(image)
            labels.append(label)
            made += 1
            tick()
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# ------------------------------------------------------------------ the other domains
def _digits(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.stack(
        [
            _fit_28(np.asarray(Image.fromarray((x * 255 / 16).astype(np.uint8)).resize((40, 40))))
            for x in d.images
        ]
    )
    order = rng.permutation(len(images))
    n_test = len(images) // 4
    test, train = order[:n_test], order[n_test:]
    return images[train], d.target[train], images[test], d.target[test]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion(folder: Path, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    files = [folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"]
    if not all(f.is_file() for f in files):
        raise DataError(
            f"Fashion-MNIST's test files not found in {folder}; install the Debian package "
            "dataset-fashion-mnist or set CL_HRES_FASHION_MNIST to a folder holding "
            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
        )
    try:
        x, y = _read_idx(files[0]), _read_idx(files[1]).astype(np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{folder}: not readable as Fashion-MNIST IDX files ({exc})") from None
    n_train, n_test = TRAIN_PER_CLASS["fashion"], TEST_PER_CLASS["fashion"]
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < n_train + n_test:
            raise DataError(f"{folder}: too few Fashion-MNIST images of class {c}")
        train.extend(idx[:n_train])
        test.extend(idx[n_train : n_train + n_test])
    return x[train], y[train], x[test], y[test]


def _script_domains(
    scripts: dict[str, str],
    font_dirs: Sequence[str],
    train_n: dict[str, int],
    test_n: dict[str, int],
    rng: np.random.Generator,
) -> dict[str, tuple[tuple[np.ndarray, ...], dict[str, list[str]]]]:
    """Per script: ``(x_train, y_train, x_test, y_test)`` and the font families of each split."""
    plans = {}
    for script, chars in scripts.items():
        families = _font_families(chars, font_dirs)
        split = _split_families(families, rng)
        if split is None:
            raise DataError(
                f"fewer than two font families cover the {script} letters {chars} in "
                f"{', '.join(font_dirs)}; install font packages (e.g. {_FONT_PACKAGES})"
            )
        plans[script] = (families, split)
    total = sum((train_n[s] + test_n[s]) * len(c) for s, c in scripts.items())
    bar = _progress(total, "split-domains: rendering glyphs")
    out = {}
    for script, chars in scripts.items():
        families, (train_families, test_families) = plans[script]
        train_files = [f for fam in train_families for f in families[fam]]
        test_files = [f for fam in test_families for f in families[fam]]
        xtr, ytr = _glyph_images(train_files, chars, train_n[script], rng, lambda: bar.update())
        xte, yte = _glyph_images(test_files, chars, test_n[script], rng, lambda: bar.update())
        out[script] = ((xtr, ytr, xte, yte), {"train": train_families, "test": test_families})
    bar.close()
    return out


# ------------------------------------------------------------------------- build/load
def build_split_domains(
    out: Path,
    *,
    font_dirs: Sequence[str] = FONT_DIRS,
    fashion_dir: Path | None = None,
    scripts: dict[str, str] | None = None,
    train_per_class: dict[str, int] | None = None,
    test_per_class: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Builds ``split-domains.npz`` and ``manifest.json`` into ``out``; returns the npz.

    Args:
        out: Destination folder (created).
        font_dirs: Where the font files are looked for.
        fashion_dir: Folder of Fashion-MNIST's IDX files; default the Debian package's,
            or ``CL_HRES_FASHION_MNIST``.
        scripts: Letters per script domain (tests pass fewer); default :data:`SCRIPTS`.
        train_per_class: Training images per class and domain; default
            :data:`TRAIN_PER_CLASS`.
        test_per_class: Test images per class and domain; default :data:`TEST_PER_CLASS`.
        seed: Seed of every split and augmentation.

    Raises:
        DataError: a source is missing (Fashion-MNIST files, fonts of a script).
    """
    scripts = SCRIPTS if scripts is None else scripts
    train_n = {**TRAIN_PER_CLASS, **(train_per_class or {})}
    test_n = {**TEST_PER_CLASS, **(test_per_class or {})}
    fashion_dir = Path(fashion_dir or os.environ.get("CL_HRES_FASHION_MNIST", FASHION_DIR))
    rng = np.random.default_rng(seed)
    splits: dict[str, list] = {"x_train": [], "y_train": [], "x_test": [], "y_test": []}
    domain_of_class: list[int] = []
    class_names: list[str] = []
    fonts: dict[str, dict[str, list[str]]] = {}
    names = ["digits", "fashion", *scripts]

    def add(domain: int, parts: tuple[np.ndarray, ...], labels: Sequence[str]) -> None:
        offset = len(domain_of_class)
        for key, part in zip(splits, parts):
            splits[key].append(part + offset if key.startswith("y") else part)
        domain_of_class.extend([domain] * len(labels))
        class_names.extend(f"{names[domain]}:{c}" for c in labels)

    # The random stream is consumed in this order (digits, fashion, glyphs): a rebuild
    # with the same fonts gives the same file, byte for byte.
    add(0, _digits(rng), [str(i) for i in range(10)])
    add(1, _fashion(fashion_dir, rng), [str(i) for i in range(10)])
    glyphs = _script_domains(scripts, font_dirs, train_n, test_n, rng)
    for d, (script, chars) in enumerate(scripts.items(), start=2):
        parts, fonts[script] = glyphs[script]
        add(d, parts, list(chars))
    arrays = {k: np.concatenate(v) for k, v in splits.items()}
    arrays["domain_of_class"] = np.asarray(domain_of_class, dtype=np.int64)
    arrays["domain_names"] = np.asarray(names)
    arrays["class_names"] = np.asarray(class_names)
    return _write(out, arrays, names, fonts, seed)


def _write(out: Path, arrays: dict, names: list[str], fonts: dict, seed: int) -> Path:
    """The ``.npz`` (written whole, then renamed) and its manifest."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "split-domains.npz"
    tmp = out / "split-domains.npz.partial"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
    manifest = {
        "version": BUILD_VERSION,
        "sha256": _sha256(path),
        "seed": seed,
        "domains": names,
        "train_images": {
            n: int(np.isin(arrays["y_train"], np.flatnonzero(arrays["domain_of_class"] == i)).sum())
            for i, n in enumerate(names)
        },
        "fonts": fonts,
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_split_domains(data_root: str | Path, validation: float = 0.0, seed: int = 0):
    """The ``split-domains`` data from ``data_root/split-domains/``, built there if absent.

    Raises:
        DataError: the file does not match its manifest's checksum, or a source is missing.
    """
    from cl_hres.data.datasets import load_npz

    folder = Path(data_root) / "split-domains"
    path, manifest = folder / "split-domains.npz", folder / "manifest.json"
    if not path.is_file() or not manifest.is_file():
        build_split_domains(folder)
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        raise DataError(
            f"{manifest}: not a split-domains manifest; delete {folder} to rebuild"
        ) from None
    if _sha256(path) != expected:
        raise DataError(
            f"{path}: checksum does not match {manifest.name} (a partial or altered file); "
            f"delete {folder} to rebuild it"
        )
    data = load_npz(path, validation=validation, seed=seed)
    data.name = "split-domains"
    return data
