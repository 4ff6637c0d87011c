"""What a change reruns, asked of real DVC (`dvc status`) in a workspace that has run the whole pipeline: the
export code reruns export and nothing upstream; an operations setting, or any code no stage imports, reruns nothing."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from components.config import Params
from components.dvc_runner import dvc_status, pending_stages
from components.settings import load_settings
from tests.conftest import PROJECT, copy_workspace
from tests.test_stage_declarations import DVC_STAGES, stage_code

CODE_FOLDERS = ("components", "deploy")
OPERATIONS_CHANGES = {"serving.port": 9123, "serving.variant": "fp32", "schedule.cron": "0 3 * * *",
                      "registry.model_name": "graft-other", "storage.dvc_remote": "/tmp/elsewhere",
                      "gates.min_accuracy": 0.5, "promotion.auto_promote": True,
                      "model_card.intended_use": "a card line is no stage's input"}


@pytest.fixture
def ran_workspace(candidate_template, tmp_path) -> Path:
    """A copy of the repro'd template whose code is its own (the template's is linked to this checkout)."""
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    for folder in CODE_FOLDERS:
        (root / folder).unlink()
        shutil.copytree(PROJECT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    assert _pending(root) == [], "the copy starts up to date"
    return root


def _pending(root: Path) -> list[str]:
    data = list(load_settings(root / "params.yaml").raw_data_paths().values())
    return pending_stages(dvc_status(root), data)


def _touch(file: Path) -> None:
    file.write_text(file.read_text() + "\n# changed\n")


def test_a_change_to_the_export_code_reruns_export_and_nothing_upstream(ran_workspace):
    _touch(ran_workspace / "components" / "export.py")
    assert _pending(ran_workspace) == ["export"]


def test_operations_settings_and_their_code_rerun_no_stage(ran_workspace):
    imported = set().union(*(stage_code(name.partition("@")[0]) for name, _, _ in DVC_STAGES))
    operations_code = sorted(path for folder in CODE_FOLDERS for path in (ran_workspace / folder).rglob("*.py")
                             if path.relative_to(ran_workspace).as_posix() not in imported)
    names = {path.relative_to(ran_workspace).as_posix() for path in operations_code}
    assert {"components/settings.py", "components/registry.py", "deploy/server.py", "deploy/settings.py"} <= names
    for path in operations_code:
        _touch(path)
    raw = yaml.safe_load((ran_workspace / "params.yaml").read_text())
    for dotted, value in OPERATIONS_CHANGES.items():
        section, key = dotted.split(".")
        assert section not in Params.model_fields, f"{section} is an operations section"
        raw[section][key] = value
    (ran_workspace / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    load_settings(ran_workspace / "params.yaml")  # still valid params
    assert _pending(ran_workspace) == []
