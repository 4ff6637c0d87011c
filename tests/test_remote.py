"""storage.dvc_remote: a run's data and stage outputs pushed to a DVC remote (a local folder here; ssh:// and
s3:// are the same code with DVC's plugins) and restored from it in a fresh clone of the project's files."""
import shutil
import subprocess
import sys

import pytest

from components.dvc_runner import RemoteError, push_to_remote
from tests.conftest import copy_workspace


def test_a_pushed_run_is_restored_by_dvc_pull_in_a_fresh_clone(candidate_template, tmp_path):
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    push_to_remote(root, "../remote")  # a folder relative to the project
    assert any((tmp_path / "remote").rglob("*")), "the remote holds the pushed files"
    assert "up to date" in push_to_remote(root, "../remote").lower()  # idempotent: nothing left to send
    assert f"url = {tmp_path / 'remote'}" in (root / ".dvc" / "config").read_text()  # committed with the project

    clone = tmp_path / "clone"  # what git holds: no DVC cache, no data, no outputs
    (clone / ".dvc").mkdir(parents=True)
    shutil.copy(root / ".dvc" / "config", clone / ".dvc" / "config")
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        shutil.copy(root / name, clone / name)
    (clone / "data" / "raw").mkdir(parents=True)
    for pointer in (root / "data" / "raw").glob("*.dvc"):
        shutil.copy(pointer, clone / "data" / "raw" / pointer.name)
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    done = subprocess.run([sys.executable, "-m", "dvc", "pull"], cwd=clone, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (clone / "models" / "model.onnx").read_bytes() == (root / "models" / "model.onnx").read_bytes()
    originals = sorted(p.relative_to(root) for p in (root / "data" / "raw" / "animal-mnist").rglob("*.png"))
    assert originals and sorted(p.relative_to(clone) for p in (clone / "data" / "raw" / "animal-mnist").rglob("*.png")) == originals


def test_an_unwritable_remote_is_named_with_the_way_out(workspace_factory, tmp_path):
    root = workspace_factory("unwritable-remote")  # its DVC-tracked data is enough to push
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RemoteError, match=r"dvc push to .*a-file/remote failed.*then run `dvc push`"):
        push_to_remote(root, str(blocker / "remote"))
