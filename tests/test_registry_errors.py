"""A registry that is not where it was said to be: a refused connection is classified as transient wherever an
alias command meets it, and a mistyped sqlite path is refused by the commands that only read (never created)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from components.errors import RegistryUnavailable
from components.registry import history
from tests.conftest import free_port, tiny_params


@pytest.fixture
def project(tmp_path):
    """A project folder with params.yaml only: the read-only commands need no data."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    return tmp_path


def graft(root: Path, *args: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "graft", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)  # a command that waits for a registry instead of refusing must not hang the suite
    return done, time.monotonic() - started


def test_a_server_lost_after_opening_is_unavailable_not_a_bug(monkeypatch):
    """What made `graft history` exit 1: the alias commands' calls were outside registry_call, so MLflow's
    exception (a requests ConnectionError in its chain) reached the CLI unclassified."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries would take minutes
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(RegistryUnavailable, match="reading the alias history: the MLflow registry at http://127.0.0.1"):
        history(client, "graft-classifier")


def test_a_mistyped_sqlite_path_is_refused_by_readers_and_not_created(project):
    """`sqlite:///mlfow.db` (a missing letter) in MLFLOW_TRACKING_URI or in params.yaml: history, promote, serve and
    export-triton say there is no registry there and exit 2, in seconds, and the file is not created."""
    missing = (project / "mlfow.db").resolve()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for command in (["history"], ["promote"]):
        done, seconds = graft(project, *command, env={**env, "MLFLOW_TRACKING_URI": "sqlite:///mlfow.db"})
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert (f"no MLflow registry at {missing} (MLFLOW_TRACKING_URI): check the path; a registry is created by the "
                f"first `graft run`") in done.stderr
        assert not missing.exists(), f"graft {command[0]} created {missing}"
        assert seconds < 15, f"graft {command[0]}: {seconds:.1f} s to the error"

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["registry"]["tracking_uri"] = "sqlite:///mlfow.db"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["serve", "--port", str(free_port()), "--grpc-port", "0"], ["export-triton"]):
        done, seconds = graft(project, *command, env=env)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert f"no MLflow registry at {missing} (registry.tracking_uri): check the path" in done.stderr
        assert not missing.exists(), f"graft {command[0]} created {missing}"
        assert seconds < 15, f"graft {command[0]}: {seconds:.1f} s to the error"
