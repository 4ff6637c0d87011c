"""Request capture and feedback (deploy/capture.py) through the real server over HTTP: every answer's request id,
whole items for the sampled share, a SIGKILL mid-write leaving no torn file, the size budget and a really full disk
stopping capture (once, said in the log and /metrics) while serving goes on, and each bad feedback its own 4xx."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from components.export import export_onnx
from components.network import build
from deploy.capture import (
    BUDGET,
    GATHER_SECONDS,
    INPUTS_SUFFIX,
    LABEL_SUFFIX,
    RECORDS_SUFFIX,
    TEMP_SUFFIX,
    WRITE_ERROR,
    Answer,
    CapturedItem,
    CaptureStore,
    iter_items,
)
from deploy.model import softmax
from deploy.settings import CaptureSettings
from tests.conftest import onnx_server, tiny_spec, wait_until

MODEL = "captured-classifier"
CLASSES = ("ant", "bee", "cat")
TOKEN = "capture-test-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
ROWS = np.random.default_rng(3).normal(size=(2, 1, 28, 28)).astype(np.float32)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    return export_onnx(build(tiny_spec(CLASSES), 0), tmp_path_factory.mktemp("capture-model") / "model.onnx", 20)


def serving(onnx_file: Path, folder: Path, *options: str, **server):
    """The server (tests/conftest.py onnx_server) capturing to `folder`, with `options`."""
    return onnx_server(onnx_file, MODEL, folder.parent, "--capture-folder", str(folder), *options, **server)


@pytest.fixture(scope="module")
def server(onnx_file, tmp_path_factory):
    """Capture on, every answer kept, behind an API token; yields (base URL, capture folder)."""
    folder = tmp_path_factory.mktemp("captured") / "captures"
    with serving(onnx_file, folder, "--capture-enabled", env={"GRAFT_API_TOKEN": TOKEN}) as (base, _, _):
        yield base, folder


def _png(shape: tuple[int, ...], seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _infer(client: httpx.Client, base: str, rows: np.ndarray, binary: bool = False) -> httpx.Response:
    tensor = {"name": "pixels", "shape": list(rows.shape), "datatype": "FP32"}
    if not binary:
        return client.post(f"{base}/v2/models/{MODEL}/infer", json={"inputs": [{**tensor, "data": rows.ravel().tolist()}]})
    data = rows.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}]}).encode()
    return client.post(f"{base}/v2/models/{MODEL}/infer", content=header + data,
                       headers={"Inference-Header-Content-Length": str(len(header))})


def _metric(base: str, series: str, headers: dict | None = None) -> float | None:
    """The value of one series of /metrics (`name{labels}` as exposed), None when it is not there."""
    text = httpx.get(f"{base}/metrics", headers=headers).text
    found = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else None


def _items(folder: Path, ids: set[str]) -> dict[str, CapturedItem]:
    """The captured items with these ids, once all of them are written."""
    def written() -> dict[str, CapturedItem] | None:
        found = {item.id: item for item in iter_items(folder) if item.id in ids}
        return found if found.keys() == ids else None

    return wait_until(written, 10, lambda: f"captured {sorted(i.id for i in iter_items(folder))}, waiting for {sorted(ids)}")


def test_every_answer_has_a_request_id_and_is_captured_whole_under_it(server):
    base, folder = server
    png = _png((40, 30, 3))
    with httpx.Client(headers=AUTH) as client:
        raw = client.post(f"{base}/predict", content=png)
        upload = client.post(f"{base}/predict", files={"file": ("x.png", png, "image/png")})
        two_rows = _infer(client, base, ROWS)
        one_row = _infer(client, base, ROWS[:1], binary=True)
    answers = (raw, upload, two_rows, one_row)
    assert [a.status_code for a in answers] == [200] * 4
    ids = [a.headers["x-request-id"] for a in answers]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 4
    items = _items(folder, {ids[0], ids[1], f"{ids[2]}-0", f"{ids[2]}-1", ids[3]})

    for answer, request_id in zip((raw, upload), ids):  # the upload's bytes as they arrived, multipart or raw
        item = items[request_id]
        assert item.input_bytes() == png and item.input_suffix == ".png"
        assert (item.input_kind, item.record["endpoint"], item.record["request_id"]) == ("image", "predict", request_id)
        predictions = answer.json()["predictions"]
        assert item.predicted == predictions[0]["class"] and item.label is None
        given = dict(zip(item.classes, item.probabilities))
        assert all(given[p["class"]] == pytest.approx(p["probability"], abs=1e-6) for p in predictions)
    logits = np.array(two_rows.json()["outputs"][0]["data"]).reshape(2, 3)
    for row in range(2):
        item = items[f"{ids[2]}-{row}"]
        np.testing.assert_array_equal(item.tensor(), ROWS[row])  # the tensor as the client sent it
        np.testing.assert_allclose(item.probabilities, softmax(logits)[row], atol=1e-6)
        assert item.predicted == CLASSES[int(logits[row].argmax())] and item.input_kind == "tensor"
    np.testing.assert_array_equal(items[ids[3]].tensor(), ROWS[0])
    record = items[ids[3]].record
    assert (record["model"], record["variant"], record["classes"]) == (MODEL, "fp32", list(CLASSES))
    assert len(items[ids[3]].features) > 0, "the model's penultimate features, for drift monitoring"
    assert record["preprocess"]["height"] == 28, "a tensor row's way back to pixels"
    assert _metric(base, "graft_captured_total", AUTH) >= 5


def test_the_sampled_share_is_captured(onnx_file, tmp_path):
    folder = tmp_path / "captures"
    with serving(onnx_file, folder, "--capture-enabled", "--capture-sample", "0.3") as (base, _, _):
        with httpx.Client() as client:
            answers = [_infer(client, base, ROWS[:1], binary=True) for _ in range(200)]
    # the server has ended: what it had queued is written
    assert {a.status_code for a in answers} == {200}
    captured = {item.id for item in iter_items(folder)}
    assert captured <= {a.headers["x-request-id"] for a in answers}
    assert 35 <= len(captured) <= 85, f"{len(captured)} of 200 captured at sample 0.3 (binomial: 60 +- 6.5)"


# A writer that captures the upload in the file argv[3] as fast as it can, ids from argv[2] on, until it is killed.
CRASH_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from deploy import capture
from deploy.capture import Answer, CaptureStore
from deploy.settings import CaptureSettings
capture.GATHER_SECONDS = 0  # always writing: where a kill lands is where it hurts
store = CaptureStore(CaptureSettings(enabled=True, folder=sys.argv[1]), queue_items=2)
blob, probabilities = Path(sys.argv[3]).read_bytes(), np.full((1, 3), 1 / 3, np.float32)
for i in range(int(sys.argv[2]), 10**9):
    while not store.submit(Answer(f"{i:032x}", "predict", "m", "1", "fp32", ("ant", "bee", "cat"), probabilities, blob)):
        time.sleep(0.001)
"""
BLOB = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (4 * 2**20 // 256)  # 4 MB: a write takes a while


def _temporary(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def test_a_writer_killed_mid_write_leaves_no_torn_file(tmp_path):
    folder, upload = tmp_path / "captures", tmp_path / "upload.png"
    upload.write_bytes(BLOB)
    # Killed at whatever it is doing once a few items are written, three times at least, and until a kill has
    # caught a file half written (most of the writer's time is writing the 4 MB inputs).
    for attempt in range(10):
        writer = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, str(folder), str(attempt * 10**6), str(upload)],
                                  cwd=Path(__file__).parents[1])
        wait_until(lambda: len(list(iter_items(folder))) >= 3 * (attempt + 1), 60, "the writer wrote nothing",
                   interval=0.01, process=writer)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        if attempt >= 2 and _temporary(folder):
            break
    assert _temporary(folder), "no kill landed in the middle of a write"
    items = list(iter_items(folder))
    records = [p for p in folder.rglob(f"*{RECORDS_SUFFIX}") if not p.name.startswith(".")]
    lines = [line for path in records for line in path.read_bytes().splitlines()]
    assert len(items) == len(lines), "every record parses and names a whole input"
    assert all(item.input_bytes() == BLOB for item in items)
    for path in folder.rglob(f"*{INPUTS_SUFFIX}"):  # every file under its own name is whole: renamed once written
        if not path.name.startswith("."):
            batch = [item for item in items if item.inputs_path == path]
            if batch:
                assert path.stat().st_size == len(batch) * len(BLOB), f"{path.name} is torn"
            else:  # killed between the two renames: whole inputs whose records never came, which readers skip
                assert path.stat().st_size % len(BLOB) == 0 < path.stat().st_size, f"{path.name} is torn"


