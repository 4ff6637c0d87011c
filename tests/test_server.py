"""The model server over real HTTP: registry alias via a real `mlflow server`, bad requests, hot reload under load."""
import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc
import tritonclient.grpc.aio
import tritonclient.http
import tritonclient.http.aio
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from grpc import insecure_channel
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from tritonclient.utils import InferenceServerException

from components.registry import CHAMPION, alias_version, history, move_alias
from components.shadow import collect_evidence
from deploy.canary import bucket
from deploy.digest import sha256_file
from deploy.source import ONNX_SHA_TAG
from deploy.tags import CANARY_SHARE_TAG
from deploy.variants import AUTO, choose_variant, published_in, sha_tag, variant_path
from tests.conftest import copy_workspace, free_port, graft_cli, wait_until

MODEL = "served-classifier"
PROBE = np.random.default_rng(7).normal(size=(2, 1, 28, 28)).astype(np.float32)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def start_server(url: str, model: str, cache: Path, *extra: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # Its log goes to a file, read back through process.stdout: a pipe nobody reads while a module's tests run fills
    # (64 KiB) and blocks the server's next log line, the event loop with it, and then its shutdown.
    log = cache.parent / f"server-{port}.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy.server", "--tracking-uri", url, "--model", model, "--port", str(port),
             "--poll-seconds", "0.3", "--cache-dir", str(cache), *extra],
            stdout=output, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
        )
    process.stdout = log.open()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or _answers(f"{base}/v2/health/live"), 60, "no answer in 60 s")
        assert process.poll() is None, "the server ended"
    except AssertionError as error:
        process.kill()
        raise AssertionError(f"server did not come up ({error}): {process.stdout.read()[-2000:]}") from None
    return process, base


def wait_ready(base: str, seconds: float = 30) -> None:
    wait_until(lambda: _answers(f"{base}/v2/health/ready"), seconds, "server never became ready")


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
    for stage in ("finetune", "calibrate", "evaluate", "export"):
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
def grpc_port() -> int:
    """The module's server's gRPC port (the V2 protocol over gRPC, beside HTTP)."""
    return free_port()


@pytest.fixture(scope="module")
def server(registry, mlflow_server, tmp_path_factory, grpc_port):
    # FP32 served exactly as registered; the INT8 that `auto` picks on CPU has a test of its own.
    process, base = start_server(mlflow_server, MODEL, tmp_path_factory.mktemp("cache"), "--max-body-bytes", "200000",
                                 "--variant", "fp32", "--grpc-port", str(grpc_port))
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


def test_nvidias_clients_read_the_server_and_model_metadata_and_config_over_http_and_grpc(server, grpc_port):
    """tritonclient, HTTP and gRPC: server metadata (GET /v2), model metadata and Triton's model configuration; an
    extension not supported is answered by name."""
    http = tritonclient.http.InferenceServerClient(server.removeprefix("http://"))
    grpc = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    assert http.is_server_live() and http.is_server_ready() and grpc.is_server_live() and grpc.is_server_ready()
    assert http.is_model_ready(MODEL) and grpc.is_model_ready(MODEL) and not grpc.is_model_ready("no-such-model")
    meta = http.get_server_metadata()
    assert meta["name"] == "graft" and "binary_tensor_data" in meta["extensions"]
    assert grpc.get_server_metadata(as_json=True) == meta
    config = http.get_model_config(MODEL)
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [1, 28, 28]
    assert config["output"][0]["dims"] == [10] and config["platform"] == "onnxruntime_onnx"
    by_grpc = grpc.get_model_config(MODEL).config  # Triton's own ModelConfig class reads Graft's answer
    assert (by_grpc.max_batch_size, list(by_grpc.input[0].dims), list(by_grpc.output[0].dims)) == (32, [1, 28, 28], [10])
    assert by_grpc.input[0].data_type == tritonclient.grpc.model_config_pb2.TYPE_FP32
    assert by_grpc.input[0].format == tritonclient.grpc.model_config_pb2.ModelInput.FORMAT_NCHW
    assert by_grpc.instance_group[0].kind == tritonclient.grpc.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert {key: value.string_value for key, value in by_grpc.parameters.items()} == {
        key: value["string_value"] for key, value in config["parameters"].items()}
    assert grpc.get_model_config(MODEL, model_version="1").config.parameters["version"].string_value == "1"
    model = grpc.get_model_metadata(MODEL, as_json=True)
    assert model["versions"][0] == "1" and model["inputs"][0]["shape"] == ["-1", "1", "28", "28"]  # int64 in JSON
    with insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # reflection, as grpcurl lists services
        listed = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in listed.get_services()
        infer = listed.FindFileContainingSymbol("inference.GRPCInferenceService")
        assert "ModelInfer" in [method.name for method in infer.service[0].method]
    with pytest.raises(InferenceServerException, match="model_repository extension is not supported"):
        http.get_model_repository_index()
    with pytest.raises(InferenceServerException, match="statistics extension is not supported"):
        http.get_inference_statistics(MODEL)
    for call, extension in ((grpc.get_model_repository_index, "model_repository"),
                            (lambda: grpc.get_inference_statistics(MODEL), "statistics"),
                            (grpc.get_system_shared_memory_status, "system_shared_memory")):
        with pytest.raises(InferenceServerException, match=f"{extension} extension is not supported") as refused:
            call()
        assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
    assert grpc.is_server_ready()


