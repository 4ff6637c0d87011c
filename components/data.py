"""Prepare: ingest raw images, validate them, split them with a fixed seed, store them compactly.

Raw data comes in two layouts: MNIST-style IDX files (`format: idx`) or a class-per-folder tree of image
files (`format: folder`, PNG/JPEG/..., any size, gray or colour). Every image is decoded once here, converted
to the configured channels and size, and stored as uint8 arrays in one .npz, so training never decodes.

Bad input never reaches training silently. A file that cannot be used (not an image, undecodable, truncated,
an exact duplicate, the same picture under two labels) is quarantined and named in the report, or stops the
run at once with `bad_files: fail`. Problems no skipping can fix (no classes, an empty class, a class too
small for the split) stop the run with a message that names the class and the fix.
"""
from __future__ import annotations

import gzip
import hashlib
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from components.artifacts import atomic_path, sha256_file, write_json
from components.config import DataParams, DatasetParams
from components.errors import GraftError
from deploy.imaging import convert_mode, to_chw

IDX_SPLITS = {"train": "train", "test": "t10k"}


class DataError(GraftError, ValueError):
    """The raw data cannot be prepared; the message names the problem and the fix."""


@dataclass(frozen=True)
class Sample:
    origin: str          # file path, or "<idx file>#<index>", for the report
    label: int
    pixels: np.ndarray   # decoded at the original size, already in the target channel mode


@dataclass
class Quarantine:
    entries: list[dict] = field(default_factory=list)

    def add(self, origin: str, reason: str) -> None:
        self.entries.append({"file": origin, "reason": reason})


