"""Prepare: ingest raw images, validate them, split them with a fixed seed, store them compactly.

Raw data comes in two layouts: MNIST-style IDX files (`format: idx`) or a class-per-folder tree of image
files (`format: folder`, PNG/JPEG/..., any size, gray or colour). Every image is decoded once here, converted
to the colour mode and resized (once, from its decoded size) to each input size a source candidate needs, by
the same functions the server uses (deploy/contract.py), and stored as uint8 arrays in one .npz, so training
never decodes and never sees pixels the server would not produce. The test split keeps its file names, so the
gates can send those very files through the server's decoding path.

Bad input never reaches training silently. A file that cannot be used (not an image, undecodable, truncated,
smaller than data.min_image_side, more pixels than data.max_image_pixels, an exact duplicate or the same example
at a training size, the same picture under two labels, pixels with no defined range) is quarantined and named in
the report, or stops the run at once with `bad_files: fail`. Problems no skipping can fix (no classes, an empty
class, a class too small for the split) stop the run with a message that names the class and the fix.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from components.artifacts import atomic_path, write_json
from components.config import DataParams, DatasetParams
from components.errors import GraftError
from deploy.contract import COLOR_MODES, convert_mode, resize_chw

IDX_SPLITS = {"train": "train", "test": "t10k"}


class DataError(GraftError, ValueError):
    """The raw data cannot be prepared; the message names the problem and the fix."""


@dataclass(frozen=True)
class Sample:
    origin: str          # file path, or "<idx file>#<index>", for the report
    label: int
    pixels: np.ndarray   # decoded at the original size, already in the target channel mode
    mode: str = "L"      # what the file holds (file_mode): what data.channels should be; IDX files are gray bytes


@dataclass
class Quarantine:
    entries: list[dict] = field(default_factory=list)

    def add(self, origin: str, reason: str) -> None:
        self.entries.append({"file": origin, "reason": reason})


@dataclass
class Problems:
    """Problems no skipping can fix (an empty class, a symlink out of the folder, a class too small). The prepare
    stage stops at the first (collect=False: `add` raises); a check collects them all, so that one pass names
    everything to fix (`graft data add`)."""

    collect: bool = False
    found: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        if not self.collect:
            raise DataError(message)
        self.found.append(message)


STOP = Problems()  # the default: raises at the first problem, so it never holds one
FOLDER_LAYOUT = "<class name>/<image files>"


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    """Prepared data at one input size: uint8 images (N, C, H, W), int64 labels, where each image came from."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    origin_train: np.ndarray  # file path, or "<idx file>#<index>"
    origin_val: np.ndarray
    origin_test: np.ndarray
    data_version: str         # the content of the data set and its split, the same at every input size
    # Digests (pixels_digest) of held-out images taken out of this object (`graft tune` hands trials no test split):
    # without_held_out leaves them out of unlabelled images all the same.
    held_out_digests: frozenset[bytes] = frozenset()

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


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


ALPHA_MODES = ("RGBA", "LA")  # what convert_mode composites onto black (a palette with transparency: file_mode)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def file_mode(image: Image.Image) -> str:
    """What an image file holds, by PIL's mode name; a palette image named by what its palette holds (L or RGB,
    LA or RGBA when it has transparency), since a palette of grays is a gray image."""
    if image.mode not in ("P", "PA"):
        return image.mode
    palette = np.array(image.getpalette() or [0, 0, 0]).reshape(-1, 3)
    colour = bool((palette != palette[:, :1]).any())
    alpha = image.mode == "PA" or "transparency" in image.info
    return ("RGB" if colour else "L") + ("A" if alpha else "")


class Unusable(ValueError):
    """An image file the data cannot use; the message says why (for the quarantine list)."""


@dataclass(frozen=True)
class ImageLimits:
    """The sizes an image file must keep to be used: at least min_side px a side, at most max_pixels in all."""

    min_side: int
    max_pixels: int

    @classmethod
    def of(cls, data: DataParams) -> ImageLimits:
        return cls(data.min_image_side, data.max_image_pixels)

    def too_many_pixels(self, image: Image.Image) -> bool:
        """From the header alone: an opened image that declares more than max_pixels is never decoded."""
        return image.width * image.height > self.max_pixels


