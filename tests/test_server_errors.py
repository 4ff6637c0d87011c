"""The model server's answers to what users hit at its edges, over real HTTP: a port already in use, and bodies over
the limit sent whole by clients that read the answer only afterwards (urllib, requests)."""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from components.export import export_onnx
from components.network import build
from deploy.server import DRAIN_SECONDS
from tests.conftest import free_port, onnx_server, tiny_params, tiny_spec

MODEL = "edge-classifier"
LIMIT = 10_000_000  # serving.max_body_bytes as shipped


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> Path:
    return export_onnx(build(tiny_spec(tuple("abc")), 0), tmp_path_factory.mktemp("edge") / "model.onnx", 20)


@pytest.fixture(scope="module")
def server(onnx_file):
    with onnx_server(onnx_file, MODEL, onnx_file.parent, "--max-body-bytes", str(LIMIT)) as (base, log, process):
        yield base, urlsplit(base).port, process.pid
        ended = process.poll()
    assert ended is None, f"the server ended (status {ended}) while this module's tests ran: {log.read_text()[-2000:]}"


def test_a_port_in_use_is_named_with_the_flag_that_moves_it_and_exits_2(onnx_file, tmp_path):
    """uvicorn bound the port after loading the model, printed its own error and exited 3, graft's status for a
    rejected candidate. Now the port is bound first and a busy one is a user error in one line."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for command in (["graft", "serve"], ["deploy.server"]):
            done = subprocess.run([sys.executable, "-m", *command, "--onnx-file", str(onnx_file), "--port", str(port)],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60)
            output = done.stdout + done.stderr
            assert done.returncode == 2, output
            assert f"port {port} on 127.0.0.1 is already in use" in done.stderr and "--port" in done.stderr, output
            assert "Traceback" not in output and "startup" not in output, output  # refused before uvicorn started


def _post(url: str, body) -> urllib.error.HTTPError:
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=60)
    return answer.value


def _peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def test_urllib_reads_the_413_of_a_body_over_the_limit_sent_whole(server):
    """urllib sends the whole body, then reads. The server answered 413 from the declared length and closed with
    the body unread, so the kernel reset the connection and urllib saw "connection reset" (curl, reading while it
    sends, got the 413). Now the server reads the rest, dropping it, before it closes: memory stays flat."""
    base, _, pid = server
    peak = _peak_rss_bytes(pid)
    for path in ("/predict", f"/v2/models/{MODEL}/infer"):
        for size in (64_000_000, 2 * LIMIT):
            refused = _post(base + path, b"\0" * size)
            assert refused.code == 413, (path, size)
            assert json.loads(refused.read())["error"] == f"body of {size} bytes is over the limit of {LIMIT}"

    def chunked():  # no length at all: the endpoint counts and refuses past the limit
        for _ in range(2000):
            yield b"\0" * 32768

    refused = _post(base + "/predict", chunked())
    assert refused.code == 413 and json.loads(refused.read())["error"] == f"body is over the limit of {LIMIT} bytes"
    assert _peak_rss_bytes(pid) - peak < 32 * 2**20, "the dropped bytes were held"
    assert httpx.get(f"{base}/v2/health/live").status_code == 200


def _answer_and_close(port: int, head: bytes, body: bytes) -> tuple[bytes, float]:
    """Send a request that stops short of its declared body; what came back and when the server closed (a close
    with the body unread resets the connection: the answer has arrived before)."""
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(head + body)
        started, answer = time.monotonic(), b""
        try:
            while chunk := client.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer, time.monotonic() - started


def test_the_drain_is_bounded_in_bytes_and_time(server):
    """A client that claims gigabytes is answered and closed at once; one that stalls is closed after a few
    seconds. Neither holds the server."""
    _, port, _ = server
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    answer, seconds = _answer_and_close(port, head % 10_000_000_000, b"\0" * 100_000)
    assert answer.startswith(b"HTTP/1.1 413") and seconds < 1, seconds
    answer, seconds = _answer_and_close(port, head % 60_000_000, b"\0" * 1_000_000)
    assert answer.startswith(b"HTTP/1.1 413") and DRAIN_SECONDS - 1 < seconds < DRAIN_SECONDS + 2, seconds
    assert b"connection: close" in answer.lower()


def test_the_server_names_a_registry_it_cannot_open_and_creates_none(tmp_path):
    missing = tmp_path / "mlfow.db"
    done = subprocess.run([sys.executable, "-m", "deploy.server", "--tracking-uri", f"sqlite:///{missing}",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"graft-server: error: no MLflow registry at {missing}" in done.stderr and not missing.exists()
