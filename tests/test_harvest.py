"""Harvest: captured requests with feedback become labelled target images that train or validate and never test;
the rest become unlabelled production images; a second harvest adds nothing; the project's DVC versions it all."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.config import parse_params
from components.data import PRODUCTION_PREFIX, load_splits, prepare
from tests.conftest import RAW, make_small_target, tiny_params


def _prepare(root: Path, out: Path):
    params = parse_params(tiny_params(**{"data.target.path": str(root)}))
    prepare(params.data.target, params.data, 1, [28], params.seed, out / "t.npz", out / "t.json")
    return load_splits(out / "t.npz"), json.loads((out / "t.json").read_text())


def _fresh_images(classes: list[str], skip: int, count: int) -> dict[str, list[Path]]:
    """Real Animal-MNIST images the small target does not hold (it takes each class's first files)."""
    return {name: sorted((RAW / "animal-mnist" / name).iterdir())[skip : skip + count] for name in classes}


def test_production_images_train_or_validate_and_leave_the_test_split_as_it_was(tmp_path):
    target = make_small_target(tmp_path / "raw")
    before, _ = _prepare(target, tmp_path / "before")
    classes = list(before.classes)
    for name, files in _fresh_images(classes, 100, 4).items():
        for path in files:
            shutil.copy(path, target / name / f"{PRODUCTION_PREFIX}{path.name}")
    # A production copy of a test image, labelled as another class: dropped, the test image kept where it was.
    test_file = Path(before.origin_test[0])
    wrong = classes[(classes.index(test_file.parent.name) + 1) % len(classes)]
    shutil.copy(test_file, target / wrong / f"{PRODUCTION_PREFIX}copy.png")

    after, report = _prepare(target, tmp_path / "after")
    assert list(after.origin_test) == list(before.origin_test)
    np.testing.assert_array_equal(after.x_test, before.x_test)
    assert set(before.origin_val) <= set(after.origin_val) and set(before.origin_train) <= set(after.origin_train)
    production = [o for o in (*after.origin_train, *after.origin_val) if Path(o).name.startswith(PRODUCTION_PREFIX)]
    assert len(production) == 4 * len(classes)  # beyond labels_per_class: harvested labels all count
    assert not any(Path(o).name.startswith(PRODUCTION_PREFIX) for o in after.origin_test)
    assert report["production"]["test"] == 0
    assert report["production"]["train"] + report["production"]["val"] == len(production)
    assert report["production"]["val"] > 0  # data.production_val_share 0.2 of 40
    copy = next(e for e in report["quarantine"] if e["file"].endswith(f"{PRODUCTION_PREFIX}copy.png"))
    assert test_file.name in copy["reason"] and f"labelled {test_file.parent.name}" in copy["reason"]
    assert after.data_version != before.data_version

    # A later harvest moves no image between train and val: each file's side follows from its name.
    extra = _fresh_images(classes, 200, 1)
    for name, files in extra.items():
        shutil.copy(files[0], target / name / f"{PRODUCTION_PREFIX}{files[0].name}")
    later, _ = _prepare(target, tmp_path / "later")
    assert set(after.origin_val) <= set(later.origin_val) and set(after.origin_train) <= set(later.origin_train)
    assert list(later.origin_test) == list(before.origin_test)