def _triton_inputs(module, rows: np.ndarray, binary: bool | None = None):
    tensor = module.InferInput("pixels", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, **({} if binary is None else {"binary_data": binary}))
    return [tensor]


def test_nvidias_clients_infer_over_http_and_grpc_sync_and_async_json_and_binary(server, grpc_port, registry):
    _, expected = registry
    http = tritonclient.http.InferenceServerClient(server.removeprefix("http://"))
    for binary in (True, False):
        outputs = [tritonclient.http.InferRequestedOutput("logits", binary_data=binary)]
        answer = http.infer(MODEL, _triton_inputs(tritonclient.http, PROBE, binary), outputs=outputs)
        np.testing.assert_allclose(answer.as_numpy("logits"), expected["1"], atol=1e-5)
    grpc = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    answer = grpc.infer(MODEL, _triton_inputs(tritonclient.grpc, PROBE), request_id="probe-1")
    np.testing.assert_allclose(answer.as_numpy("logits"), expected["1"], atol=1e-5)
    assert answer.get_response().model_version == "1" and answer.get_response().id == "probe-1"

    async def concurrently() -> list[np.ndarray]:
        clients = (tritonclient.http.aio.InferenceServerClient(server.removeprefix("http://")),
                   tritonclient.grpc.aio.InferenceServerClient(f"127.0.0.1:{grpc_port}"))
        try:
            asked = [client.infer(MODEL, _triton_inputs(module, PROBE[i:i + 1]))
                     for client, module in zip(clients, (tritonclient.http, tritonclient.grpc)) for i in (0, 1) * 8]
            return [answer.as_numpy("logits") for answer in await asyncio.gather(*asked)]
        finally:
            for client in clients:
                await client.close()

    answers = asyncio.run(concurrently())
    for i, logits in enumerate(answers):  # rows 0, 1, 0, 1, ...: each answered with its own row, batched or not
        np.testing.assert_allclose(logits[0], expected["1"][i % 2], atol=1e-5)


def test_a_version_asked_for_by_number_answers_beside_the_alias_over_http_and_grpc(server, grpc_port, registry):
    """/v2/models/NAME/versions/2/...: v2 (the challenger) loaded at its first request and answering as v2, while the
    alias's v1 answers requests without a version; a version that does not exist is a 404 / NOT_FOUND by name."""
    _, expected = registry
    http = tritonclient.http.InferenceServerClient(server.removeprefix("http://"))
    grpc = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    by_number = http.infer(MODEL, _triton_inputs(tritonclient.http, PROBE), model_version="2")
    np.testing.assert_allclose(by_number.as_numpy("logits"), expected["2"], atol=1e-5)
    assert by_number.get_response()["model_version"] == "2"
    by_grpc = grpc.infer(MODEL, _triton_inputs(tritonclient.grpc, PROBE), model_version="2")
    np.testing.assert_allclose(by_grpc.as_numpy("logits"), expected["2"], atol=1e-5)
    alias = grpc.infer(MODEL, _triton_inputs(tritonclient.grpc, PROBE))
    np.testing.assert_allclose(alias.as_numpy("logits"), expected["1"], atol=1e-5)
    assert http.is_model_ready(MODEL, "2") and http.get_model_metadata(MODEL, "2")["parameters"]["version"] == "2"
    assert http.get_model_config(MODEL, "2")["parameters"]["version"]["string_value"] == "2"
    assert http.get_model_metadata(MODEL)["versions"] == ["1", "2"]
    assert not http.is_model_ready(MODEL, "99") and not grpc.is_model_ready(MODEL, "99")
    missing = httpx.get(f"{server}/v2/models/{MODEL}/versions/99")
    assert missing.status_code == 404 and "v99 is not served" in missing.json()["error"]
    with pytest.raises(InferenceServerException, match="v99 is not served") as refused:
        grpc.infer(MODEL, _triton_inputs(tritonclient.grpc, PROBE), model_version="99")
    assert refused.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("case, code, message", [
    ("shape", "INVALID_ARGUMENT", "does not fit the model: expected [N, 1, 28, 28]"),
    ("datatype", "INVALID_ARGUMENT", "datatype 'FP64' is not supported"),
    ("nan", "INVALID_ARGUMENT", "NaN or infinity"),
    ("too large", "RESOURCE_EXHAUSTED", "larger than max"),
    ("model", "NOT_FOUND", "unknown model 'no-such-model'"),
])
def test_bad_grpc_requests_get_the_right_status_and_the_server_goes_on(server, grpc_port, registry, case, code, message):
    _, expected = registry
    grpc = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    rows = {"shape": np.zeros((1, 1, 27, 28), np.float32), "nan": np.full((1, 1, 28, 28), np.nan, np.float32),
            "too large": np.zeros((80, 1, 28, 28), np.float32)}.get(case, PROBE)  # 80 rows: 251 kB > the 200 kB limit
    inputs = _triton_inputs(tritonclient.grpc, rows)
    if case == "datatype":
        inputs = [tritonclient.grpc.InferInput("pixels", list(PROBE.shape), "FP64")]
        inputs[0].set_data_from_numpy(PROBE.astype(np.float64))
    with pytest.raises(InferenceServerException) as refused:
        grpc.infer("no-such-model" if case == "model" else MODEL, inputs)
    assert refused.value.status() == f"StatusCode.{code}" and message in refused.value.message(), refused.value
    np.testing.assert_allclose(grpc.infer(MODEL, _triton_inputs(tritonclient.grpc, PROBE)).as_numpy("logits"),
                               expected["1"], atol=1e-5)


