"""The model server over real HTTP: registry alias via a real `mlflow server`, bad requests, hot reload under load."""
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from PIL import Image

from components.registry import CHAMPION, alias_version, move_alias
from tests.conftest import copy_workspace, free_port, graft_cli

MODEL = "served-classifier"
PROBE = np.random.default_rng(7).normal(size=(2, 1, 28, 28)).astype(np.float32)


def start_server(url: str, model: str, cache: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy.server", "--tracking-uri", url, "--model", model, "--port", str(port),
         "--poll-seconds", "0.3", "--cache-dir", str(cache), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            httpx.get(f"{base}/v2/health/live", timeout=1)
            return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server did not come up: {process.stdout.read()[-2000:]}")


def wait_ready(base: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/v2/health/ready").status_code == 200:
            return
        time.sleep(0.2)
    raise AssertionError("server never became ready")


@pytest.fixture(scope="module")
def served_workspace(candidate_template, tmp_path_factory):
    """A copy of a finished pipeline workspace, and what its evaluate stage measured for the model it holds."""
    root = copy_workspace(candidate_template[0], tmp_path_factory.mktemp("served") / "ws")
    return root, json.loads((root / "metrics" / "evaluate.json").read_text())["transfer"]["accuracy"]


@pytest.fixture(scope="module")
def registry(served_workspace, mlflow_server):
    """Two different registered versions over HTTP: v1 is champion, v2 a challenger; expected logits of each."""
    root, _ = served_workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["registry"]["model_name"] = MODEL
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    graft_cli(root, mlflow_server, "publish")
    params["finetune"]["steps"] = 20
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("finetune", "evaluate", "export"):
        graft_cli(root, mlflow_server, "stage", stage)
    graft_cli(root, mlflow_server, "publish")
    client = MlflowClient(tracking_uri=mlflow_server)
    assert alias_version(client, MODEL, CHAMPION) == "1"
    expected = {}
    for version in ("1", "2"):
        folder = download_artifacts(artifact_uri=client.get_model_version_download_uri(MODEL, version),
                                    dst_path=str(root.parent / f"v{version}"), tracking_uri=mlflow_server)
        path = Path(folder) / "model.onnx"
        expected[version] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": PROBE})[0]
    assert not np.allclose(expected["1"], expected["2"]), "the two versions must differ to detect mixing"
    return client, expected


@pytest.fixture(scope="module")
def server(registry, mlflow_server, tmp_path_factory):
    process, base = start_server(mlflow_server, MODEL, tmp_path_factory.mktemp("cache"), "--max-body-bytes", "200000")
    wait_ready(base)
    yield base
    process.terminate()
    process.wait(timeout=20)


def _infer(client: httpx.Client, base: str, rows: np.ndarray, **tensor) -> httpx.Response:
    body = {"inputs": [{"name": "pixels", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist(), **tensor}]}
    return client.post(f"{base}/v2/models/{MODEL}/infer", json=body)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_metadata_reports_version_and_provider(server):
    meta = httpx.get(f"{server}/v2/models/{MODEL}").json()
    assert meta["versions"] == ["1"] and meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
    assert meta["parameters"]["provider"] == "CPUExecutionProvider"
    assert meta["parameters"]["requested_providers"][:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


def test_infer_matches_onnx_runtime(server, registry):
    _, expected = registry
    with httpx.Client() as client:
        answer = _infer(client, server, PROBE).json()
    assert answer["model_version"] == "1" and answer["outputs"][0]["shape"] == [2, 10]
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(2, 10), expected["1"], atol=1e-5)


def test_the_served_model_scores_the_test_files_as_evaluate_did(server, served_workspace):
    """The contract round trip: export metadata -> server decode and normalise -> the evaluate stage's accuracy."""
    from components.data import load_splits

    root, evaluated = served_workspace  # v1, the served champion, is this workspace's evaluated model
    splits = load_splits(root / "data/prepared/selected.npz")
    correct = 0
    with httpx.Client() as client:
        for origin, label in zip(splits.origin_test, splits.y_test):
            answer = client.post(f"{server}/predict?top_k=1", content=(root / origin).read_bytes()).json()
            correct += answer["predictions"][0]["class"] == splits.classes[label]
    assert correct / len(splits.y_test) == pytest.approx(evaluated, abs=1e-9)


def test_predict_takes_an_image_file(server):
    image = _png(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    raw = httpx.post(f"{server}/predict?top_k=2", content=image, headers={"content-type": "image/png"}).json()
    upload = httpx.post(f"{server}/predict?top_k=2", files={"file": ("x.png", image, "image/png")}).json()
    assert raw == upload and len(raw["predictions"]) == 2
    assert raw["predictions"][0]["probability"] >= raw["predictions"][1]["probability"]


@pytest.mark.parametrize("case,status,message", [
    ("not an image", 400, "not an image file"),
    ("truncated png", 400, "cannot be decoded"),
    ("empty", 400, "empty image body"),
    ("oversized", 413, "over the limit"),
])
def test_bad_images_get_4xx(server, case, status, message):
    png = _png(np.random.default_rng(1).integers(0, 255, (28, 28), dtype=np.uint8))  # noise: half keeps the header
    body = {"not an image": b"hello, not an image", "truncated png": png[: len(png) // 2], "empty": b"",
            "oversized": b"\0" * 300_000}[case]
    response = httpx.post(f"{server}/predict", content=body)
    assert response.status_code == status and message in response.json()["error"]


@pytest.mark.parametrize("tensor,status,message", [
    ({"shape": [1, 3, 28, 28]}, 400, "does not fit the model"),
    ({"datatype": "INT64"}, 400, "not supported"),
    ({"data": [1.0, 2.0]}, 400, "needs 784"),
    ({"data": [float("nan")] * 784}, 400, "NaN"),
    ({"name": "image"}, 400, "unknown input"),
    ({"data": "abc"}, 400, "JSON list"),
])
def test_bad_tensors_get_4xx(server, tensor, status, message):
    with httpx.Client() as client:
        if "nan" in repr(tensor.get("data", "")):
            body = '{"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [' + ",".join(["NaN"] * 784) + "]}]}"
            response = client.post(f"{server}/v2/models/{MODEL}/infer", content=body)
        else:
            response = _infer(client, server, PROBE[:1], **tensor)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_malformed_requests_and_unknown_models(server):
    assert httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b"{not json").status_code == 400
    assert httpx.post(f"{server}/v2/models/{MODEL}/infer", json=[1, 2]).status_code == 400
    unknown = httpx.post(f"{server}/v2/models/other/infer", json={})
    assert unknown.status_code == 404 and "unknown model 'other'" in unknown.json()["error"]
    assert httpx.get(f"{server}/v2/models/other").status_code == 404
    huge = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=b"[" + b"0," * 200_000 + b"0]")
    assert huge.status_code == 413
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200, "bad requests never take the server down"


def test_promote_and_rollback_under_traffic_fail_nothing_and_mix_nothing(server, registry):
    client, expected = registry
    results, stop = [], threading.Event()

    def traffic():
        with httpx.Client(timeout=10) as http:
            while not stop.is_set():
                response = _infer(http, server, PROBE)
                body = response.json() if response.status_code == 200 else {}
                results.append((response.status_code, body.get("model_version"),
                                np.array(body["outputs"][0]["data"]).reshape(2, 10) if body else None))

    workers = [threading.Thread(target=traffic) for _ in range(8)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.5)
        move_alias(client, MODEL, CHAMPION, "2", "promote", "test: promote under load")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and httpx.get(f"{server}/v2/models/{MODEL}").json()["versions"] != ["2"]:
            time.sleep(0.1)
        time.sleep(1.5)
        move_alias(client, MODEL, CHAMPION, "1", "rollback", "test: roll back under load")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and httpx.get(f"{server}/v2/models/{MODEL}").json()["versions"] != ["1"]:
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    statuses = {status for status, _, _ in results}
    versions = [version for _, version, _ in results]
    assert statuses == {200}, f"failed requests: {[s for s in statuses if s != 200]}"
    assert {"1", "2"} <= set(versions) and versions[-1] == "1"
    for _, version, logits in results:
        np.testing.assert_allclose(logits, expected[version], atol=1e-5)  # every answer is wholly one version's
    assert len(results) > 200


def test_metrics_show_batches_versions_and_errors(server):
    text = httpx.get(f"{server}/metrics").text
    assert 'graft_model_info{model="served-classifier",provider="CPUExecutionProvider",version="1"} 1.0' in text
    assert "graft_queue_depth" in text and 'graft_request_latency_seconds_bucket{endpoint="/predict"' in text
    executions = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("graft_executions_total")))
    inferences = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("graft_inferences_total")))
    assert inferences / executions > 1.0, "concurrent requests were batched"
    assert 'graft_request_errors_total{endpoint="predict",reason="bad_image"}' in text
    assert 'graft_model_reloads_total{outcome="switched"} 2.0' in text


def test_page_shows_the_served_model(server):
    page = httpx.get(server).text
    assert 'id="version">1<' in page and "CPUExecutionProvider" in page and "quality.accuracy" in page


def test_not_ready_until_a_model_exists_then_ready(registry, mlflow_server, tmp_path):
    client, _ = registry
    process, base = start_server(mlflow_server, "late-classifier", tmp_path)
    try:
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        assert httpx.get(f"{base}/v2/health/ready").status_code == 503
        assert httpx.get(f"{base}/v2/models/late-classifier").status_code == 503
        copied = client.copy_model_version(f"models:/{MODEL}/1", "late-classifier")
        client.set_registered_model_alias("late-classifier", CHAMPION, copied.version)
        wait_ready(base)
        assert httpx.get(f"{base}/v2/models/late-classifier").json()["versions"] == [str(copied.version)]
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_strict_mode_refuses_to_start_on_cpu(mlflow_server, tmp_path):
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "deploy.server", "--tracking-uri", mlflow_server, "--model", MODEL, "--port", str(port),
         "--providers", "cuda,cpu", "--strict", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )
    assert done.returncode != 0
    assert "runs this model on ['CPUExecutionProvider']" in done.stdout + done.stderr