# decode_file checks each file's declared size against data.max_image_pixels before decoding it, and says so by
# the setting's name; PIL's own guard (a warning on the terminal from 89 Mpx, an error from 179 Mpx) would either
# talk past the user or refuse what the setting allows.
Image.MAX_IMAGE_PIXELS = None


def decode_file(source: Path | BinaryIO, channels: int, limits: ImageLimits) -> tuple[np.ndarray, str]:
    """An image file (a path or open bytes) -> its pixels in the data's colour mode and what the file holds
    (file_mode); Unusable when it is not an image, cannot be decoded, or its size is outside `limits` (a file
    that declares too many pixels is refused from its header, never decoded)."""
    try:
        with Image.open(source) as image:
            if limits.too_many_pixels(image):
                raise Unusable(f"too large: {image.width}x{image.height} px ({image.width * image.height / 1e6:.1f} Mpx), "
                               f"above data.max_image_pixels ({limits.max_pixels:,}); downscale it, or raise "
                               f"data.max_image_pixels")
            image.load()  # decodes fully: raises on truncated or corrupt data
            pixels, mode = np.asarray(convert_mode(image, COLOR_MODES[channels])), file_mode(image)
    except Unusable:
        raise
    except UnidentifiedImageError:
        raise Unusable("not an image file") from None
    except (OSError, ValueError) as error:
        raise Unusable(f"cannot decode: {error}") from None
    if min(pixels.shape[:2]) < limits.min_side:
        raise Unusable(f"too small: {pixels.shape[1]}x{pixels.shape[0]} px, below data.min_image_side ({limits.min_side})")
    return pixels, mode


def require_folder(path: Path, holding: str) -> None:
    """`path` is a folder; a file or nothing there is named as such, with what the folder should hold."""
    if path.is_file():
        raise DataError(f"{path} is a file, not a folder; give the folder holding {holding}")
    if not path.is_dir():
        raise DataError(f"{path}: no such folder; give the folder holding {holding}")


def data_files(folder: Path) -> list[Path]:
    """The files a data folder holds, subfolders included (a class folder's `day/` and `night/` are that class, as in
    torchvision's ImageFolder), hidden files and folders skipped (`.DS_Store`, `.ipynb_checkpoints`: the system's or
    a tool's, never the user's images), in a stable order. No file is opened: 10k files in milliseconds."""
    found = []
    for parent, folders, files in os.walk(folder):  # symlinked folders are not followed: DVC would not version them
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(parent) / name for name in files if not name.startswith(".")]
    return sorted(found)