def _binary_request(rows: np.ndarray, binary_output: bool, size: int | None = None) -> tuple[bytes, dict]:
    data = rows.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "pixels", "shape": list(rows.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(data) if size is None else size}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": binary_output}}]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


def test_binary_tensors_in_and_out_give_the_json_answer(server, registry):
    """Triton's binary tensor extension: raw little-endian FP32 after the JSON header, both ways."""
    _, expected = registry
    with httpx.Client() as client:
        body, headers = _binary_request(PROBE, binary_output=True)
        answer = client.post(f"{server}/v2/models/{MODEL}/infer", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        length = int(answer.headers["inference-header-content-length"])
        header = json.loads(answer.content[:length])
        assert header["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4 and "data" not in header["outputs"][0]
        logits = np.frombuffer(answer.content[length:], dtype="<f4").reshape(header["outputs"][0]["shape"])
        np.testing.assert_allclose(logits, expected["1"], atol=1e-5)
        body, headers = _binary_request(PROBE, binary_output=False)  # binary in, JSON out
        as_json = client.post(f"{server}/v2/models/{MODEL}/infer", content=body, headers=headers).json()
        np.testing.assert_allclose(np.array(as_json["outputs"][0]["data"]).reshape(2, 10), expected["1"], atol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"size": 12}, "needs 6272 bytes; parameters.binary_data_size is 12"),
    ({"header_length": "999999"}, "must be the byte length of the JSON header"),
    ({"header_length": "ten"}, "must be the byte length of the JSON header"),
    ({"truncate": 100}, "and 6172 bytes follow the JSON header"),
    ({"nan": True}, "NaN or infinity"),
])
def test_bad_binary_tensors_get_a_400_that_says_what_is_wrong(server, change, message):
    rows = PROBE.copy()
    if change.get("nan"):
        rows[0, 0, 0, 0] = np.nan
    body, headers = _binary_request(rows, binary_output=True, size=change.get("size"))
    if "header_length" in change:
        headers["Inference-Header-Content-Length"] = change["header_length"]
    body = body[: len(body) - change.get("truncate", 0)]
    answer = httpx.post(f"{server}/v2/models/{MODEL}/infer", content=body, headers=headers)
    assert answer.status_code == 400 and message in answer.json()["error"], answer.text


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
    ({"shape": [200, 1, 28, 28]}, 413, "over the limit of 127 (what fits in the body limit)"),  # 200,000 / (2 * 784)
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


def test_the_page_is_the_face_of_the_served_versions_card(server, registry):
    client, _ = registry
    tags = client.get_model_version(MODEL, "1").tags
    page = httpx.get(f"{server}/").text
    assert f"<h2>Model card: {MODEL} v1</h2>" in page, "the card of the version served, fetched from the registry"
    assert 'variant <b id="variant">fp32' in page and "Test accuracy" in page and "metric." not in page
    assert f"<th>Test accuracy</th><td>{100 * float(tags['metric.test.accuracy']):.2f}%</td>" in page
    assert "<th>Calibration error (ECE)</th>" in page
    # Every gate with its value against its bound, as the version's tags hold them.
    ece = f"<th>calibration.ece</th><td>{tags['gate.calibration.ece.verdict']}</td><td>{tags['gate.calibration.ece.value']}</td>"
    assert ece in page and "&lt;= 1</td>" in page
    assert f"{tags['graft.source.name']} ({tags['graft.source.kind']}" in page
    assert "src='/card/mistakes.png'" in page
    image = httpx.get(f"{server}/card/mistakes.png")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


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

    def answered(version: str, since: int = 0, at_least: int = 80) -> Callable[[], bool]:
        """Whether `at_least` answers from `version` came back after the first `since` results."""
        return lambda: sum(v == version for _, v, _ in results[since:]) >= at_least

    def serves(version: str) -> Callable[[], bool]:
        return lambda: httpx.get(f"{server}/v2/models/{MODEL}").json()["parameters"]["version"] == version

    workers = [threading.Thread(target=traffic) for _ in range(8)]
    for worker in workers:
        worker.start()
    try:
        wait_until(answered("1"), 60, "traffic before the promotion")
        move_alias(client, MODEL, CHAMPION, "2", "promote", "test: promote under load")
        wait_until(serves("2"), 15, "the server did not follow the promotion")
        wait_until(answered("2"), 60, "traffic on v2")
        since = len(results)
        move_alias(client, MODEL, CHAMPION, "1", "rollback", "test: roll back under load")
        wait_until(serves("1"), 15, "the server did not follow the rollback")
        wait_until(answered("1", since), 60, "traffic after the rollback")
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


