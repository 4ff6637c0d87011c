"""`graft data add PATH --as target`: a user's folder checked, versioned and made the target in one command."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from components.config import load_params
from components.pipeline import dvc_status, pending_stages
from tests.conftest import PROJECT, make_small_target


def _graft(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "graft", *args], cwd=root, env=env, capture_output=True, text=True)


def test_data_add_checks_copies_versions_and_points_params_at_the_folder(workspace_factory, tmp_path):
    root = workspace_factory("data-add")
    params_before = (root / "params.yaml").read_text()

    broken = make_small_target(tmp_path / "broken", per_class=5, classes=3)
    (broken / "unicorn").mkdir()
    refused = _graft(root, "data", "add", str(broken), "--as", "target")
    assert refused.returncode == 2 and "empty class folder(s): unicorn" in refused.stderr, refused.stderr
    assert (root / "params.yaml").read_text() == params_before and not (root / "data/raw/broken").exists(), \
        "a folder that fails the check changes nothing"

    parts = make_small_target(tmp_path / "parts", per_class=12, classes=3)
    (parts / "bear" / "notes.txt").write_text("not an image")
    done = _graft(root, "data", "add", str(parts), "--as", "target")
    assert done.returncode == 0, done.stdout + done.stderr
    usable = int(re.search(r"3 classes \(bear, bird, cat\), (\d+) usable images, \d+ to be quarantined:", done.stdout)[1])
    assert "  data/raw/parts/bear/notes.txt: not an image file" in done.stdout
    assert "copied into data/raw/parts" in done.stdout
    assert f"before `graft run`: parts: test_size 60 >= {usable} usable images" in done.stdout, "the split is checked too"

    target = load_params(root / "params.yaml").data.target
    assert (target.name, target.format, target.path) == ("parts", "folder", "data/raw/parts")
    text = (root / "params.yaml").read_text()
    assert yaml.safe_load(text)["data"]["target"]["val_size"] == yaml.safe_load(params_before)["data"]["target"]["val_size"]
    assert sorted(p.name for p in (root / "data/raw/parts/cat").iterdir()) == sorted(p.name for p in (parts / "cat").iterdir())
    assert (root / "data/raw/parts.dvc").is_file()
    status = dvc_status(root)
    assert "data/raw/parts.dvc" not in status, status

    # The old target's folder goes; its leftover .dvc file no longer keeps the pipeline from "nothing to do".
    shutil.rmtree(root / "data/raw/animal-mnist")
    status = dvc_status(root)
    assert "data/raw/animal-mnist.dvc" in status
    data_paths = list(load_params(root / "params.yaml").raw_data_paths().values())
    assert not [name for name in pending_stages(status, data_paths) if name.endswith(".dvc")], json.dumps(status)


def test_setting_the_target_keeps_params_yaml_comments_and_layout():
    from components.userdata import set_target_in_params

    text = (PROJECT / "params.yaml").read_text()
    changed = set_target_in_params(text, "parts", "data/raw/parts")
    assert yaml.safe_load(changed)["data"]["target"] == {**yaml.safe_load(text)["data"]["target"], "name": "parts",
                                                         "path": "data/raw/parts"}
    assert len(changed.splitlines()) == len(text.splitlines())
    assert [line for line in changed.splitlines() if "#" in line] == [line for line in text.splitlines() if "#" in line]