def test_readers_skip_what_is_not_whole_and_the_budget_counts_what_is_there(tmp_path):
    folder = tmp_path / "captures"
    store = CaptureStore(CaptureSettings(enabled=True, folder=str(folder)))
    store.submit(Answer("a" * 32, "predict", "m", "1", "fp32", CLASSES, np.full((1, 3), 1 / 3), b"whole",
                        np.ones((1, 4), np.float32)))
    store.close()
    segment = next(folder.iterdir())
    (records,) = segment.glob(f"*{RECORDS_SUFFIX}")
    line = records.read_bytes()
    inputs = records.with_suffix(INPUTS_SUFFIX).read_bytes()
    assert len(inputs) == len(b"whole") + 4 * 4, "the input, then its features (float32)"

    def batch(name: str, lines: bytes, data: bytes | None) -> None:
        (segment / f"{name}{RECORDS_SUFFIX}").write_bytes(lines)
        if data is not None:
            (segment / f"{name}{INPUTS_SUFFIX}").write_bytes(data)

    (segment / f"9999999999999-b{INPUTS_SUFFIX}").write_bytes(inputs)  # inputs whose records were never written
    (segment / f".9999999999999-c{RECORDS_SUFFIX}{TEMP_SUFFIX}").write_bytes(line)  # a stray temporary file
    batch("9999999999999-d", line.replace(b"a" * 32, b"d" * 32), None)  # its inputs are missing
    batch("9999999999999-e", line.replace(b"a" * 32, b"e" * 32), inputs[:-1])  # inputs cut short
    batch("9999999999999-f", line.replace(b"a" * 32, b"f" * 32) + line.replace(b"a" * 32, b"g" * 32)[:-20], inputs)
    assert [item.id for item in iter_items(folder)] == ["a" * 32, "f" * 32], "a torn last line is skipped"
    (item, _) = iter_items(folder)
    assert item.input_bytes() == b"whole" and item.features.tolist() == [1.0] * 4

    # A store opened on a folder at its budget counts what is there: it captures nothing more, and says why.
    (segment / "filler").write_bytes(b"\0" * 1_000_000)
    full = CaptureStore(CaptureSettings(enabled=True, folder=str(folder), max_bytes=1_000_000))
    full.submit(Answer("f" * 32, "predict", "m", "1", "fp32", CLASSES, np.full((1, 3), 1 / 3), b"more"))
    full.close()
    assert (full.stats.stopped, full.stats.captured, full.stats.dropped[BUDGET]) == (BUDGET, 0, 1)


