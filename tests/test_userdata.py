"""`graft data add PATH --as target`: a user's folder checked, versioned and made the target in one command, and
the settings its data decides (split, colour mode, registry model) written into params.yaml; `--as unlabeled`: a
folder of unlabelled images made an entry of data.unlabeled."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components import data
from components.config import ParamsError, parse_params
from components.settings import load_settings
from components.userdata import check_in_its_colour_mode, check_raw_data
from components.data import prepare
from components.dvc_runner import dvc_status, pending_stages
from tests.conftest import PROJECT, make_small_target, tiny_params


def _graft(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "graft", *args], cwd=root, env=env, capture_output=True, text=True)


def _colour_folder(dest: Path, classes: tuple[str, ...], per_class: int) -> Path:
    """Tiny random RGB images (distinct at every training size), as a user's photos would be."""
    rng = np.random.default_rng(0)
    for name in classes:
        (dest / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(dest / name / f"{i}.png")
    return dest


def _half_transparent(path: Path) -> None:
    pixels = np.random.default_rng(len(str(path))).integers(0, 256, (16, 16, 4), dtype=np.uint8)
    pixels[8:, :, 3] = 0
    Image.fromarray(pixels, "RGBA").save(path)


def _comments(text: str) -> list[tuple[int, str]]:
    """Each comment and the column it starts at."""
    return [(line.index(" #"), line[line.index(" #"):]) for line in text.splitlines() if " #" in line]


def _prepared(root: Path, tmp: Path) -> dict:
    """The prepare stage's report on the target params.yaml names now."""
    params = load_settings(root / "params.yaml")
    target = params.data.target.model_copy(update={"path": str(root / params.data.target.path)})
    prepare(target, params.data, params.data.channels, [28], params.seed, tmp / "t.npz", tmp / "t.json")
    return json.loads((tmp / "t.json").read_text())


def test_data_add_checks_copies_versions_and_points_params_at_the_folder(workspace_factory, tmp_path):
    root = workspace_factory("data-add")
    parts = make_small_target(tmp_path / "parts", per_class=12, classes=3)
    (parts / "bear" / "notes.txt").write_text("not an image")
    (parts / "cat" / "night").mkdir()
    for image in sorted((parts / "cat").glob("*.png"))[:4]:
        image.rename(parts / "cat" / "night" / image.name)
    for image in sorted((parts / "bird").glob("*.png"))[:6]:
        image.unlink()
    done = _graft(root, "data", "add", str(parts), "--as", "target")
    assert done.returncode == 0, done.stdout + done.stderr
    usable = int(re.search(r"3 classes \(bear, bird, cat\), (\d+) usable images, \d+ to be quarantined:", done.stdout)[1])
    assert "  data/raw/parts/bear/notes.txt: not an image file" in done.stdout
    assert f"images: {usable} gray -> data.channels: 1 (unchanged)" in done.stdout
    assert "subfolders: cat 4 file(s) in subfolders of their class folder, read as that class" in done.stdout
    assert "classes: 6 (bird) to 12 usable images, 2.0:1; finetune.class_balance resample evens them in training" \
        in done.stdout
    proposed = re.search(r"^split: data\.target\.test_size 60 -> (\d+), val_size 40 -> (\d+), labels_per_class 5 -> null "
                         r"\(every training image\) "
                         rf"\(3 classes, {usable} usable images; every class in each split\)$", done.stdout, re.M)
    assert proposed, done.stdout
    assert "registry: model name graft-classifier -> graft-parts (a new class set is a new model; graft-classifier's " \
           "champion is untouched)" in done.stdout
    assert "copied into data/raw/parts, tracked with DVC (data/raw/parts.dvc)" in done.stdout
    assert done.stdout.splitlines()[-1] == "next: git add data/raw/parts.dvc data/raw/.gitignore params.yaml && graft run"

    params = load_settings(root / "params.yaml")
    target = params.data.target
    assert (target.name, target.format, target.path) == ("parts", "folder", "data/raw/parts")
    assert (target.test_size, target.val_size) == (int(proposed[1]), int(proposed[2]))
    assert target.labels_per_class is None and params.registry.model_name == "graft-parts", "a user's labels all train"
    check_raw_data(root, params)  # what `graft run` checks first agrees
    report = _prepared(root, tmp_path)
    assert all(min(report["per_class"][split].values()) >= 1 for split in ("train", "val", "test")), report["per_class"]
    assert sorted(p.name for p in (root / "data/raw/parts/cat").rglob("*")) == sorted(p.name for p in (parts / "cat").rglob("*"))
    assert (root / "data/raw/parts.dvc").is_file()
    status = dvc_status(root)
    assert "data/raw/parts.dvc" not in status, status

    # The old target's folder goes; its leftover .dvc file no longer keeps the pipeline from "nothing to do".
    shutil.rmtree(root / "data/raw/animal-mnist")
    status = dvc_status(root)
    assert "data/raw/animal-mnist.dvc" in status
    data_paths = list(load_settings(root / "params.yaml").raw_data_paths().values())
    assert not [name for name in pending_stages(status, data_paths) if name.endswith(".dvc")], json.dumps(status)


def test_data_add_as_unlabeled_checks_versions_and_names_the_folder_and_keeps_what_terms_feed_on(workspace_factory, tmp_path):
    root = workspace_factory("data-add-unlabeled")
    camera = tmp_path / "camera"
    (camera / "day-1").mkdir(parents=True)  # subfolders are just folders: no classes
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(camera / "day-1" / f"{i}.png")
    for i, image in enumerate(sorted((root / "data/raw/animal-mnist").rglob("*.png"))[:4]):
        shutil.copy(image, camera / f"{i}.png")
    (camera / "notes.txt").write_text("not an image")
    before = (root / "params.yaml").read_text()
    done = _graft(root, "data", "add", str(camera), "--as", "unlabeled")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"checked {camera}: 9 usable images, 1 to be quarantined:\n  data/raw/camera/notes.txt: not an image file\n" \
        in done.stdout
    assert "images: 5 RGB, 4 gray, read as the target's gray (data.channels: 1)" in done.stdout
    assert "to learn from it: set finetune.adaptation.method (coral | mmd | dann" in done.stdout
    assert "copied into data/raw/camera, tracked with DVC (data/raw/camera.dvc); params.yaml: data.unlabeled.camera: " \
           "{path: data/raw/camera}" in done.stdout
    assert done.stdout.splitlines()[-1] == "next: git add data/raw/camera.dvc data/raw/.gitignore params.yaml && graft run"
    after = (root / "params.yaml").read_text()
    assert [comment for _, comment in _comments(after)] == [comment for _, comment in _comments(before)]
    params = load_settings(root / "params.yaml")
    assert {name: entry.path for name, entry in params.data.unlabeled.items()} == {"camera": "data/raw/camera"}
    assert "data/raw/camera" in params.raw_data_paths().values() and (root / "data/raw/camera.dvc").is_file()
    assert sorted(p.name for p in (root / "data/raw/camera").rglob("*")) == sorted(p.name for p in camera.rglob("*"))
    assert "data/raw/camera.dvc" not in dvc_status(root)

    # FixMatch on, feeding on the only entry (unlabeled: null): a second entry must not change what it feeds on.
    from components.userdata import set_params
    (root / "params.yaml").write_text(set_params(after, {"finetune.semi_supervised.method": "fixmatch"}))
    phone = tmp_path / "phone"
    phone.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(phone / f"{i}.jpg")
    done = _graft(root, "data", "add", str(phone), "--as", "unlabeled")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finetune.semi_supervised.unlabeled: null -> camera (it fed on the only entry, which is one of two now)" \
        in done.stdout
    assert "to learn from it: finetune.semi_supervised on already (name it in .unlabeled to use it)" in done.stdout
    params = load_settings(root / "params.yaml")
    assert list(params.data.unlabeled) == ["camera", "phone"] and params.finetune.semi_supervised.unlabeled == "camera"

    # Refused, nothing changed: a name taken, a folder without one usable image.
    settled, raw = (root / "params.yaml").read_text(), sorted((root / "data/raw").iterdir())
    for folder, name, said in ((phone, "camera", "data/raw/camera already exists; pass another --name"),
                               (tmp_path / "nothing", "nothing", "no file in the folder is a usable image")):
        folder.mkdir(exist_ok=True)
        (folder / "readme.txt").write_text("not an image")
        refused = _graft(root, "data", "add", str(folder), "--as", "unlabeled", "--name", name)
        assert refused.returncode == 2 and said in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert (root / "params.yaml").read_text() == settled and sorted((root / "data/raw").iterdir()) == raw


def test_data_add_says_how_unequal_the_classes_are_and_what_training_does_about_it():
    from components.userdata import balance_line

    assert balance_line({"a": 10, "b": 19}, "resample", "val_accuracy") is None  # under 2:1: any real data's spread
    assert balance_line({"a": 40, "b": 8, "c": 20}, "none", "val_balanced_accuracy") == (
        "classes: 8 (b) to 40 usable images, 5.0:1; finetune.class_balance none: trained as they come (resample would "
        "even them)")
    assert balance_line({"a": 40, "b": 8}, "resample", "val_accuracy") == (
        "classes: 8 (b) to 40 usable images, 5.0:1; finetune.class_balance resample evens them in training; val "
        "accuracy follows these shares: tune.objective and finetune.early_stopping.metric val_balanced_accuracy count "
        "each class alike")


def test_a_colour_folder_gets_three_channels_a_split_that_fits_and_a_model_of_its_own(workspace_factory, tmp_path):
    """A newcomer's case: the shipped params.yaml (gray, test_size 2000), a small folder of colour photos."""
    root = workspace_factory("data-add-colour")
    shutil.copy(PROJECT / "params.yaml", root / "params.yaml")  # its comments and layout, its defaults
    before = (root / "params.yaml").read_text()
    shop = _colour_folder(tmp_path / "shop-parts", ("bolt", "clip", "gear", "hinge", "nut", "spring", "washer"), 9)
    _half_transparent(shop / "gear" / "see-through.png")
    _half_transparent(shop / "nut" / "see-through.png")
    done = _graft(root, "data", "add", str(shop), "--as", "target")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[1:6] == [
        "images: 63 RGB, 2 RGBA (alpha: transparent pixels become black) -> data.channels: 3 (was 1)",
        "split: data.target.test_size 2000 -> 10, val_size 500 -> 7, labels_per_class 10 -> null (every training image) "
        "(7 classes, 65 usable images; every class in each split)",
        "registry: model name graft-classifier -> graft-shop-parts (a new class set is a new model; graft-classifier's "
        "champion is untouched)",
        "gates: min_accuracy 0.75, min_macro_f1 0.75, max_ece 0.05 were set for animal-mnist -> 0, 0, null (not gated) "
        "for graft-shop-parts; set the bounds your use needs once you have seen its first run",
        "model_card: intended_use and out_of_scope described the previous target -> 'not stated'; say what this model "
        "is for before its card is read",
    ], done.stdout
    assert len(lines) == 8 and lines[-1] == "next: git add data/raw/shop-parts.dvc data/raw/.gitignore params.yaml && graft run"

    after = (root / "params.yaml").read_text()
    assert _comments(after) == _comments(before) and len(after.splitlines()) == len(before.splitlines())
    raw = yaml.safe_load(after)
    assert raw["data"]["target"] == {"name": "shop-parts", "format": "folder", "path": "data/raw/shop-parts",
                                     "val_size": 7, "test_size": 10, "labels_per_class": None}
    assert (raw["data"]["channels"], raw["registry"]["model_name"]) == (3, "graft-shop-parts")
    assert (raw["gates"]["min_accuracy"], raw["gates"]["min_macro_f1"], raw["gates"]["max_ece"]) == (0, 0, None), \
        "the old target's bounds do not carry over"
    assert raw["model_card"]["intended_use"].startswith("not stated"), "nor does what the old model was for"
    check_raw_data(root, load_settings(root / "params.yaml"))
    report = _prepared(root, tmp_path)
    assert report["channels"] == 3 and report["counts"] == {"train": 48, "val": 7, "test": 10}


def test_new_classes_get_a_split_sized_for_them_and_a_new_version_of_the_same_classes_keeps_its_split(
        workspace_factory, tmp_path):
    root = workspace_factory("data-add-split")

    def add(folder: Path) -> tuple[str, dict]:
        done = _graft(root, "data", "add", str(folder), "--as", "target")
        assert done.returncode == 0, done.stdout + done.stderr
        target = yaml.safe_load((root / "params.yaml").read_text())["data"]["target"]
        return done.stdout, {key: target[key] for key in ("test_size", "val_size")}

    _, split = add(_colour_folder(tmp_path / "small", ("a", "b", "c"), 10))
    assert split == {"test_size": 4, "val_size": 3}  # 15% and 10% of 30 images, every class in each
    # Other classes, four times the images: 4 and 3 would fit, but they were sized for the other data set.
    out, split = add(_colour_folder(tmp_path / "large", ("x", "y", "z"), 40))
    assert split == {"test_size": 18, "val_size": 12}
    assert "split: data.target.test_size 4 -> 18, val_size 3 -> 12 (3 classes, 120 usable images" in out, out
    # The same classes again, more of them: the configured split fits and is kept, so the versions compare.
    out, split = add(_colour_folder(tmp_path / "large-v2", ("x", "y", "z"), 50))
    assert split == {"test_size": 18, "val_size": 12}
    assert "split: data.target.test_size 18, val_size 12 fit (3 classes, 150 usable images" in out, out


def test_a_folder_is_decoded_once_in_the_colour_mode_its_headers_declare(tmp_path, monkeypatch):
    """The headers choose the colour mode, so a colour folder checked against the gray default is decoded once, in
    RGB; a file whose header says colour but that cannot be used does not make a gray folder colour (read again)."""
    decoded: list[int] = []
    decode = data.decode_file
    monkeypatch.setattr(data, "decode_file", lambda source, channels, limits: decoded.append(channels) or decode(source, channels, limits))
    params = parse_params(tiny_params())
    assert params.data.channels == 1
    split = {"format": "folder", "val_size": 3, "test_size": 3, "labels_per_class": None}

    shop = _colour_folder(tmp_path / "shop", ("bolt", "gear", "nut"), 9)
    checked, channels = check_in_its_colour_mode(shop, params.data.target.model_copy(update={"path": str(shop), **split}), params)
    assert (channels, checked.modes, decoded) == (3, {"RGB": 27}, [3] * 27)

    gray = make_small_target(tmp_path / "gray", per_class=8, classes=3)
    colour = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(colour, "PNG")
    first = sorted(gray.iterdir())[0]
    (first / "cut-short.png").write_bytes(colour.getvalue()[:300])
    decoded.clear()
    checked, channels = check_in_its_colour_mode(gray, params.data.target.model_copy(update={"path": str(gray), **split}), params)
    assert (channels, list(checked.modes), decoded) == (1, ["L"], [3] * 25 + [1] * 25)
    assert {Path(entry["file"]).name: entry["reason"] for entry in checked.quarantine}["cut-short.png"] == \
        "cannot decode: image file is truncated"


def test_data_add_names_every_problem_in_one_pass_and_changes_nothing(workspace_factory, tmp_path):
    root = workspace_factory("data-add-refused")
    params_before, raw_before = (root / "params.yaml").read_text(), sorted((root / "data/raw").iterdir())

    def refused(folder: Path) -> str:
        done = _graft(root, "data", "add", str(folder), "--as", "target")
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stdout + done.stderr
        assert (root / "params.yaml").read_text() == params_before and sorted((root / "data/raw").iterdir()) == raw_before, \
            "a refused folder changes nothing"
        return done.stderr

    broken = make_small_target(tmp_path / "broken", per_class=6, classes=4)
    (broken / "unicorn").mkdir()                                           # an empty class
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.full((28, 28), 7, np.uint8)).save(outside)
    (broken / "cat" / "link.png").symlink_to(outside)                     # a symlink out of the folder
    for image in sorted((broken / "bird").iterdir())[2:]:                 # a class too small once its bad files go
        image.write_bytes(b"broken")
    message = refused(broken)
    assert message.count("graft: error:") == 1 and "3 problem(s) to fix; nothing was changed" in message, message
    assert "  - empty class folder(s): unicorn; add images to them or remove them" in message
    assert "cat/link.png: a symlink out of the data folder" in message
    assert "fewer than 3 usable images: bird (2)" in message
    assert "file(s) that would be skipped:" in message and re.search(r"bird/\d+\.png: not an image file", message), message

    assert f"{outside} is a file, not a folder; give the folder holding <class name>/<image files>" in refused(outside)

    # min_images_per_class allows a class of two, but no split does: one image each for val, test and training.
    (root / "params.yaml").write_text(params_before.replace("min_images_per_class: 3", "min_images_per_class: 1"))
    params_before = (root / "params.yaml").read_text()
    small = make_small_target(tmp_path / "small", per_class=8, classes=3)
    for image in sorted((small / "bird").iterdir())[2:]:
        image.unlink()
    assert "no split fits: bird has 2 image(s)" in refused(small)


