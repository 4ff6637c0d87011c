"""The stack as production runs it (deploy/compose.yaml, deploy/stack.py), on a real PostgreSQL server started
here (Debian's, on 127.0.0.1, in a temporary folder): MLflow's backend store on PostgreSQL behind `mlflow server`
with the artifacts proxied by the server, a Prefect server whose database is on the same PostgreSQL, and the
retrain flow, a second candidate, promotion and `graft serve` against them."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from components.registry import CHALLENGER, CHAMPION, alias_version
from deploy.stack import (
    MLFLOW_SERVER_ENV,
    PREFECT_DATABASE_SETTING,
    mlflow_server_args,
    mlflow_store_url,
    prefect_database_url,
)
from tests.conftest import copy_workspace, free_port, stop_process_group, wait_healthy

pytestmark = pytest.mark.slow  # PostgreSQL, an MLflow and a Prefect server, two flow runs

MODEL = "graft-classifier"
PASSWORD = "graft-test-only"


def postgres_programs() -> Path | None:
    """Debian's PostgreSQL server programs (package postgresql), the newest version installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 with password authentication and the databases `mlflow` and `prefect`
    (as deploy/docker/init-db.sql makes them); yields user:password@host:port. PostgreSQL refuses to run as root,
    so under root the server runs as Debian's `postgres` user, in a folder outside pytest's private ones."""
    programs = postgres_programs()
    assert programs, "PostgreSQL's server is not installed: scripts/setup.sh installs Debian's postgresql"
    folder = Path(tempfile.mkdtemp(prefix="graft-postgres-"))
    as_server_user = []
    (folder / "password").write_text(PASSWORD)
    if os.geteuid() == 0:
        as_server_user = ["runuser", "-u", "postgres", "--"]
        for path in (folder, folder / "password"):
            shutil.chown(path, "postgres", "postgres")
    port = free_port()

    def server(*args: str) -> None:
        subprocess.run([*as_server_user, *args], check=True, capture_output=True, cwd=folder)

    server(str(programs / "initdb"), "-D", str(folder / "data"), "-U", "graft", "--auth=scram-sha-256",
           f"--pwfile={folder / 'password'}")
    server(str(programs / "pg_ctl"), "-D", str(folder / "data"), "-l", str(folder / "server.log"), "-w", "start",
           "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}")
    try:
        for database in ("mlflow", "prefect"):
            subprocess.run([str(programs / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "graft", database],
                           env={**os.environ, "PGPASSWORD": PASSWORD}, check=True, capture_output=True)
        yield f"graft:{PASSWORD}@127.0.0.1:{port}"
    finally:
        server(str(programs / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def sql(postgres: str, database: str, query: str) -> list[str]:
    credentials, _, address = postgres.partition("@")
    host, _, port = address.partition(":")
    done = subprocess.run([str(postgres_programs() / "psql"), "-h", host, "-p", port, "-U", "graft", "-d", database,
                           "-tAc", query], env={**os.environ, "PGPASSWORD": credentials.partition(":")[2]},
                          check=True, capture_output=True, text=True)
    return done.stdout.split()


@pytest.fixture(scope="module")
def stack(postgres, tmp_path_factory):
    """`mlflow server` and `prefect server start` on that PostgreSQL, as deploy/compose.yaml runs them. Servers of
    their own, not the run's shared ones (tests/conftest.py): their database on PostgreSQL is what this file tests."""
    folder = tmp_path_factory.mktemp("postgres-stack")
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow = subprocess.Popen(
        [sys.executable, "-m", "mlflow", *mlflow_server_args(mlflow_store_url(postgres), str(folder / "artifacts"),
                                                             "127.0.0.1", mlflow_port, workers=1)],
        env={**os.environ, **MLFLOW_SERVER_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    prefect = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        env={**os.environ, "PREFECT_HOME": str(folder / "prefect-home"), PREFECT_DATABASE_SETTING: prefect_database_url(postgres)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    urls = {"mlflow": f"http://127.0.0.1:{mlflow_port}", "prefect": f"http://127.0.0.1:{prefect_port}/api", "folder": folder}
    try:
        assert wait_healthy(f"{urls['mlflow']}/health", 120), "mlflow server on PostgreSQL did not start"
        assert wait_healthy(f"{urls['prefect']}/health", 120), "prefect server on PostgreSQL did not start"
        yield urls
    finally:
        stop_process_group(mlflow)
        stop_process_group(prefect)


def graft(root: Path, stack: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack["mlflow"], "PREFECT_API_URL": stack["prefect"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "graft", *args], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_pipeline_promotion_and_serving_on_postgres(postgres, stack, candidate_template, tmp_path):
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    graft(root, stack, "run")
    client = MlflowClient(tracking_uri=stack["mlflow"])
    assert alias_version(client, MODEL, CHAMPION) == "1"
    # Where it all went: the registry and every run in PostgreSQL, the files behind the server, the flow run in
    # Prefect's database on the same PostgreSQL.
    assert sql(postgres, "mlflow", "select name from registered_models") == [MODEL]
    assert int(sql(postgres, "mlflow", "select count(*) from runs")[0]) >= 2  # the pretraining and the candidate
    assert client.get_model_version_download_uri(MODEL, "1").startswith("mlflow-artifacts:/")
    assert list((stack["folder"] / "artifacts").rglob("model.onnx"))
    flows = sql(postgres, "prefect", "select f.name || ':' || r.state_type from flow_run r join flow f on f.id = r.flow_id")
    assert flows == ["retrain:COMPLETED"]
    assert int(sql(postgres, "prefect", "select count(*) from task_run where state_type = 'COMPLETED'")[0]) >= 10

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["export"]["variants"] = []  # a second candidate (FP32 only: only the export stage reruns)
    params["storage"]["dvc_remote"] = str(tmp_path / "dvc-remote")  # and its files pushed at the end of the run
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = graft(root, stack, "run")
    assert f"dvc remote {tmp_path / 'dvc-remote'}:" in second.stdout + second.stderr
    assert any((tmp_path / "dvc-remote").rglob("*"))
    assert alias_version(client, MODEL, CHALLENGER) == "2" and alias_version(client, MODEL, CHAMPION) == "1"
    graft(root, stack, "promote", "--reason", "on postgres")
    assert alias_version(client, MODEL, CHAMPION) == "2"
    assert sql(postgres, "prefect", "select count(*) from flow_run where state_type = 'COMPLETED'") == ["2"]

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack["mlflow"]}
    server = subprocess.Popen([sys.executable, "-m", "graft", "serve", "--port", str(port), "--grpc-port", "0"], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_healthy(f"http://127.0.0.1:{port}/v2/health/ready", 120), "graft serve did not become ready"
        metadata = httpx.get(f"http://127.0.0.1:{port}/v2/models/{MODEL}").json()
        assert metadata["versions"] == ["2"]
        image = next((root / "data" / "raw" / "animal-mnist").rglob("*.png")).read_bytes()
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", content=image, timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"]
    finally:
        stop_process_group(server)