def _metric_value(base: str, series: str) -> float:
    line = next((line for line in httpx.get(f"{base}/metrics").text.splitlines() if line.startswith(series + " ")), None)
    return float(line.split()[-1]) if line else 0.0


def test_the_challenger_shadows_live_answers_and_promotion_waits_for_its_evidence(registry, served_workspace,
                                                                                   mlflow_server, tmp_path):
    client, _ = registry
    root, _ = served_workspace
    folder = tmp_path / "captures"
    process, base = start_server(mlflow_server, MODEL, tmp_path / "cache", "--variant", "fp32", "--shadow-enabled",
                                 "--shadow-cpu-share", "1", "--capture-enabled", "--capture-folder", str(folder))
    rows = np.random.default_rng(11).normal(size=(24, 1, 28, 28)).astype(np.float32)
    try:
        wait_ready(base)
        wait_until(lambda: 'graft_shadow_model_info{alias="challenger",version="2"} 1.0' in httpx.get(f"{base}/metrics").text,
                   30, "the challenger never became the shadow")
        ids = []
        with httpx.Client() as http:
            for row in rows:
                response = _infer(http, base, row[None])
                assert response.status_code == 200 and response.json()["model_version"] == "1"
                ids.append(response.headers["x-request-id"])
            classes = http.get(f"{base}/v2/models/{MODEL}").json()["parameters"]["classes"]
        wait_until(lambda: _metric_value(base, 'graft_shadow_requests_total{outcome="compared"}') == len(rows), 30,
                   "the shadow did not compare every answer")
        # What each registered version predicts for these rows, from its own file in a fresh session.
        predicted = {version: ort.InferenceSession(str(next((root.parent / f"v{version}").rglob("model.onnx"))),
                                                   providers=["CPUExecutionProvider"]).run(None, {"pixels": rows})[0]
                     .argmax(axis=1) for version in ("1", "2")}
        same = predicted["1"] == predicted["2"]
        assert _metric_value(base, "graft_shadow_rows_total") == len(rows)
        assert _metric_value(base, "graft_shadow_agreements_total") == same.sum()
        labelled = 12  # labelled with the challenger's class: it is right on each, the champion where they agree
        with httpx.Client() as http:
            for request_id, index in zip(ids, predicted["2"][:labelled]):
                answer = http.post(f"{base}/feedback", json={"request_id": request_id, "label": classes[index]})
                assert answer.status_code == 201, answer.text
        assert (_metric_value(base, 'graft_shadow_labelled_total{served="right",shadow="right"}')
                + _metric_value(base, 'graft_shadow_labelled_total{served="wrong",shadow="right"}')) == labelled
        assert _metric_value(base, 'graft_shadow_labelled_total{served="wrong",shadow="right"}') == (~same[:labelled]).sum()
        wait_until(lambda: _metric_value(base, "graft_capture_shadow_records_total") == len(rows), 10,
                   "the shadow's records were not all written")
    finally:
        process.terminate()
        process.wait(timeout=20)
    evidence = collect_evidence(folder, "1", "2", 0.95)
    assert (evidence.rows, evidence.agreements, evidence.labelled) == (len(rows), same.sum(), labelled)
    assert (evidence.comparison.only_a, evidence.comparison.only_b) == ((~same[:labelled]).sum(), 0)

    # Promotion with the shadow gate: the project's own capture folder holds no evidence, so it is refused, in a line.
    refused = graft_cli(root, mlflow_server, "promote", "--require-shadow", check=False)
    assert refused.returncode != 0 and "refusing to promote served-classifier v2" in refused.stderr
    assert "0 answers of v2 shadowing v1" in refused.stderr and "Traceback" not in refused.stderr
    assert alias_version(client, MODEL, CHAMPION) == "1"


