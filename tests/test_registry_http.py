"""The registry flows against a real `mlflow server` over HTTP, a promotion killed part-way, and a server put over a
registry that began as the embedded store."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from mlflow import MlflowClient

from components.errors import EXIT_USER
from components.registry import (
    CHALLENGER,
    CHAMPION,
    AliasMove,
    _record,
    alias_version,
    gates_passed,
    history,
    move_alias,
)
from deploy.digest import sha256_file
from deploy.source import RegistrySource, SourceError
from deploy.tags import ONNX_SHA_TAG
from tests.conftest import (
    copy_workspace,
    free_port,
    graft_cli,
    start_mlflow_server,
    stop_process_group,
    tiny_params,
)

MODEL = "graft-classifier"


@pytest.fixture(scope="module")
def http_workspace(candidate_template, mlflow_server, tmp_path_factory):
    """A copy of a finished pipeline workspace that publishes to the HTTP server."""
    return copy_workspace(candidate_template[0], tmp_path_factory.mktemp("http") / "ws")


def test_publish_promote_rollback_over_http(http_workspace, mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server)
    graft_cli(http_workspace, mlflow_server, "publish")
    assert alias_version(client, MODEL, CHAMPION) == "1"
    assert client.get_model_version_download_uri(MODEL, "1").startswith("mlflow-artifacts:/"), "the server keeps the artifacts"

    params = yaml.safe_load((http_workspace / "params.yaml").read_text())
    params["finetune"]["steps"] = 16  # a second candidate
    (http_workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("finetune", "calibrate", "evaluate", "export"):
        graft_cli(http_workspace, mlflow_server, "stage", stage)
    graft_cli(http_workspace, mlflow_server, "publish")  # judged against champion v1, downloaded over HTTP
    assert "champion compared: 1" in (http_workspace / "reports" / "gates.md").read_text()
    assert alias_version(client, MODEL, CHALLENGER) == "2" and alias_version(client, MODEL, CHAMPION) == "1"

    graft_cli(http_workspace, mlflow_server, "promote", "--reason", "http promote")
    assert alias_version(client, MODEL, CHAMPION) == "2"
    graft_cli(http_workspace, mlflow_server, "rollback")
    assert alias_version(client, MODEL, CHAMPION) == "1"
    printed = graft_cli(http_workspace, mlflow_server, "history").stdout
    assert printed.count("completed") == 5 and "http promote" in printed


def test_killed_promotion_leaves_a_complete_gate_passing_champion(http_workspace, mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server)
    assert alias_version(client, MODEL, CHALLENGER) == "2" and alias_version(client, MODEL, CHAMPION) == "1"
    started = time.monotonic()
    graft_cli(http_workspace, mlflow_server, "promote")
    duration = time.monotonic() - started
    move_alias(client, MODEL, CHAMPION, "1", "rollback", "test reset")

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    outcomes = []
    for fraction in (0.3, 0.6, 0.8, 0.9, 0.95, 0.98, 1.0, 1.05):
        process = subprocess.Popen([sys.executable, "-m", "graft", "promote"], cwd=http_workspace, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)  # the kill time is what is tested: a fraction of a real promotion
        process.send_signal(signal.SIGKILL)
        process.wait()
        champion = alias_version(client, MODEL, CHAMPION)
        outcomes.append(champion)
        assert champion in {"1", "2"}
        assert gates_passed(client, MODEL, champion)[0]
        client.get_model_version_download_uri(MODEL, champion)
        if champion == "2":
            move_alias(client, MODEL, CHAMPION, "1", "rollback", "test reset")
    assert "1" in outcomes, "some kill should land before the alias moved"


def test_a_move_without_its_completed_record_shows_as_interrupted(http_workspace, mlflow_server):
    client = MlflowClient(tracking_uri=mlflow_server)
    _record(client, MODEL, AliasMove(CHAMPION, "2", "1", "promote", "tester", "", "killed here", "started", "2026-01-01T00:00:00+00:00"))
    last = history(client, MODEL)[-1]
    assert (last.status, last.reason) == ("interrupted", "killed here")
    # `graft history` reads a server through serving's REST reader, not MLflow's client: the same moves.
    printed = graft_cli(http_workspace, mlflow_server, "history").stdout.splitlines()[2:]
    assert len(printed) == len(history(client, MODEL)) and "interrupted" in printed[-1] and printed[-1].endswith("killed here")


def test_history_through_a_server_needs_no_mlflow_and_names_a_model_never_registered(http_workspace, mlflow_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    read = subprocess.run([sys.executable, "-c", "import sys; from components.registry import read_history; "
                           "moves = read_history('params.yaml'); print(len(moves), 'mlflow' in sys.modules)"],
                          cwd=http_workspace, env=env, capture_output=True, text=True, check=True)
    assert read.stdout.split() == [str(len(history(MlflowClient(tracking_uri=mlflow_server), MODEL))), "False"]
    params = tiny_params()
    params["registry"]["model_name"] = "never-registered"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = graft_cli(tmp_path, mlflow_server, "history", check=False)
    assert done.returncode == EXIT_USER and "Traceback" not in done.stderr
    assert "no registered model named 'never-registered' yet; run the retraining flow (graft run) first" in done.stderr


def test_a_server_that_is_not_there_is_named_within_seconds(tmp_path):
    """Nothing listens at MLFLOW_TRACKING_URI: history, promote and serve retry a short /health probe, saying so on
    stderr, then name the URI and how to start the server, with the transient status (75), not minutes later."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    for command in (["history"], ["promote"], ["serve", "--port", str(free_port()), "--grpc-port", "0"]):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "graft", *command], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "MLFLOW_TRACKING_URI": url}, timeout=120)  # never hang the suite
        seconds = time.monotonic() - started
        assert done.returncode == 75 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert f"registry at {url} not answering (attempt 2/3: " in done.stderr and "retrying in 1 s" in done.stderr
        assert (f"no MLflow server answers at {url} " in done.stderr and
                f"mlflow server --host 127.0.0.1 --port {port}" in done.stderr and
                "unset MLFLOW_TRACKING_URI" in done.stderr), done.stderr[-2000:]
        assert seconds < 15, f"graft {command[0]}: {seconds:.1f} s to the error"


def test_a_server_over_the_embedded_stores_database_serves_its_versions_where_their_files_are(repro_workspace, tmp_path):
    """A project that began on the embedded store and then put `mlflow server` over the same database: the versions
    registered before keep file:// artifact URIs. On the machine that holds that folder they are read over the
    server and hash-checked (as `graft serve` and `graft promote` fetch them); where the folder is not, refused
    with the fix named, not a traceback."""
    workspace = copy_workspace(repro_workspace[0], tmp_path / "ws", registry=True)
    server, url = start_mlflow_server(workspace, free_port())
    try:
        source = RegistrySource(url, MODEL, CHAMPION, tmp_path / "cache")
        version = source.current_version()
        resolved = source.fetch(version)
        assert resolved.version == version == "1"
        assert sha256_file(resolved.onnx_path) == resolved.tags[ONNX_SHA_TAG]
        (workspace / "mlartifacts").rename(tmp_path / "moved")  # the same registry seen from another machine
        with pytest.raises(SourceError, match="does not have .*--serve-artifacts"):
            RegistrySource(url, MODEL, CHAMPION, tmp_path / "another-cache").fetch(version)
    finally:
        stop_process_group(server)
