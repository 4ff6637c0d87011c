"""Harvest: captured requests with feedback become labelled target images that train or validate and never test;
the rest become unlabelled production images; a second harvest adds nothing; the project's DVC versions it all."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

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


def _capture(folder: Path, images: list[tuple[Path, str | None]], classes: list[str]) -> list[str]:
    """Answers captured by the server's own store, as a server writes them; each labelled with its class when given."""
    from deploy.capture import Answer, CaptureStore
    from deploy.settings import CaptureSettings

    store = CaptureStore(CaptureSettings(enabled=True, folder=str(folder)))
    ids = []
    for i, (path, _) in enumerate(images):
        ids.append(f"{i:032x}")
        store.submit(Answer(ids[-1], "predict", "graft-classifier", "1", "int8", tuple(classes),
                            np.full((1, len(classes)), 1 / len(classes), np.float32), path.read_bytes()))
    store.close()
    for item_id, (_, label) in zip(ids, images):
        if label is not None:
            store.label(item_id, label)
    return ids


def _tracked_hashes(root: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in (root / "data" / "raw").glob("*.dvc")}


def test_harvest_versions_labelled_and_unlabelled_images_once(workspace_factory):
    from components.harvest import UNLABELLED_FOLDER, harvest, unharvested_labels
    from components.settings import load_settings
    from deploy.capture import iter_items

    root = workspace_factory("harvest")
    target = root / "data" / "raw" / "animal-mnist"
    classes = sorted(p.name for p in target.iterdir() if p.is_dir())
    fresh = _fresh_images(classes, 100, 2)
    labelled = [(files[0], name) for name, files in fresh.items()]
    unlabelled = [(files[1], None) for files in fresh.values()]
    copy_of_target = (sorted((target / classes[0]).iterdir())[0], classes[1])  # a target image, labelled otherwise
    ids = _capture(root / "captures", [*labelled, *unlabelled, copy_of_target], classes)
    before = _tracked_hashes(root)

    first = harvest(root)
    assert first.captured == len(ids) and first.labelled == len(labelled) + 1
    assert first.added_labelled == dict.fromkeys(classes, 1) and first.added_unlabelled == len(unlabelled)
    assert [s["id"] for s in first.skipped] == [ids[-1]] and "the same image as" in first.skipped[0]["reason"]
    for (path, name), item_id in zip(labelled, ids):
        assert (target / name / f"{PRODUCTION_PREFIX}{item_id}.png").read_bytes() == path.read_bytes()
    assert len(list((root / UNLABELLED_FOLDER).iterdir())) == len(unlabelled)
    params = load_settings(root / "params.yaml")
    assert params.data.unlabeled["production"].path == UNLABELLED_FOLDER
    assert (params.finetune.adaptation.method, params.finetune.adaptation.unlabeled) == ("coral", None)
    after = _tracked_hashes(root)
    assert after["animal-mnist.dvc"] != before["animal-mnist.dvc"] and "production-unlabelled.dvc" in after

    # Every label is settled: added, or skipped by name in the harvest's report (a retrain would add nothing).
    report = json.loads((root / "reports/harvest.json").read_text())
    assert report["skipped"] == [{"id": ids[-1], "label": classes[1], "reason": first.skipped[0]["reason"]}]
    assert unharvested_labels(root, load_settings(root / "params.yaml"), list(iter_items(root / "captures"))) == 0

    second = harvest(root)  # nothing new: nothing written, the data version stays
    assert not second.changed and not second.added_labelled and not second.added_unlabelled
    assert _tracked_hashes(root) == after and load_settings(root / "params.yaml") == params
    done = subprocess.run([sys.executable, "-m", "graft", "data", "harvest", "--root", str(root)], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "nothing new: the data version is unchanged" in done.stdout, done.stderr
    assert f"skipped {ids[-1]}: the same image as" in done.stdout


def test_a_semi_supervised_term_that_is_on_learns_from_the_harvested_production_images_too(tmp_path):
    from components.harvest import _params_changes
    from components.settings import parse_settings

    params = parse_settings(tiny_params(**{"data.unlabeled": {"cam": {"path": "data/raw/cam"}},
                                           "finetune.semi_supervised.method": "fixmatch", "production.adaptation": "none"}))
    changes = _params_changes(params, tmp_path / "data" / "raw" / "production-unlabelled", tmp_path)
    assert changes == {"data.unlabeled.production": {"path": "data/raw/production-unlabelled"},
                       "finetune.semi_supervised.unlabeled": "production"}, "adaptation stays off, as production.adaptation says"