def test_the_shadow_keeps_to_its_share_of_a_core_and_counts_the_answers_it_skips(registry, mlflow_server, tmp_path):
    """serving.shadow.cpu_share: once a shadow run has taken its time t, no other starts for t / share. At a
    millionth of a core a run of even 1 us holds the next off for a second, so every answer sent right after the
    first comparison is skipped, each counted over_budget; the answers themselves are the champion's, untouched."""
    process, base = start_server(mlflow_server, MODEL, tmp_path / "cache", "--variant", "fp32", "--shadow-enabled",
                                 "--shadow-cpu-share", "0.000001")
    rows = np.random.default_rng(12).normal(size=(21, 1, 28, 28)).astype(np.float32)
    compared, over_budget = 'graft_shadow_requests_total{outcome="compared"}', 'graft_shadow_requests_total{outcome="over_budget"}'
    try:
        wait_ready(base)
        wait_until(lambda: 'graft_shadow_model_info{alias="challenger",version="2"} 1.0' in httpx.get(f"{base}/metrics").text,
                   30, "the challenger never became the shadow")
        with httpx.Client() as http:
            assert _infer(http, base, rows[:1]).json()["model_version"] == "1"
            wait_until(lambda: _metric_value(base, compared) == 1, 30, "the first answer was not shadowed")
            for row in rows[1:]:
                response = _infer(http, base, row[None])
                assert response.status_code == 200 and response.json()["model_version"] == "1"
        assert _metric_value(base, over_budget) == len(rows) - 1
        assert _metric_value(base, compared) == 1
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_a_canary_share_answers_by_key_within_binomial_bounds_and_rolls_back_at_once(server, registry, served_workspace,
                                                                                     mlflow_server):
    """`graft canary set 10`: every server following the registry lets the challenger (v2) answer 10% of requests
    from the change's scheduled moment on,
    by request id (a binomial draw), or by the client's key (sticky: each key's side is its hash bucket's); each
    answer names its version and is wholly that version's; `graft rollback` gives all traffic back to the champion."""
    client, expected = registry
    root, _ = served_workspace
    body, headers = _binary_request(PROBE, binary_output=False)

    def ask(http: httpx.Client, key: str | None = None) -> str:
        answer = http.post(f"{server}/v2/models/{MODEL}/infer", content=body,
                           headers={**headers, **({"X-Graft-Key": key} if key else {})})
        assert answer.status_code == 200, answer.text
        version = answer.json()["model_version"]
        assert answer.headers["x-model-version"] == version
        np.testing.assert_allclose(np.array(answer.json()["outputs"][0]["data"]).reshape(2, 10), expected[version],
                                   atol=1e-5)
        return version

    def share_is(percent: float) -> Callable[[], bool]:
        return lambda: _metric_value(server, "graft_canary_share_percent") == percent

    in_canary = next(f"client-{i}" for i in range(1000) if bucket(f"client-{i}") < 1000)  # on v2 from 10% on
    watched: list[tuple[float, float, str]] = []  # (sent, received, version) of that key's requests
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client() as http:
            while not stop.is_set():
                sent = time.time()
                version = ask(http, in_canary)
                watched.append((sent, time.time(), version))

    watcher = threading.Thread(target=watch)
    try:
        watcher.start()
        done = graft_cli(root, mlflow_server, "canary", "set", "10", "--reason", "test: a tenth for v2")
        assert "0% -> 10%" in done.stdout and "the canary challenger v2 10%" in done.stdout
        effective = datetime.fromisoformat(done.stdout.split("switches at ")[1].split(" UTC")[0]).timestamp()
        wait_until(share_is(10), 15, "the server did not take the canary share")
        time.sleep(0.3)
        stop.set()
        watcher.join(10)
        # The change took effect at its scheduled moment (serving.switch_lead_seconds after it was made), not when
        # the server happened to see it: nothing answered by v2 before it, everything sent after it (and after the
        # lateness the server owns up to, were it late) answered by v2.
        late = _metric_value(server, "graft_traffic_switch_late_seconds")
        assert [version for _, received, version in watched if received < effective] == \
            ["1"] * sum(received < effective for _, received, _ in watched)
        after = [version for sent, _, version in watched if sent > effective + late]
        assert after and set(after) == {"2"}, (late, watched[-5:])
        canaried = _metric_value(server, 'graft_answers_total{route="canary",version="2"}')
        meta = httpx.get(f"{server}/v2/models/{MODEL}").json()
        assert meta["versions"] == ["1", "2"] and meta["parameters"]["canary"] == {
            "alias": "challenger", "version": "2", "share_percent": 10.0}
        assert 'Version <b id="canary">2</b> answers 10% of requests (canary).' in httpx.get(server).text
        with httpx.Client() as http:
            versions = [ask(http) for _ in range(2000)]
            keys = [f"client-{i}" for i in range(100)]
            keyed = {key: {ask(http, key) for _ in range(3)} for key in keys}
        on_canary = versions.count("2")
        assert 140 <= on_canary <= 260, f"{on_canary} of 2000 on the canary: 10% +- 4.5 binomial standard deviations"
        assert set(versions) == {"1", "2"}
        assert keyed == {key: {"2" if bucket(key) < 1000 else "1"} for key in keys}  # sticky, by the key's bucket
        counted = _metric_value(server, 'graft_answers_total{route="canary",version="2"}') - canaried
        assert counted == on_canary + sum(sides == {"2"} for sides in keyed.values()) * 3

        done = graft_cli(root, mlflow_server, "rollback", "--reason", "test: canary back")
        assert "10% -> 0%" in done.stdout and alias_version(client, MODEL, CHAMPION) == "1"
        wait_until(share_is(0), 15, "the server did not take the rollback")
        assert httpx.get(f"{server}/v2/models/{MODEL}").json()["parameters"]["canary"] is None
        with httpx.Client() as http:
            assert {ask(http, key) for key in keys[:30]} == {"1"}
        traffic = graft_cli(root, mlflow_server, "history", "--traffic").stdout
        assert "v1 90%, v2 10%" in traffic and traffic.rstrip().endswith("v1 100%")
    finally:
        stop.set()
        client.set_registered_model_tag(MODEL, CANARY_SHARE_TAG, "0")  # whatever happened: no canary for the rest