def test_an_answer_the_writer_cannot_encode_is_counted_dropped_and_the_writer_goes_on(tmp_path):
    store = CaptureStore(CaptureSettings(enabled=True, folder=str(tmp_path / "captures")))
    # A class orjson refuses (a bare object): the writer fails on it with no OSError, before any file is written.
    store.submit(Answer("b" * 32, "predict", "m", "1", "fp32", (object(),) * 3, np.full((1, 3), 1 / 3), b"bad"))
    wait_until(lambda: store.stats.dropped[WRITE_ERROR] == 1, 10, "the failed answer counted as dropped")
    store.submit(Answer("c" * 32, "predict", "m", "1", "fp32", CLASSES, np.full((1, 3), 1 / 3), b"good"))
    store.close()
    assert (store.stats.captured, store.stats.stopped) == (1, None)
    assert [item.id for item in iter_items(tmp_path / "captures")] == ["c" * 32]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd (Linux)")
def test_the_writer_keeps_a_batch_open_only_until_the_next_and_closes_everything_when_closed(tmp_path):
    # A batch's files stay open until the next batch, which drops their pages from the page cache: none may leak.
    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_descriptors()
    store = CaptureStore(CaptureSettings(enabled=True, folder=str(tmp_path / "captures")))
    most = 0
    for n in range(12):
        store.submit(Answer(f"{n:032x}", "predict", "m", "1", "fp32", CLASSES, np.full((1, 3), 1 / 3), b"image"))
        wait_until(lambda: store.stats.captured == n + 1, 10, f"answer {n} written")
        most = max(most, open_descriptors())
    store.close()
    assert most <= before + 5, "at most the hour folder and two batches' files open at once"
    assert open_descriptors() == before, "closing the store closes every file it wrote"
    assert len(list(iter_items(tmp_path / "captures"))) == 12


def _capture_stopped(base: str, reason: str) -> bool:
    return _metric(base, f'graft_capture_stopped{{reason="{reason}"}}') == 1.0


def test_at_its_budget_capture_stops_says_so_once_and_serving_goes_on(onnx_file, tmp_path):
    folder = tmp_path / "captures"
    image = _png((250, 200, 3))  # noise: about 150 kB, so a 1 MB budget holds six
    with serving(onnx_file, folder, "--capture-enabled", "--capture-max-bytes", "1000000") as (base, log_path, _):
        assert _metric(base, 'graft_capture_stopped{reason="budget"}') == 0.0
        with httpx.Client() as client:
            statuses = [client.post(f"{base}/predict", content=image).status_code for _ in range(12)]
            wait_until(lambda: _capture_stopped(base, "budget"), 10, "capture never stopped at its budget")
            statuses += [client.post(f"{base}/predict", content=image).status_code for _ in range(5)]
        captured = _metric(base, "graft_captured_total")
        assert _metric(base, 'graft_capture_dropped_total{reason="budget"}') == 17 - captured
    assert statuses == [200] * 17, "serving goes on"
    assert 1 <= captured <= 6 and len(list(iter_items(folder))) == captured
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 1_000_000
    assert log_path.read_text().count("capture stopped (budget)") == 1


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = ["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs",
             str(tmp_path)]
    try:
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except FileNotFoundError:
        return False


