"""The production set-up: Triton repository export, the compose stack, and a serving side free of training code."""
import subprocess
import sys

import yaml

from components.export import export_onnx
from components.network import build
from deploy.stack import MLFLOW_SERVER_ENV, PREFECT_DATABASE_SETTING, mlflow_server_args
from tests.conftest import PROJECT, tiny_spec


def test_export_triton_writes_a_repository(tmp_path):
    model = build(tiny_spec(("a", "b", "c")), 0)
    onnx_file = export_onnx(model, tmp_path / "model.onnx", 20)
    done = subprocess.run([sys.executable, "-m", "graft", "export-triton", "--onnx-file", str(onnx_file),
                           "--out", str(tmp_path / "repo"), "--root", str(PROJECT)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "repo" / "graft-classifier"
    config = (folder / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 32" in config
    assert 'name: "pixels" data_type: TYPE_FP32 dims: [ 1, 28, 28 ]' in config
    assert "dims: [ 3 ]" in config and "dynamic_batching" in config and "max_queue_delay_microseconds: 0" in config
    assert 'name: "tensorrt"' in config and '"FP16"' in config and "KIND_GPU" in config
    assert (folder / "labels.txt").read_text().split() == ["a", "b", "c"]
    assert (folder / "1" / "model.onnx").read_bytes() == onnx_file.read_bytes()


def test_compose_stack_binds_loopback_and_gives_the_server_a_gpu():
    stack = yaml.safe_load((PROJECT / "deploy" / "compose.yaml").read_text())
    services = stack["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "graft-server"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    devices = services["graft-server"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "postgresql://" in services["mlflow"]["command"] and "s3://" in services["mlflow"]["command"]
    assert services["graft-server"]["environment"]["GRAFT_STRICT"] == "1"
    assert services["graft-server"]["environment"]["GRAFT_API_TOKEN"].startswith("${GRAFT_API_TOKEN:?"), \
        "the production server listens beyond loopback in its container: it must get a token, never run without"


def test_compose_runs_the_tracking_and_orchestration_services_as_the_postgres_test_does():
    services = yaml.safe_load((PROJECT / "deploy" / "compose.yaml").read_text())["services"]
    mlflow = services["mlflow"]["command"].split()
    tested = mlflow_server_args("postgresql://u:p@h/mlflow", "s3://bucket/", "0.0.0.0", 5000)
    assert mlflow[:2] == ["mlflow", tested[0]]
    assert [w for w in mlflow if w.startswith("--")] == [w for w in tested if w.startswith("--")]  # the same flags
    assert mlflow[mlflow.index("--workers") + 1] == tested[tested.index("--workers") + 1]
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert MLFLOW_SERVER_ENV.items() <= services["mlflow"]["environment"].items()
    database = services["prefect-server"]["environment"][PREFECT_DATABASE_SETTING]
    assert database.startswith("postgresql+asyncpg://") and "@postgres/prefect" in database
    assert "CREATE DATABASE prefect" in (PROJECT / "deploy" / "docker" / "init-db.sql").read_text()
    # The sweep's branches go to the Dask scheduler; its workers log to the same MLflow server.
    assert services["prefect-worker"]["environment"]["DASK_SCHEDULER_ADDRESS"] == "tcp://dask-scheduler:8786"
    assert "tcp://dask-scheduler:8786" in services["dask-worker"]["command"]
    assert services["dask-worker"]["environment"]["MLFLOW_TRACKING_URI"] == services["prefect-worker"]["environment"]["MLFLOW_TRACKING_URI"]


def test_serving_code_needs_neither_torch_nor_training_code():
    probe = ("import sys, deploy.server, deploy.triton, deploy.source; "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'components', 'mlflow', 'prefect', 'dvc')); "
             "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=PROJECT)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (PROJECT / "deploy" / "requirements-serve.txt").read_text().splitlines()
    packages = [line.split("=")[0].split("<")[0].split(">")[0] for line in lines if line and not line.startswith("#")]
    assert "onnxruntime-gpu" in packages and not {"torch", "torchvision", "mlflow", "prefect", "dvc"} & set(packages)