def test_metrics_show_batches_versions_and_errors(server):
    text = httpx.get(f"{server}/metrics").text
    assert ('graft_model_info{model="served-classifier",provider="CPUExecutionProvider",variant="fp32",version="1"} 1.0'
            in text)
    assert "graft_queue_depth" in text and 'graft_request_latency_seconds_bucket{endpoint="/predict"' in text
    executions = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("graft_executions_total")))
    inferences = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("graft_inferences_total")))
    assert inferences / executions > 1.0, "concurrent requests were batched"
    assert 'graft_request_errors_total{endpoint="predict",reason="bad_image"}' in text
    assert 'graft_model_reloads_total{outcome="switched"} 2.0' in text


def test_page_shows_the_served_model(server):
    page = httpx.get(server).text
    assert 'id="version">1<' in page and "CPUExecutionProvider" in page and "quality.accuracy" in page


def test_auto_serves_the_variant_this_cpu_runs_best_says_so_and_checks_its_hash(registry, mlflow_server, tmp_path):
    """The champion publishes FP32 and INT8: auto serves INT8 on a CPU with 8-bit dot products, else FP32
    (the rule: tests/test_variants.py), and serves the very file whose sha256 the registry holds."""
    client, _ = registry
    champion = alias_version(client, MODEL, CHAMPION)
    tags = client.get_model_version(MODEL, champion).tags
    here, why = choose_variant(AUTO, "CPUExecutionProvider", published_in(tags))
    folder = download_artifacts(artifact_uri=client.get_model_version_download_uri(MODEL, champion),
                                dst_path=str(tmp_path / "download"), tracking_uri=mlflow_server)
    expected = ort.InferenceSession(str(variant_path(Path(folder) / "model.onnx", here)),
                                    providers=["CPUExecutionProvider"])
    process, base = start_server(mlflow_server, MODEL, tmp_path / "cache")  # serving.variant: auto
    try:
        wait_ready(base)
        parameters = httpx.get(f"{base}/v2/models/{MODEL}").json()["parameters"]
        assert {"fp32", "int8"} <= set(published_in(tags))
        assert (parameters["variant"], parameters["variant_note"]) == (here, f"{here} ({why})")
        np.testing.assert_allclose(_served_logits(base), expected.run(None, {"pixels": PROBE})[0], atol=1e-5)
        assert f'variant="{here}",version="{champion}"}} 1.0' in httpx.get(f"{base}/metrics").text
        cached = next((tmp_path / "cache").rglob(variant_path("model.onnx", here).name))
        assert sha256_file(cached) == tags[sha_tag(here)]
    finally:
        process.terminate()
        process.wait(timeout=20)


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
    assert "in strict mode, but no GPU provider can load here (cuda: " in done.stdout + done.stderr