@dataclass(frozen=True)
class Splits:
    """Prepared data: uint8 images (N, C, H, W) and int64 labels for each split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


@dataclass(frozen=True)
class PrepareResult:
    path: Path
    data_version: str
    counts: dict[str, int]
    quarantined: int


# ---------------------------------------------------------------- reading


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        blob = handle.read()
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = blob[3]
    shape = struct.unpack(f">{ndim}I", blob[4 : 4 + 4 * ndim])
    body = np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: truncated IDX file: header says {shape}, found {body.size} bytes of data")
    return body.reshape(shape)


def _find_idx(root: Path, prefix: str, kind: str) -> Path:
    matches = sorted(root.glob(f"{prefix}-{kind}-idx*-ubyte*"))
    if not matches:
        raise DataError(f"{root}: no {prefix}-{kind}-idx*-ubyte[.gz] file; an idx data set needs train and t10k files")
    return matches[0]


def read_idx_split(root: Path, split: str) -> tuple[list[Sample], tuple[str, ...]]:
    prefix = IDX_SPLITS[split]
    images_path, labels_path = _find_idx(root, prefix, "images"), _find_idx(root, prefix, "labels")
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: {prefix} images {images.shape} and labels {labels.shape} do not match")
    classes_file = root / "classes.txt"
    n_classes = int(labels.max()) + 1
    classes = tuple(classes_file.read_text().split()) if classes_file.is_file() else tuple(map(str, range(n_classes)))
    if len(classes) < n_classes:
        raise DataError(f"{classes_file}: names {len(classes)} classes but labels go up to {n_classes - 1}")
    samples = [Sample(f"{images_path.name}#{i}", int(y), x) for i, (x, y) in enumerate(zip(images, labels))]
    return samples, classes


def _decode(path: Path, channels: int) -> np.ndarray:
    with Image.open(path) as image:
        image.load()  # decodes fully: raises on truncated or corrupt data
        return np.asarray(convert_mode(image, "L" if channels == 1 else "RGB"))


def read_folder(root: Path, channels: int, quarantine: Quarantine, fail_fast: bool) -> tuple[list[Sample], tuple[str, ...]]:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; a folder data set needs <path>/<class name>/<image files>")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"{root}: found {len(class_dirs)} class folder(s); need at least 2 (<path>/<class name>/<images>)")
    empty = [d.name for d in class_dirs if not any(f.is_file() for f in d.iterdir())]
    if empty:
        raise DataError(f"{root}: empty class folder(s): {', '.join(empty)}; add images to them or remove them")
    samples: list[Sample] = []
    files = [(label, f) for label, d in enumerate(class_dirs) for f in sorted(d.iterdir()) if f.is_file()]
    for label, path in tqdm(files, desc=f"decode {root.name}", unit="img", leave=False, mininterval=1.0):
        try:
            pixels = _decode(path, channels)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            reason = "not an image file" if isinstance(error, UnidentifiedImageError) else f"cannot decode: {error}"
            if fail_fast:
                raise DataError(f"{path}: {reason}; fix or remove the file, or set data.bad_files: quarantine") from None
            quarantine.add(str(path), reason)
            continue
        samples.append(Sample(str(path), label, pixels))
    return samples, tuple(d.name for d in class_dirs)


# ---------------------------------------------------------------- validating


def drop_duplicates(samples: list[Sample], classes: tuple[str, ...], quarantine: Quarantine, fail_fast: bool) -> list[Sample]:
    """Keep one copy of each exact duplicate image; drop every copy of an image seen under two labels.

    Duplicates must go before splitting: a copy on each side of a split leaks test images into training.
    """
    by_hash: dict[bytes, list[Sample]] = defaultdict(list)
    for sample in samples:
        key = hashlib.blake2b(sample.pixels.tobytes() + str(sample.pixels.shape).encode(), digest_size=16).digest()
        by_hash[key].append(sample)
    kept: list[Sample] = []
    for copies in by_hash.values():
        labels = {s.label for s in copies}
        if len(labels) > 1:
            names = ", ".join(sorted(classes[label] for label in labels))
            reason = f"the same image is labelled {names}: " + ", ".join(s.origin for s in copies)
            if fail_fast:
                raise DataError(f"conflicting labels: {reason}; keep the image in one class only")
            for sample in copies:
                quarantine.add(sample.origin, f"conflicting labels ({names})")
            continue
        kept.append(copies[0])
        for duplicate in copies[1:]:
            if fail_fast:
                raise DataError(f"{duplicate.origin}: exact duplicate of {copies[0].origin}; remove one copy")
            quarantine.add(duplicate.origin, f"exact duplicate of {copies[0].origin}")
    kept.sort(key=lambda s: s.origin)
    return kept


def to_arrays(samples: list[Sample], size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(samples), channels, size, size), dtype=np.uint8)
    for i, sample in enumerate(samples):
        x[i] = to_chw(sample.pixels, size, size)
    return x, np.array([s.label for s in samples], dtype=np.int64)


# ---------------------------------------------------------------- splitting


def stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n examples drawn class by class in proportion to class sizes (largest remainder)."""
    if n == 0:
        return np.array([], dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / counts.sum()
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: n - quota.sum()]:
        quota[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def k_per_class(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def _short_classes(y: np.ndarray, classes: tuple[str, ...], minimum: int) -> list[tuple[str, int]]:
    counts = np.bincount(y, minlength=len(classes))
    return [(classes[c], int(counts[c])) for c in range(len(classes)) if counts[c] < minimum]


def _check_class_sizes(y: np.ndarray, classes: tuple[str, ...], minimum: int, where: str) -> None:
    if too_few := _short_classes(y, classes, minimum):
        raise DataError(
            f"{where}: class(es) with fewer than {minimum} usable images: {', '.join(f'{n} ({c})' for n, c in too_few)}; "
            "add images, fix the quarantined ones, or lower data.min_images_per_class"
        )


def _check_split_fits(y_train: np.ndarray, classes: tuple[str, ...], need: int, where: str) -> None:
    if short := _short_classes(y_train, classes, need):
        raise DataError(
            f"{where}: too few training images left after the val/test split "
            f"({'; '.join(f'{n} has {c}' for n, c in short)}, need {need}); "
            "add images to those classes or lower val_size / test_size / labels_per_class"
        )


def split_samples(
    x: np.ndarray, y: np.ndarray, dataset: DatasetParams, split_seed: int, seed: int, classes: tuple[str, ...],
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> Splits:
    """Hold out test (unless given) and val with split_seed; then cut train to k a class with seed."""
    rng = np.random.default_rng(split_seed)
    rest = np.arange(len(y))
    if test is None:
        if dataset.test_size >= len(y):
            raise DataError(f"{dataset.name}: test_size {dataset.test_size} >= {len(y)} usable images")
        test_idx = stratified_take(y, dataset.test_size, rng)
        test = (x[test_idx], y[test_idx])
        rest = np.setdiff1d(rest, test_idx)
    if dataset.val_size >= len(rest):
        raise DataError(f"{dataset.name}: val_size {dataset.val_size} leaves no training images ({len(rest)} left)")
    val_idx = rest[stratified_take(y[rest], dataset.val_size, rng)]
    train_idx = np.setdiff1d(rest, val_idx)
    _check_split_fits(y[train_idx], classes, dataset.labels_per_class or 1, dataset.name)
    if dataset.labels_per_class:
        train_idx = train_idx[k_per_class(y[train_idx], dataset.labels_per_class, np.random.default_rng(seed))]
    return Splits(x[train_idx], y[train_idx], x[val_idx], y[val_idx], test[0], test[1], classes)


# ---------------------------------------------------------------- storing


def save_splits(splits: Splits, path: Path) -> None:
    arrays = {f"{a}_{s}": getattr(splits, f"{a}_{s}") for s in ("train", "val", "test") for a in ("x", "y")}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, classes=np.array(splits.classes), **arrays)


def load_splits(path: str | Path) -> Splits:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared data not found; run the prepare stage first (graft run, or dvc repro)")
    with np.load(path, allow_pickle=False) as npz:
        return Splits(**{k: npz[k] for k in npz.files if k != "classes"}, classes=tuple(str(c) for c in npz["classes"]))


def data_version(path: str | Path) -> str:
    """The content hash of a prepared data file: what a model was trained and tested on, exactly."""
    return sha256_file(path)[:12]


def prepare(dataset: DatasetParams, data: DataParams, subset_seed: int, out_path: Path, report_path: Path) -> PrepareResult:
    """Read, validate, deduplicate, split and store one data set; write its report (counts, quarantine).

    subset_seed draws the labels_per_class examples; the val/test splits depend on data.split_seed only."""
    quarantine = Quarantine()
    fail_fast = data.bad_files == "fail"
    root = Path(dataset.path)
    test = None
    if dataset.format == "idx":
        if not root.is_dir():
            raise DataError(f"{root}: no such folder; an idx data set needs <path>/train-*-idx*-ubyte.gz and t10k files")
        samples, classes = read_idx_split(root, "train")
        if dataset.test_size == 0:
            test_samples, _ = read_idx_split(root, "test")
            # A training image that also appears in the official test set would leak; drop it from training.
            test_hashes = {s.pixels.tobytes() for s in test_samples}
            for s in samples:
                if s.pixels.tobytes() in test_hashes:
                    quarantine.add(s.origin, "exact duplicate of a test image")
            samples = [s for s in samples if s.pixels.tobytes() not in test_hashes]
            test = to_arrays(drop_duplicates(test_samples, classes, quarantine, fail_fast), data.image_size, data.channels)
    else:
        samples, classes = read_folder(root, data.channels, quarantine, fail_fast)
    samples = drop_duplicates(samples, classes, quarantine, fail_fast)
    x, y = to_arrays(samples, data.image_size, data.channels)
    _check_class_sizes(y, classes, data.min_images_per_class, str(root))
    splits = split_samples(x, y, dataset, data.split_seed, subset_seed, classes, test)
    save_splits(splits, out_path)
    version = data_version(out_path)
    counts = {name: int(len(splits.split(name)[1])) for name in ("train", "val", "test")}
    per_class = {
        name: dict(zip(classes, np.bincount(splits.split(name)[1], minlength=len(classes)).tolist()))
        for name in ("train", "val", "test")
    }
    write_json(report_path, {
        "dataset": dataset.name,
        "path": str(root),
        "data_version": version,
        "classes": list(classes),
        "counts": counts,
        "per_class": per_class,
        "quarantined": len(quarantine.entries),
        "quarantine": quarantine.entries,
    })
    return PrepareResult(out_path, version, counts, len(quarantine.entries))
