"""The model server under random requests: every endpoint, bodies, headers, JSON tensors, multipart uploads and
query strings drawn by hypothesis for a bounded time (GRAFT_FUZZ_SECONDS, default 30). No answer may be a 5xx,
the server never dies, and health stays live; a crowd of idle and slow connections starves nobody."""
import json
import os
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from components.export import export_onnx
from components.network import build
from tests.conftest import onnx_server, tiny_spec

MODEL = "fuzzed-classifier"
FUZZ_SECONDS = float(os.environ.get("GRAFT_FUZZ_SECONDS", "30"))
BODY_LIMIT = 100_000


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    onnx_file = export_onnx(build(tiny_spec(tuple("abcdefghij")), 0), folder / "model.onnx", 20)
    # its log a file (onnx_server): thousands of bad requests log more than a pipe holds
    with onnx_server(onnx_file, MODEL, folder, "--max-body-bytes", str(BODY_LIMIT)) as (base, _, process):
        yield base, urlsplit(base).port, process


PATHS = ["/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready",
         f"/v2/models/{MODEL}/infer", "/predict", "/metrics", "/", "/v2/models/other/infer", "/v2/models//infer"]
text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
                    text)
json_values = st.recursive(numbers, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(text, inner, max_size=6),
                           max_leaves=40)
tensors = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.just("pixels"), text, numbers),
    "shape": st.one_of(st.lists(st.integers(-5, 2**40), max_size=6), st.just([1, 1, 28, 28]), st.just([2, 1, 28, 28]),
                       json_values),
    "datatype": st.one_of(st.sampled_from(["FP32", "INT64", "BYTES", "FP16"]), text),
    "data": st.one_of(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=784, max_size=784),
                      st.lists(numbers, max_size=20), json_values),
})
infer_bodies = st.one_of(st.builds(lambda t, extra: {"inputs": [t], **extra}, tensors, st.dictionaries(text, json_values, max_size=3)),
                         st.builds(lambda ts: {"inputs": ts}, st.lists(tensors, max_size=3)), json_values)


@st.composite
def multipart_bodies(draw):
    boundary = draw(st.sampled_from(["b0undary", "x", "----WebKitFormBoundary7MA4YWxkTrZu0gW"]))
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["file", "other", ""]) | text)
        filename = draw(st.none() | text)
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode("utf-8", "replace")
                     + draw(st.binary(max_size=2000)) + b"\r\n")
    ending = draw(st.sampled_from([f"--{boundary}--\r\n".encode(), b"", b"--"]))
    declared = draw(st.sampled_from([boundary, "", "other"]))
    return b"".join(parts) + ending, f"multipart/form-data; boundary={declared}" if declared else "multipart/form-data"


header_names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-"), min_size=1, max_size=20)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=60).map(str.strip)  # as clients send them


@st.composite
def requests(draw):
    path = draw(st.sampled_from(PATHS) | st.builds(lambda t: "/" + t.lstrip("/"), st.text(st.sampled_from("abcv2/-_.%"), max_size=30)))
    kind = draw(st.sampled_from(["none", "bytes", "json", "infer", "multipart", "image-ish"]))
    content_type = draw(st.sampled_from(["application/json", "image/png", "application/octet-stream", "text/plain"]) | header_values)
    if kind == "none":
        body = b""
    elif kind == "bytes":
        body = draw(st.binary(max_size=4000))
    elif kind == "json":
        body = json.dumps(draw(json_values), allow_nan=True).encode()
    elif kind == "infer":
        body = json.dumps(draw(infer_bodies), allow_nan=True).encode()
    elif kind == "multipart":
        body, content_type = draw(multipart_bodies())
    else:  # the start of real image formats, then anything
        body = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF"])) + draw(st.binary(max_size=3000))
    headers = {"content-type": content_type, **draw(st.dictionaries(header_names, header_values, max_size=4))}
    headers.pop("content-length", None), headers.pop("transfer-encoding", None), headers.pop("host", None)
    query = draw(st.dictionaries(st.sampled_from(["top_k", "x", "id"]), st.one_of(text, st.integers(-10**12, 10**12)).map(str), max_size=2))
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"]))
    return method, path, headers, query, body


def test_fuzzed_requests_never_get_a_5xx_and_the_server_stays_live(fuzz_server):
    base, _, process = fuzz_server
    answered, server_errors = [0], []

    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(requests())
    def one(request):
        method, path, headers, query, body = request
        response = client.request(method, path, headers=headers, params=query, content=body)
        answered[0] += 1
        if response.status_code >= 500:
            server_errors.append((method, path, headers, body[:200], response.status_code, response.text[:300]))

    def counted_5xx() -> list[str]:  # /metrics' 5xx series, with their counts
        return [line for line in httpx.get(f"{base}/metrics").text.splitlines()
                if line.startswith("graft_requests_total") and 'code="5' in line]

    before = counted_5xx()  # a readiness probe answered 503 while the model loaded is right, not the fuzz's doing
    deadline = time.monotonic() + FUZZ_SECONDS
    rounds = 0
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.monotonic() < deadline:
            seed(rounds)(one)()
            rounds += 1
            assert process.poll() is None, "the server died"
            assert httpx.get(f"{base}/v2/health/live", timeout=5).status_code == 200
    print(f"fuzz: {answered[0]} requests in {rounds} rounds of 200, {len(server_errors)} server errors")
    assert not server_errors, server_errors[:3]
    assert counted_5xx() == before, "a 5xx answered to a request the client did not see"


def test_idle_and_slow_connections_starve_nobody(fuzz_server):
    base, port, _ = fuzz_server
    crowd = []
    try:
        for i in range(150):  # idle sockets, and sockets that send half a request and stall
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\0" * 100)
            crowd.append(sock)
        started = time.monotonic()
        for _ in range(20):
            assert httpx.get(f"{base}/v2/models/{MODEL}", timeout=5).status_code == 200
        assert time.monotonic() - started < 10, "20 requests beside 150 stalled connections"
    finally:
        for sock in crowd:
            sock.close()