def _register_file(uri: str, onnx_file: Path, artifacts: Path, sha256: str) -> str:
    """A version of MODEL in the registry at `uri` holding `onnx_file`, tagged with the sha256 given."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("copies")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("copies", artifacts.as_uri())
    run = client.create_run(experiment_id)
    client.log_artifact(run.info.run_id, str(onnx_file), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    return str(client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id,
                                           tags={ONNX_SHA_TAG: sha256}).version)


def _served_logits(base: str) -> np.ndarray:
    with httpx.Client() as client:
        answer = _infer(client, base, PROBE).json()
    return np.array(answer["outputs"][0]["data"]).reshape(2, 10)


def test_two_registries_with_the_same_model_name_and_version_each_serve_their_own(registry, mlflow_server, tmp_path):
    """Another project's registry has its own `served-classifier` v1 (this registry's v2 bytes). Two servers
    sharing one cache directory each serve their own registry's file; a version whose stored file was replaced
    after registration is refused, counted, and the server keeps the version it has."""
    client, expected = registry
    champion = alias_version(client, MODEL, CHAMPION)
    other_bytes = "2" if champion == "1" else "1"
    files = {v: Path(download_artifacts(artifact_uri=client.get_model_version_download_uri(MODEL, v),
                                        dst_path=str(tmp_path / f"v{v}"), tracking_uri=mlflow_server)) / "model.onnx"
             for v in ("1", "2")}
    other = f"sqlite:///{tmp_path / 'other.db'}"
    other_client = MlflowClient(tracking_uri=other)
    mine = _register_file(other, files[other_bytes], tmp_path / "other-artifacts", sha256_file(files[other_bytes]))
    assert mine == "1"
    other_client.set_registered_model_alias(MODEL, CHAMPION, mine)

    shared_cache = tmp_path / "shared-cache"
    servers = [start_server(url, MODEL, shared_cache, "--variant", "fp32") for url in (mlflow_server, other)]
    try:
        for (_, base), want in zip(servers, (expected[champion], expected[other_bytes])):
            wait_ready(base, 60)
            assert httpx.get(f"{base}/v2/models/{MODEL}").json()["versions"] == ["1"]
            np.testing.assert_allclose(_served_logits(base), want, atol=1e-5)

        # v2 of the other registry: registered with its hash, then its stored file replaced by other bytes.
        tampered = _register_file(other, files[other_bytes], tmp_path / "other-artifacts", sha256_file(files[other_bytes]))
        stored = Path(unquote(urlparse(other_client.get_model_version_download_uri(MODEL, tampered)).path)) / "model.onnx"
        stored.write_bytes(files[champion].read_bytes())
        base = servers[1][1]
        asked = httpx.post(f"{base}/v2/models/{MODEL}/versions/{tampered}/infer",  # by number: refused the same way
                           json={"inputs": [{"name": "pixels", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                             "data": [0.0] * 784}]})
        assert asked.status_code == 404 and f"v{tampered} is not served: its file failed its hash check" in asked.text
        other_client.set_registered_model_alias(MODEL, CHAMPION, tampered)
        refused = f'graft_model_refused_total{{model="{MODEL}",version="{tampered}"}} 1.0'
        wait_until(lambda: refused in httpx.get(f"{base}/metrics").text, 30,
                   lambda: httpx.get(f"{base}/metrics").text[-2000:])
        assert httpx.get(f"{base}/v2/models/{MODEL}").json()["versions"] == ["1"], "the server keeps what it had"
        np.testing.assert_allclose(_served_logits(base), expected[other_bytes], atol=1e-5)
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=20)
    log = servers[1][0].stdout.read()
    assert f"refused v{tampered}, still serving v1" in log and "was changed or replaced after registration" in log


def test_health_answers_at_once_while_30_large_images_are_decoded(server):
    """Decoding ran on the event loop: 30 concurrent large PNGs stalled /v2/health/live for seconds. Now it runs
    in a bounded pool and health is answered while the uploads are in flight."""
    import asyncio

    big = _png(np.full((3000, 3000, 3), 180, np.uint8))  # 27 MB of pixels in a small file
    assert len(big) < 200_000

    async def scenario() -> tuple[float, float, list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            started = time.perf_counter()
            uploads = [asyncio.create_task(client.post(f"{server}/predict", content=big)) for _ in range(30)]
            waits = []
            while not all(task.done() for task in uploads):
                sent = time.perf_counter()
                assert (await client.get(f"{server}/v2/health/live")).status_code == 200
                waits.append(time.perf_counter() - sent)
                await asyncio.sleep(0.02)  # the probe's pace while the uploads run: what is measured, not a wait
            statuses = [(await task).status_code for task in uploads]
            return time.perf_counter() - started, max(waits), statuses

    total, worst_health, statuses = asyncio.run(scenario())
    assert statuses == [200] * 30
    assert worst_health < 0.25 * total, f"health waited {worst_health:.2f}s of the uploads' {total:.2f}s"


def test_an_over_limit_body_gets_a_413_the_client_reads(server):
    """A declared length over the limit, without `Expect: 100-continue`, and a chunked multipart upload (no length
    at all) both get an answer the client receives, not a reset; the chunked upload is not kept past the limit (the
    rest is read and dropped: test_server_errors.py)."""
    declared = httpx.post(f"{server}/predict", content=b"\0" * 3_000_000)
    assert declared.status_code == 413 and "over the limit of 200000" in declared.json()["error"]

    boundary = "graftboundary"

    def chunked_multipart():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
               "Content-Type: image/png\r\n\r\n").encode()
        for _ in range(300):  # 300 x 10 kB = 3 MB, 15 times the limit
            yield b"\0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    chunked = httpx.post(f"{server}/predict", content=chunked_multipart(),
                         headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert chunked.status_code == 413 and "over the limit of 200000" in chunked.json()["error"]
    assert httpx.get(f"{server}/v2/health/live").status_code == 200


def test_an_api_token_guards_every_endpoint_but_health(registry, mlflow_server, tmp_path):
    grpc_port = free_port()
    process, base = start_server(mlflow_server, MODEL, tmp_path, "--grpc-port", str(grpc_port),
                                 env={"GRAFT_API_TOKEN": "s3cret-token"})
    try:
        wait_ready(base)
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        png = _png(np.zeros((28, 28), np.uint8))
        for method, path in (("GET", f"/v2/models/{MODEL}"), ("POST", "/predict"), ("GET", "/metrics"), ("GET", "/"),
                             ("POST", f"/v2/models/{MODEL}/infer")):
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret-token"}):
                refused = httpx.request(method, f"{base}{path}", content=png, headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", (path, headers)
        good = {"authorization": "Bearer s3cret-token"}
        assert httpx.get(f"{base}/v2/models/{MODEL}", headers=good).status_code == 200
        assert httpx.post(f"{base}/predict", content=png, headers=good).status_code == 200
        grpc = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert grpc.is_server_live() and grpc.is_server_ready()  # health needs no token, as over HTTP
        for headers in ({}, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException, match="needs an API token") as refused:
                grpc.infer(MODEL, _triton_inputs(tritonclient.grpc, PROBE), headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        assert grpc.infer(MODEL, _triton_inputs(tritonclient.grpc, PROBE), headers=good).as_numpy("logits").shape == (2, 10)
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_listening_beyond_loopback_needs_a_token_or_an_explicit_insecure_flag(tmp_path):
    from deploy.server import BindRefused, check_bind

    done = subprocess.run([sys.executable, "-m", "deploy.server", "--onnx-file", str(tmp_path / "model.onnx"),
                           "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "GRAFT_API_TOKEN"})
    assert done.returncode == 2 and "refusing to listen on 0.0.0.0 without an API token" in done.stderr
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, "", insecure=False)
    check_bind("0.0.0.0", "a-token", insecure=False)
    check_bind("0.0.0.0", "", insecure=True)
    with pytest.raises(BindRefused, match="GRAFT_API_TOKEN"):
        check_bind("10.0.0.5", "", insecure=False)


def test_a_ramp_promotes_on_captured_evidence_and_a_worse_canary_goes_back_to_0(registry, served_workspace,
                                                                                 mlflow_server, tmp_path):
    """`graft promote --ramp` against a real server that captures: a canary labelled wrong on every answer (the
    champion right on every one) is refused at its first step, its share back to 0; unlabelled, it passes each step
    on its answers and becomes the champion, the canary ended. No request fails on the way."""
    client, _ = registry
    root, _ = served_workspace
    folder = tmp_path / "captures"
    params_file = root / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["promotion"]["canary"] = {"steps": [20, 100], "min_requests": 10, "poll_seconds": 0.2,
                                     "step_timeout_minutes": 1}
    params["serving"]["capture"]["folder"] = str(folder)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    process, base = start_server(mlflow_server, MODEL, tmp_path / "cache", "--variant", "fp32", "--capture-enabled",
                                 "--capture-folder", str(folder))
    body, headers = _binary_request(PROBE[:1], binary_output=False)
    results, stop, label_wrongly = [], threading.Event(), threading.Event()

    def traffic():
        with httpx.Client(timeout=10) as http:
            classes = http.get(f"{base}/v2/models/{MODEL}").json()["parameters"]["classes"]
            while not stop.is_set():
                answer = http.post(f"{base}/v2/models/{MODEL}/infer", content=body, headers=headers)
                version = answer.json()["model_version"] if answer.status_code == 200 else None
                results.append((answer.status_code, version))
                if version and label_wrongly.is_set():  # by construction: the canary always wrong, the champion right
                    predicted = int(np.argmax(answer.json()["outputs"][0]["data"]))
                    label = classes[(predicted + 1) % len(classes)] if version == "2" else classes[predicted]
                    http.post(f"{base}/feedback", json={"request_id": answer.headers["x-request-id"], "label": label})

    worker = threading.Thread(target=traffic)
    try:
        wait_ready(base)
        worker.start()
        label_wrongly.set()
        refused = graft_cli(root, mlflow_server, "promote", "--ramp", check=False)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert ("refusing to promote served-classifier v2: at 20% of live traffic worse than the champion on labelled "
                "live requests") in refused.stderr and "Traceback" not in refused.stderr
        assert alias_version(client, MODEL, CHAMPION) == "1" and "canary.not_worse | failed" in (
            root / "reports" / "canary.md").read_text()
        label_wrongly.clear()
        ramped = graft_cli(root, mlflow_server, "promote", "--ramp", check=False)
        assert ramped.returncode == 0, ramped.stdout + ramped.stderr
        assert alias_version(client, MODEL, CHAMPION) == "2"
        wait_until(lambda: sum(version == "2" for _, version in results[-20:]) == 20, 15, "v2 is not answering all")
    finally:
        stop.set()
        worker.join()
        process.terminate()
        process.wait(timeout=20)
        params_file.write_text(original)
        client.set_registered_model_tag(MODEL, CANARY_SHARE_TAG, "0")
        move_alias(client, MODEL, CHAMPION, "1", "rollback", "test: the champion as the other tests expect it")
    assert {status for status, _ in results} == {200} and len(results) > 40
    shares = [(m.action, m.previous_share, m.share) for m in history(client, MODEL) if m.share is not None][-5:]
    assert shares == [("canary", 0, 20), ("rollback", 20, 0), ("canary", 0, 20), ("canary", 20, 100),
                      ("canary", 100, 0)]