def class_file_counts(root: Path, problems: Problems = STOP) -> dict[str, int]:
    """A folder data set's classes and the files each holds (`data_files`), no file opened: at least two class
    folders, none of them empty (an empty one is a problem, left out of what is returned)."""
    require_folder(root, FOLDER_LAYOUT)
    counts = {d.name: len(data_files(d)) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if len(counts) < 2:
        raise DataError(f"{root}: found {len(counts)} class folder(s); need at least 2 ({FOLDER_LAYOUT})")
    if empty := [name for name, count in counts.items() if not count]:
        problems.add(f"{root}: empty class folder(s): {', '.join(empty)}; add images to them or remove them")
    return {name: count for name, count in counts.items() if count}


def class_folders(root: Path, problems: Problems = STOP) -> list[Path]:
    """A folder data set's classes: at least two folders, none of them empty."""
    return [root / name for name in class_file_counts(root, problems)]


def _outside(path: Path, root: Path) -> bool:
    """A file reached through a symlink that leads out of the data folder (DVC would not version what it points
    at, and it may be anything on the machine)."""
    return not path.resolve().is_relative_to(root.resolve())


def read_folder(root: Path, channels: int, quarantine: Quarantine, fail_fast: bool, limits: ImageLimits,
                problems: Problems = STOP) -> tuple[list[Sample], tuple[str, ...]]:
    class_dirs = class_folders(root, problems)
    files = [(label, f) for label, d in enumerate(class_dirs) for f in data_files(d)]
    return _read_files(root, files, channels, quarantine, fail_fast, limits, problems), tuple(d.name for d in class_dirs)


def read_unlabeled(root: Path, channels: int, quarantine: Quarantine, fail_fast: bool,
                   limits: ImageLimits) -> list[Sample]:
    """Every image file under an unlabelled folder (`data_files`), label -1."""
    require_folder(root, "the unlabelled image files (subfolders allowed)")
    files = [(-1, f) for f in data_files(root)]
    if not files:
        raise DataError(f"{root}: no files in the unlabelled folder; add the target images or remove the data.unlabeled entry")
    return _read_files(root, files, channels, quarantine, fail_fast, limits)


def _read_files(root: Path, files: list[tuple[int, Path]], channels: int, quarantine: Quarantine, fail_fast: bool,
                limits: ImageLimits, problems: Problems = STOP) -> list[Sample]:
    if escaped := [f for _, f in files if _outside(f, root)]:
        problems.add(f"{', '.join(map(str, escaped[:3]))}{' and more' if len(escaped) > 3 else ''}: a symlink out of the "
                     f"data folder {root}; copy the image(s) into the folder instead")
        files = [(label, f) for label, f in files if f not in escaped]  # collecting: the rest is still checked
    samples: list[Sample] = []
    for label, path in tqdm(files, desc=f"decode {root.name}", unit="img", leave=False, mininterval=1.0):
        try:
            pixels, mode = decode_file(path, channels, limits)
        except Unusable as reason:
            if fail_fast:
                raise DataError(f"{path}: {reason}; fix or remove the file, or set data.bad_files: quarantine") from None
            quarantine.add(str(path), str(reason))
            continue
        samples.append(Sample(str(path), label, pixels, mode))
    return samples


# ---------------------------------------------------------------- validating


def _views(sizes: tuple[int, ...]) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """How two images can be one example: the same decoded pixels, or the same pixels at a training size (a photo
    saved at two resolutions, a blank 1x1 and a blank 4000x3000: one input to the model)."""
    return [("exact duplicate of", lambda pixels: pixels),
            *((f"the same image at {size}x{size} px as", lambda pixels, size=size: resize_chw(pixels, size, size))
              for size in sizes)]


def pixels_digest(pixels: np.ndarray) -> bytes:
    """Two images with this digest are the same pixels (and shape)."""
    return hashlib.blake2b(pixels.tobytes() + str(pixels.shape).encode(), digest_size=16).digest()


def drop_duplicates(samples: list[Sample], classes: tuple[str, ...], quarantine: Quarantine, fail_fast: bool,
                    sizes: tuple[int, ...] = ()) -> list[Sample]:
    """Keep one copy of each duplicate image (_views); drop every copy of an image seen under two labels.

    Duplicates must go before splitting: a copy on each side of a split leaks test images into training.
    """
    for what, view in _views(sizes):
        samples = _drop_same(samples, classes, quarantine, fail_fast, what, view)
    return samples


def drop_seen(newcomers: list[Sample], kept: list[Sample], classes: tuple[str, ...], quarantine: Quarantine,
              fail_fast: bool, sizes: tuple[int, ...] = ()) -> list[Sample]:
    """`newcomers` (harvested production images) without those `kept` already holds (_views): the copy that came
    later goes, whatever its label, so a harvest never moves or removes an image the data set had."""
    for what, view in _views(sizes):
        seen = {pixels_digest(view(sample.pixels)): sample for sample in kept}
        fresh = []
        for sample in newcomers:
            if (match := seen.get(pixels_digest(view(sample.pixels)))) is None:
                fresh.append(sample)
                continue
            reason = f"{what} {match.origin}" + ("" if match.label == sample.label else
                                                 f", which is labelled {classes[match.label]}, not {classes[sample.label]}")
            if fail_fast:
                raise DataError(f"{sample.origin}: {reason}; remove it")
            quarantine.add(sample.origin, reason)
        newcomers = fresh
    return newcomers


def _drop_same(samples: list[Sample], classes: tuple[str, ...], quarantine: Quarantine, fail_fast: bool, what: str,
               view) -> list[Sample]:
    by_hash: dict[bytes, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_hash[pixels_digest(view(sample.pixels))].append(sample)
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
                raise DataError(f"{duplicate.origin}: {what} {copies[0].origin}; remove one copy")
            quarantine.add(duplicate.origin, f"{what} {copies[0].origin}")
    kept.sort(key=lambda s: s.origin)
    return kept


def to_pixels(samples: list[Sample], size: int, channels: int) -> np.ndarray:
    x = np.empty((len(samples), channels, size, size), dtype=np.uint8)
    for i, sample in enumerate(samples):
        x[i] = resize_chw(sample.pixels, size, size)
    return x


# ---------------------------------------------------------------- splitting


def stratified_quota(counts: np.ndarray, n: int) -> np.ndarray:
    """How many of n examples each class gives: one each first when n allows it (a split that leaves a class out
    cannot measure it), the rest in proportion to what each class has left (largest remainder). Classes of equal
    size get what proportions alone would give them."""
    counts = np.asarray(counts, dtype=np.int64)
    first = (counts > 0).astype(np.int64) if n >= np.count_nonzero(counts) else np.zeros_like(counts)
    spare, rest = counts - first, n - int(first.sum())
    exact = spare * rest / max(int(spare.sum()), 1)
    quota = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - quota), kind="stable")[: rest - int(quota.sum())]:
        quota[i] += 1
    return first + quota


def stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n examples drawn class by class (stratified_quota)."""
    if n == 0:
        return np.array([], dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, stratified_quota(counts, n))]
    return np.sort(np.concatenate(picked))


def k_per_class(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def _short_classes(y: np.ndarray, classes: tuple[str, ...], minimum: int) -> list[tuple[str, int]]:
    counts = np.bincount(y, minlength=len(classes))
    return [(classes[c], int(counts[c])) for c in range(len(classes)) if counts[c] < minimum]


def check_class_sizes(y: np.ndarray, classes: tuple[str, ...], minimum: int, where: str, problems: Problems = STOP) -> None:
    if too_few := _short_classes(y, classes, minimum):
        problems.add(
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


def split_indices(
    y: np.ndarray, dataset: DatasetParams, split_seed: int, seed: int, classes: tuple[str, ...], test_idx: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Hold out test (unless given) and val with split_seed; then cut train to k a class with seed."""
    rng = np.random.default_rng(split_seed)
    rest = np.arange(len(y))
    if test_idx is None:
        if dataset.test_size >= len(y):
            raise DataError(f"{dataset.name}: test_size {dataset.test_size} >= {len(y)} usable images")
        test_idx = stratified_take(y, dataset.test_size, rng)
    rest = np.setdiff1d(rest, test_idx)
    if dataset.val_size >= len(rest):
        raise DataError(f"{dataset.name}: val_size {dataset.val_size} leaves no training images ({len(rest)} left)")
    val_idx = rest[stratified_take(y[rest], dataset.val_size, rng)]
    train_idx = np.setdiff1d(rest, val_idx)
    _check_split_fits(y[train_idx], classes, dataset.labels_per_class or 1, dataset.name)
    if dataset.labels_per_class:
        train_idx = train_idx[k_per_class(y[train_idx], dataset.labels_per_class, np.random.default_rng(seed))]
    return {"train": train_idx, "val": val_idx, "test": test_idx}


PRODUCTION_PREFIX = "production-"  # a target file harvested from production (`graft data harvest`)


def is_production(origin: str) -> bool:
    """A harvested production image: it trains or validates, never tests (the test split stays what it was)."""
    return Path(origin).name.startswith(PRODUCTION_PREFIX)


def with_production(index: dict[str, np.ndarray], first: int, origins: list[str], val_share: float) -> dict[str, np.ndarray]:
    """The split with the harvested images (indices first, first + 1, ...) added to val and train. Each file's side
    follows from its name, so a later harvest moves no image from one side to the other."""
    in_val = np.array([int.from_bytes(hashlib.blake2b(Path(o).name.encode(), digest_size=4).digest()) / 2**32 < val_share
                       for o in origins], dtype=bool)
    added = first + np.arange(len(origins))
    return {**index, "train": np.concatenate([index["train"], added[~in_val]]),
            "val": np.concatenate([index["val"], added[in_val]])}


TEST_FRACTION, VAL_FRACTION = 0.15, 0.10  # a proposed split: a test set the gates can judge, val to watch training


def split_counts(counts: np.ndarray, test_size: int, val_size: int) -> dict[str, np.ndarray]:
    """Each class's share of each split, as split_indices draws them, from the class sizes alone
    (test_size + val_size below the total)."""
    test = stratified_quota(counts, test_size)
    val = stratified_quota(counts - test, val_size)
    return {"train": counts - test - val, "val": val, "test": test}