def test_graft_run_refuses_a_split_that_does_not_fit_before_anything_starts(workspace_factory, tmp_path):
    root = workspace_factory("run-split", tiny_params(**{"data.target.test_size": 2000}))
    start = time.monotonic()
    done = _graft(root, "run")
    assert done.returncode == 2, done.stdout + done.stderr
    assert time.monotonic() - start < 20 and not (root / "dvc.lock").exists(), "refused before any stage (or Prefect)"
    assert "data.target: the split does not fit data/raw/animal-mnist (10 classes, 300 files): test_size 2000 + val_size 40 " \
           "leave none of 300 images to train on. Set data.target.test_size: 45, data.target.val_size: 30" in done.stderr, done.stderr

    # data add on the same classes proposes the split, and keeps the model: its champion is comparable.
    same = make_small_target(tmp_path / "animals-v2", per_class=20)
    added = _graft(root, "data", "add", str(same), "--as", "target")
    assert added.returncode == 0 and "registry:" not in added.stdout, added.stdout + added.stderr
    params = load_settings(root / "params.yaml")
    assert params.registry.model_name == "graft-classifier" and params.data.target.test_size < 200
    check_raw_data(root, params)


def test_setting_params_keeps_params_yaml_comments_and_layout():
    from components.userdata import set_params

    text = (PROJECT / "params.yaml").read_text()
    changes = {"data.target.name": "parts", "data.target.path": "data/raw/parts", "data.target.test_size": 84,
               "data.target.labels_per_class": 6, "data.channels": 3, "registry.model_name": "graft-parts"}
    changed = set_params(text, changes)
    raw, expected = yaml.safe_load(changed), yaml.safe_load(text)
    expected["data"]["target"].update(name="parts", path="data/raw/parts", test_size=84, labels_per_class=6)
    expected["data"]["channels"], expected["registry"]["model_name"] = 3, "graft-parts"
    assert raw == expected
    assert len(changed.splitlines()) == len(text.splitlines()) and _comments(changed) == _comments(text)

    # A key its block lacks is added to that block; a name YAML would read as a number stays a string.
    without = text.replace("    labels_per_class: 10     # cut the training split to k labelled images a class; null keeps all\n", "")
    added = yaml.safe_load(set_params(without, {"data.target.labels_per_class": 4, "data.target.name": "2024"}))
    assert added["data"]["target"]["labels_per_class"] == 4 and added["data"]["target"]["name"] == "2024"
    # Within a mapping written on one line, that line is written again with the key set (or added).
    flow = yaml.safe_load(set_params(text, {"sources.pipeline.fashion-mnist.data.val_size": 10,
                                            "data.unlabeled.cam": {"path": "data/raw/cam"}}))
    assert flow["sources"]["pipeline"]["fashion-mnist"]["data"] == {**expected["sources"]["pipeline"]["fashion-mnist"]["data"],
                                                                   "val_size": 10}
    assert flow["data"]["unlabeled"] == {"cam": {"path": "data/raw/cam"}}
    with pytest.raises(ParamsError, match="is not a mapping on one line; set finetune.semi_supervised.strong_augment.flip: False by hand"):
        set_params(text, {"finetune.semi_supervised.strong_augment.flip": False})  # a flow mapping over two lines


def test_setting_a_key_whose_text_was_folded_over_lines_replaces_every_line_of_it():
    from components.userdata import set_params

    raw = tiny_params()
    raw["model_card"]["intended_use"] = "a long purpose: " + "words " * 30  # safe_dump folds it over several lines
    text = yaml.safe_dump(raw, sort_keys=False)
    assert len(text.splitlines()) > len(yaml.safe_dump(tiny_params(), sort_keys=False).splitlines())
    changed = set_params(text, {"model_card.intended_use": "short", "gates.max_ece": None})
    after = yaml.safe_load(changed)
    assert (after["model_card"]["intended_use"], after["gates"]["max_ece"]) == ("short", None)
    assert after["model_card"]["out_of_scope"] == raw["model_card"]["out_of_scope"]