def test_on_a_full_disk_capture_stops_says_so_once_and_serving_goes_on(onnx_file, tmp_path):
    """A real full filesystem: the server runs in a mount namespace of its own (unshare, as root or an unprivileged
    user) where its capture folder is a 256 kB tmpfs."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if not _can_mount_tmpfs(folder):
        pytest.skip("no user or mount namespace here (unshare --user --mount) to make a small filesystem in")
    small_disk = ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                  'mount -t tmpfs -o size=256k tmpfs "$0" && exec "$@"', str(folder))
    image = _png((100, 100, 3))  # noise: about 30 kB, so the disk is full after eight
    with serving(onnx_file, folder, "--capture-enabled", wrap=small_disk) as (base, log_path, _):
        with httpx.Client() as client:
            statuses = []
            for _ in range(12):  # one a batch: a batch that does not fit is lost whole, so some must come before
                statuses.append(client.post(f"{base}/predict", content=image).status_code)
                time.sleep(3 * GATHER_SECONDS)
            wait_until(lambda: _capture_stopped(base, "disk_full"), 10, "capture never stopped on the full disk")
            statuses += [client.post(f"{base}/predict", content=image).status_code for _ in range(5)]
        assert 1 <= _metric(base, "graft_captured_total") < 12
        assert _metric(base, 'graft_capture_stopped{reason="budget"}') == 0.0
    assert statuses == [200] * 17, "serving goes on"
    log = log_path.read_text()
    assert log.count("capture stopped (disk_full)") == 1 and "No space left on device" in log, log[-2000:]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "body is not valid JSON"),
    (b'{"label": "ant"}', 400, "expected a request_id and a label"),
    (b'{"request_id": 7, "label": "ant"}', 400, "expected a request_id and a label"),
    (b'{"request_id": "../../etc/passwd", "label": "ant"}', 400, "32 hex digits"),
    (b'{"request_id": "' + b"0" * 32 + b'", "label": "ant"}', 404, "no captured item"),
    (b"{" + b" " * 5000 + b"}", 413, "over the limit"),
])
def test_bad_feedback_gets_a_4xx_that_says_what_is_wrong(server, body, status, message):
    base, _ = server
    answer = httpx.post(f"{base}/feedback", content=body, headers=AUTH)
    assert answer.status_code == status and message in answer.json()["error"], answer.text


def test_feedback_is_stored_once_beside_its_item_for_a_known_class_and_a_token(server):
    base, folder = server
    with httpx.Client(headers=AUTH) as client:
        request_id = client.post(f"{base}/predict", content=_png((28, 28))).headers["x-request-id"]
        rows_id = _infer(client, base, ROWS).headers["x-request-id"]

        def feedback(item_id: str, label: str, headers: dict = AUTH) -> httpx.Response:
            return httpx.post(f"{base}/feedback", json={"request_id": item_id, "label": label}, headers=headers)

        assert feedback(request_id, "bee", headers={}).status_code == 401
        unknown = feedback(request_id, "zebra")
        assert unknown.status_code == 422 and "'zebra' is not one of the model's classes: ant, bee, cat" in unknown.text
        assert feedback(request_id, "bee").status_code == 201  # at once: an answer still queued is written first
        duplicate = feedback(request_id, "cat")
        assert duplicate.status_code == 409 and "labelled already ('bee')" in duplicate.json()["error"]
        whole_request = feedback(rows_id, "ant")
        assert whole_request.status_code == 404 and f"label each as {rows_id}-ROW" in whole_request.json()["error"]
        assert feedback(f"{rows_id}-1", "ant").status_code == 201
    labels = {item.id: item.label for item in iter_items(folder)}
    assert (labels[request_id], labels[f"{rows_id}-0"], labels[f"{rows_id}-1"]) == ("bee", None, "ant")
    assert len(list(folder.rglob(f"{request_id}{LABEL_SUFFIX}"))) == 1
    assert _metric(base, 'graft_feedback_total{outcome="duplicate"}', AUTH) >= 1
    assert _metric(base, 'graft_feedback_total{outcome="stored"}', AUTH) >= 2


def test_with_capture_off_answers_keep_their_id_and_feedback_says_how_to_turn_it_on(onnx_file, tmp_path):
    folder = tmp_path / "captures"
    with serving(onnx_file, folder) as (base, _, _):
        answer = httpx.post(f"{base}/predict", content=_png((28, 28)))
        assert answer.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
        refused = httpx.post(f"{base}/feedback", json={"request_id": answer.headers["x-request-id"], "label": "ant"})
        assert refused.status_code == 409 and "serving.capture" in refused.json()["error"]
        assert _metric(base, "graft_captured_total") is None
    assert not folder.exists(), "nothing is kept unless the operator turns capture on"