def split_shortfalls(counts: dict[str, int], dataset: DatasetParams) -> list[str]:
    """Why the configured split does not fit these class sizes (nothing: it fits). It fits when every class is in
    each split asked for (val_size, test_size > 0) and keeps labels_per_class (at least one) to train on."""
    names, sizes = list(counts), np.array(list(counts.values()), dtype=np.int64)
    total, need = int(sizes.sum()), dataset.labels_per_class or 1
    if dataset.test_size + dataset.val_size >= total:
        return [f"test_size {dataset.test_size} + val_size {dataset.val_size} leave none of {total} images to train on"]
    few = [f"{key} {size} < {len(names)} classes" for key, size in (("test_size", dataset.test_size),
                                                                    ("val_size", dataset.val_size)) if 0 < size < len(names)]
    train = split_counts(sizes, dataset.test_size, dataset.val_size)["train"]
    if len(short := np.flatnonzero(train < need)):
        listed = ", ".join(f"{names[i]} keeps {train[i]}" for i in short[:3])
        listed += f" and {len(short) - 3} more" if len(short) > 3 else ""
        few.append(f"{listed} to train on, need {need}{' (labels_per_class)' if dataset.labels_per_class else ''}")
    return few


def propose_split(counts: dict[str, int], dataset: DatasetParams) -> DatasetParams | None:
    """val_size and test_size at sensible fractions, every class in each split; labels_per_class (when set) lowered
    to what the smallest class keeps for training. The fractions give way to one image a class in val and test
    when a class is too small for them; None when even that leaves a class no training image (under 3 images)."""
    sizes = np.array(list(counts.values()), dtype=np.int64)
    total, classes = int(sizes.sum()), len(sizes)
    for test_fraction, val_fraction in ((TEST_FRACTION, VAL_FRACTION), (0.0, 0.0)):
        test, val = max(classes, round(test_fraction * total)), max(classes, round(val_fraction * total))
        if test + val < total and (kept := int(split_counts(sizes, test, val)["train"].min())) >= 1:
            labels = min(dataset.labels_per_class, kept) if dataset.labels_per_class else None
            return dataset.model_copy(update={"test_size": test, "val_size": val, "labels_per_class": labels})
    return None


def fitting_split(counts: dict[str, int], dataset: DatasetParams, where: str, problems: Problems = STOP,
                  keep: bool = True) -> DatasetParams | None:
    """`dataset` when its split fits these class sizes (and `keep`: it was set for these data), else the split
    propose_split proposes; None when no split fits (a problem: a class too small for one image in each split)."""
    if keep and not split_shortfalls(counts, dataset):
        return dataset
    if proposal := propose_split(counts, dataset):
        return proposal
    smallest = min(counts, key=counts.__getitem__)
    problems.add(f"{where}: no split fits: {smallest} has {counts[smallest]} image(s), and every class needs one in val, "
                 f"one in test and one to train on; add images to it or remove it")
    return None


SPLIT_KEYS = ("test_size", "val_size", "labels_per_class")


def split_changes(before: DatasetParams, after: DatasetParams) -> dict[str, tuple]:
    """The split keys that differ: key -> (before, after)."""
    return {key: (getattr(before, key), getattr(after, key)) for key in SPLIT_KEYS if getattr(before, key) != getattr(after, key)}


def content_version(samples: list[Sample], index: dict[str, np.ndarray]) -> str:
    """A hash of every image as decoded, its label and its split: the data version, whatever the input sizes."""
    digest = hashlib.blake2b(digest_size=16)
    for split in SPLITS:
        for i in index[split]:
            sample = samples[i]
            digest.update(f"{split}:{sample.label}:{sample.pixels.shape}:".encode())
            digest.update(sample.pixels.tobytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------- storing


def _array_key(split: str, size: int) -> str:
    return f"x_{split}_{size}"


def save_prepared(path: Path, pixels: dict[int, np.ndarray], labels: np.ndarray, origins: np.ndarray,
                  index: dict[str, np.ndarray], classes: tuple[str, ...], version: str) -> None:
    """One .npz: each split at each input size, labels, origins, classes and the data version."""
    arrays = {_array_key(split, size): x[index[split]] for size, x in pixels.items() for split in SPLITS}
    arrays.update({f"y_{split}": labels[index[split]] for split in SPLITS})
    arrays.update({f"origin_{split}": origins[index[split]] for split in SPLITS})
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, classes=np.array(classes), sizes=np.array(sorted(pixels)), data_version=np.array(version), **arrays)


def save_splits(splits: Splits, path: Path) -> None:
    """Prepared data at one input size (what fine-tuning and everything after it use)."""
    size = splits.image_size
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, classes=np.array(splits.classes), sizes=np.array([size]), data_version=np.array(splits.data_version),
                 **{_array_key(s, size): splits.split(s)[0] for s in SPLITS}, **{f"y_{s}": splits.split(s)[1] for s in SPLITS},
                 **{f"origin_{s}": getattr(splits, f"origin_{s}") for s in SPLITS})


def prepared_sizes(path: str | Path) -> list[int]:
    with np.load(_existing(path), allow_pickle=False) as npz:
        return [int(s) for s in npz["sizes"]]


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prepared data not found; run the prepare stage first (graft run, or dvc repro)")
    return path


def load_splits(path: str | Path, image_size: int | None = None) -> Splits:
    """The splits at one input size (the only one stored, when image_size is None)."""
    with np.load(_existing(path), allow_pickle=False) as npz:
        sizes = [int(s) for s in npz["sizes"]]
        if image_size is None and len(sizes) == 1:
            image_size = sizes[0]
        if image_size not in sizes:
            raise DataError(f"{path}: holds images at {sizes} px, not {image_size}; run the prepare stage again")
        arrays = {f"x_{s}": npz[_array_key(s, image_size)] for s in SPLITS}
        arrays.update({f"{kind}_{s}": npz[f"{kind}_{s}"] for s in SPLITS for kind in ("y", "origin")})
        return Splits(**arrays, classes=tuple(str(c) for c in npz["classes"]), data_version=str(npz["data_version"]))


def data_version(path: str | Path) -> str:
    """The content version of a prepared data file: what a model was trained and tested on, exactly."""
    with np.load(_existing(path), allow_pickle=False) as npz:
        return str(npz["data_version"])


def prepare(dataset: DatasetParams, data: DataParams, channels: int, sizes: list[int], subset_seed: int,
            out_path: Path, report_path: Path) -> PrepareResult:
    """Read, validate, deduplicate, split and store one data set at each input size; write its report
    (counts, quarantine). subset_seed draws the labels_per_class examples; val/test depend on data.split_seed only."""
    quarantine = Quarantine()
    fail_fast = data.bad_files == "fail"
    root = Path(dataset.path)
    test_idx = None
    if dataset.format == "idx":
        require_folder(root, "train-*-idx*-ubyte.gz and t10k-* files")
        samples, classes = read_idx_split(root, "train")
        if dataset.test_size == 0:
            test_samples, _ = read_idx_split(root, "test")
            # A training image that also appears in the official test set would leak; drop it from training.
            test_hashes = {s.pixels.tobytes() for s in test_samples}
            for s in samples:
                if s.pixels.tobytes() in test_hashes:
                    quarantine.add(s.origin, "exact duplicate of a test image")
            samples = drop_duplicates([s for s in samples if s.pixels.tobytes() not in test_hashes], classes, quarantine, fail_fast)
            test_samples = drop_duplicates(test_samples, classes, quarantine, fail_fast)
            test_idx = np.arange(len(samples), len(samples) + len(test_samples))
            samples = samples + test_samples
        else:
            samples = drop_duplicates(samples, classes, quarantine, fail_fast)
    else:
        samples, classes = read_folder(root, channels, quarantine, fail_fast, ImageLimits.of(data))
        production = [s for s in samples if is_production(s.origin)]
        samples = drop_duplicates([s for s in samples if not is_production(s.origin)], classes, quarantine, fail_fast,
                                  tuple(sorted(sizes)))
        production = drop_duplicates(drop_seen(production, samples, classes, quarantine, fail_fast, tuple(sorted(sizes))),
                                     classes, quarantine, fail_fast, tuple(sorted(sizes)))
    if dataset.format == "idx" and channels == 3:
        samples = [Sample(s.origin, s.label, np.asarray(convert_mode(Image.fromarray(s.pixels), "RGB"))) for s in samples]
    labels = np.array([s.label for s in samples], dtype=np.int64)
    training_pool = labels if test_idx is None else labels[: test_idx[0]]
    check_class_sizes(training_pool, classes, data.min_images_per_class, str(root))
    index = split_indices(labels, dataset, data.split_seed, subset_seed, classes, test_idx)
    if dataset.format == "folder" and production:  # after the split: the data set's own images split as before
        index = with_production(index, len(samples), [s.origin for s in production], data.production_val_share)
        samples = samples + production
        labels = np.array([s.label for s in samples], dtype=np.int64)
    version = content_version(samples, index)
    origins = np.array([s.origin for s in samples])
    pixels = {size: to_pixels(samples, size, channels) for size in sizes}
    save_prepared(out_path, pixels, labels, origins, index, classes, version)
    counts = {name: int(len(index[name])) for name in SPLITS}
    per_class = {name: dict(zip(classes, np.bincount(labels[index[name]], minlength=len(classes)).tolist())) for name in SPLITS}
    write_json(report_path, {
        "dataset": dataset.name,
        "path": str(root),
        "data_version": version,
        "sizes": sorted(sizes),
        "channels": channels,
        "classes": list(classes),
        "counts": counts,
        "per_class": per_class,
        "production": {split: int(sum(is_production(o) for o in origins[index[split]])) for split in SPLITS},
        "quarantined": len(quarantine.entries),
        "quarantine": quarantine.entries,
    })
    return PrepareResult(out_path, version, counts, len(quarantine.entries))


def usable_unlabeled(root: Path, data: DataParams, sizes: list[int], quarantine: Quarantine, fail_fast: bool) -> list[Sample]:
    """The usable images of an unlabelled folder, as prepare_unlabeled stores them (and `graft data add --as
    unlabeled` checks them): decoded in data.channels, one of each set of duplicates at the training `sizes`; the rest
    named in `quarantine`."""
    samples = read_unlabeled(root, data.channels, quarantine, fail_fast, ImageLimits.of(data))
    return drop_duplicates(samples, (), quarantine, fail_fast, tuple(sorted(sizes)))


def prepare_unlabeled(root: Path, data: DataParams, sizes: list[int], out_path: Path, report_path: Path) -> PrepareResult:
    """Unlabelled target images, validated and deduplicated as labelled ones are, at each input size, in one .npz."""
    quarantine = Quarantine()
    samples = usable_unlabeled(root, data, sizes, quarantine, data.bad_files == "fail")
    if not samples:
        raise DataError(f"{root}: none of the {len(quarantine.entries)} file(s) is a usable image (see {report_path}); "
                        "add images the target model will see, or remove the data.unlabeled entry")
    digest = hashlib.blake2b(digest_size=16)
    for sample in samples:
        digest.update(f"{sample.pixels.shape}:".encode() + sample.pixels.tobytes())
    version = digest.hexdigest()[:12]
    with atomic_path(out_path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, sizes=np.array(sorted(sizes)), data_version=np.array(version),
                 origins=np.array([s.origin for s in samples]),
                 **{f"x_unlabeled_{size}": to_pixels(samples, size, data.channels) for size in sizes})
    write_json(report_path, {"path": str(root), "data_version": version, "sizes": sorted(sizes), "channels": data.channels,
                             "images": len(samples), "quarantined": len(quarantine.entries), "quarantine": quarantine.entries})
    return PrepareResult(out_path, version, {"unlabeled": len(samples)}, len(quarantine.entries))


def outside_held_out(images: np.ndarray, splits: Splits) -> np.ndarray:
    """Which of `images` are no val or test image of `splits` (pixel for pixel at this size; the test split's too
    where it was taken out, by its digests): a boolean mask."""
    held_out = {pixels_digest(image) for image in (*splits.x_val, *splits.x_test)} | splits.held_out_digests
    return np.array([pixels_digest(image) not in held_out for image in images], dtype=bool)


def without_held_out(unlabeled: np.ndarray, splits: Splits) -> tuple[np.ndarray, int]:
    """The unlabelled images that are no val or test image (outside_held_out), and how many were dropped: training
    on a test image, even without its label, would flatter the test."""
    kept = outside_held_out(unlabeled, splits)
    return unlabeled[kept], int((~kept).sum())


def load_unlabeled(path: str | Path, image_size: int) -> np.ndarray:
    """Prepared unlabelled images at one input size, uint8 (N, C, H, W)."""
    with np.load(_existing(path), allow_pickle=False) as npz:
        key = f"x_unlabeled_{image_size}"
        if key not in npz:
            raise DataError(f"{path}: holds unlabelled images at {[int(s) for s in npz['sizes']]} px, not {image_size}; "
                            "run the prepare_unlabeled stage again")
        return npz[key]
