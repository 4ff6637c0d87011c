"""Serving benchmark: the real server over HTTP on 127.0.0.1, with and without dynamic batching, JSON and binary;
and (--capture) what capturing every request costs.

    .venv/bin/python benchmarks/serve_benchmark.py --onnx models/model.onnx --seconds 10
    .venv/bin/python benchmarks/serve_benchmark.py --onnx models/model.onnx --capture --seconds 2 --rounds 16
    .venv/bin/python benchmarks/serve_benchmark.py --protocols binary grpc --threads 1 --seconds 10

For each setting it starts `python -m deploy.server --onnx-file ...` (serving.variant auto unless --variant),
drives it with C concurrent keep-alive connections sending V2 infer requests (one image each, as a JSON list or
with Triton's binary tensor extension) for a bounded time, and reports throughput and p50/p99 latency. It reads
the server's /metrics to split a request's time into model time and the rest, and measures the served file's
own in-process throughput at the batch size the server formed. Results go to benchmarks/results/serve.json.

--capture runs two servers side by side, capture off and capture on (serving.capture, sample 1.0), a fresh pair
each round, and drives them in turn (off then on, the next round on then off) so that host noise hits both: binary
V2 tensors and PNG uploads to /predict, each at c=1 and c=32. A capture-on run lasts until its last answer is on
disk (the writer's backlog is timed, not left to the next run). Results go to benchmarks/results/serve_capture.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import uvloop

from deploy.cpu import cpu_description
from deploy.variants import variant_path

MODEL = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary_infer_body(rows: np.ndarray) -> tuple[bytes, bytes]:
    """A V2 infer body under the binary tensor extension: (its JSON header, the header then the tensor's raw
    little-endian bytes); the answer is asked for binary too."""
    data = rows.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "pixels", "shape": list(rows.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(data)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header, header + data


def _request_bytes(port: int, rows: np.ndarray, binary: bool, model: str = MODEL) -> bytes:
    if binary:
        header, body = binary_infer_body(rows)
        extra = f"Inference-Header-Content-Length: {len(header)}\r\nContent-Type: application/octet-stream\r\n"
    else:
        tensor = {"name": "pixels", "shape": list(rows.shape), "datatype": "FP32"}
        body = json.dumps({"inputs": [{**tensor, "data": [round(float(v), 4) for v in rows.ravel()]}]}).encode()
        extra = "Content-Type: application/json\r\n"
    return _http_post(port, f"/v2/models/{model}/infer", extra, body)


def _http_post(port: int, path: str, headers: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _connection(port: int, request: bytes, deadline: float, limit: int, latencies: list[float], errors: list[int]) -> None:
    """One keep-alive connection sending requests back to back: a lean client, so the server is what is measured."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline and len(latencies) < limit:
            started = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            if b" 200 " not in status_line:
                errors.append(int(status_line.split()[1]))
            latencies.append(time.perf_counter() - started)
    finally:
        writer.close()


async def _drive(port: int, request: bytes, concurrency: int, seconds: float, limit: int) -> dict:
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_connection(port, request, deadline, limit, latencies, errors) for _ in range(concurrency)))
    return _load_summary(concurrency, latencies, errors, time.perf_counter() - started)


def _load_summary(concurrency: int, latencies: list[float], errors: list[int], elapsed: float) -> dict:
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 3),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
    }


async def _drive_grpc(port: int, rows: np.ndarray, concurrency: int, seconds: float, limit: int) -> dict:
    """The same load over gRPC (KServe V2, raw_input_contents): C callers on one channel, unary calls back to back."""
    from grpc import aio

    from deploy.v2_protocol import grpc_predict_v2_pb2 as pb
    from deploy.v2_protocol.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[rows.astype("<f4").tobytes()])
    request.inputs.add(name="pixels", datatype="FP32", shape=list(rows.shape))
    latencies: list[float] = []
    errors: list[int] = []
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        infer = GRPCInferenceServiceStub(channel).ModelInfer
        started = time.perf_counter()
        deadline = started + seconds

        async def caller() -> None:
            while time.perf_counter() < deadline and len(latencies) < limit:
                begun = time.perf_counter()
                try:
                    await infer(request)
                except aio.AioRpcError as error:
                    errors.append(error.code().value[0])
                latencies.append(time.perf_counter() - begun)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return _load_summary(concurrency, latencies, errors, time.perf_counter() - started)


def _metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_server(onnx: Path, variant: str, max_batch: int, delay_ms: float, threads: int,
                  *options: str) -> tuple[subprocess.Popen, int]:
    """`python -m deploy.server` on a free port, once it is ready: (the process, its port)."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "deploy.server", "--onnx-file", str(onnx), "--model", MODEL, "--port", str(port),
         "--providers", "cpu", "--variant", variant, "--max-batch-size", str(max_batch), "--max-queue-delay-ms",
         str(delay_ms), "--threads", str(threads), "--grpc-port", "0", *options],  # options' own --grpc-port wins
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return server, port


def _run_setting(onnx: Path, variant: str, protocol: str, max_batch: int, delay_ms: float, concurrency: int,
                 seconds: float, threads: int) -> dict:
    """One server, one load: protocol json | binary (HTTP) | grpc."""
    grpc_port = _free_port()
    server, port = _start_server(onnx, variant, max_batch, delay_ms, threads, "--grpc-port", str(grpc_port))
    try:
        base = f"http://127.0.0.1:{port}"
        served = httpx.get(f"{base}/v2/models/{MODEL}").json()
        rows = np.random.default_rng(0).normal(size=(1, *served["inputs"][0]["shape"][1:])).astype(np.float32)
        if protocol == "grpc":
            def drive(for_seconds: float, limit: int) -> dict:
                return asyncio.run(_drive_grpc(grpc_port, rows, concurrency, for_seconds, limit))
        else:
            request = _request_bytes(port, rows, protocol == "binary")

            def drive(for_seconds: float, limit: int) -> dict:
                return asyncio.run(_drive(port, request, concurrency, for_seconds, limit))
        drive(1.0, 10**6)  # warm-up, not counted
        before = httpx.get(f"{base}/metrics").text
        cpu_before = (_cpu_seconds(server.pid), time.process_time())
        result = drive(seconds, 200_000)
        server_cpu, client_cpu = _cpu_seconds(server.pid) - cpu_before[0], time.process_time() - cpu_before[1]
        after = httpx.get(f"{base}/metrics").text
    finally:
        server.terminate()
        server.wait(timeout=20)

    def delta(name: str) -> float:
        return _metric(after, name) - _metric(before, name)

    executions, inferences = delta("graft_executions_total"), delta("graft_inferences_total")
    model_seconds = delta("graft_model_execution_seconds_sum")
    server_seconds = delta(r"graft_request_latency_seconds_sum")
    model_threads = threads or os.cpu_count()  # ONNX Runtime's intra-op threads, each busy while the model runs
    result.update({
        "protocol": protocol, "variant": served["parameters"]["variant"],
        "max_batch_size": max_batch, "max_queue_delay_ms": delay_ms,
        "mean_batch_size": round(inferences / executions, 2) if executions else 0,
        # Of the time the server spent on requests (sum of per-request latencies inside the server),
        # the part that was not the model's own execution time (each batch's time shared by its rows).
        "model_ms_per_request": round(1000 * model_seconds / max(1, inferences), 4),
        "server_ms_per_request": round(1000 * server_seconds / max(1, result["requests"]), 4),
    })
    result["share_outside_model"] = round(1 - result["model_ms_per_request"] / result["server_ms_per_request"], 3)
    # CPU, not wall time, so that the load generator on the same cores does not blur it: the server process's CPU per
    # request beside the model's. With --threads 1 the model's CPU is measured (the thread that runs ONNX Runtime);
    # with more, its wall time inside ONNX Runtime times the threads, which counts time a thread waited for a core.
    measured_model_cpu = delta("graft_model_cpu_seconds_total")
    result["model_cpu_ms_per_request"] = round(1000 * measured_model_cpu / max(1, inferences), 4)
    model_cpu = measured_model_cpu if model_threads == 1 else model_seconds * model_threads
    result["server_cpu_ms_per_request"] = round(1000 * server_cpu / max(1, result["requests"]), 4)
    result["outside_model_cpu_ms_per_request"] = round(1000 * (server_cpu - model_cpu) / max(1, result["requests"]), 4)
    result["outside_over_model_cpu"] = round((server_cpu - model_cpu) / model_cpu, 3) if model_cpu else None
    # The load generator runs on the same cores: what each side used, as a share of all the cores' time.
    capacity = result["seconds"] * os.cpu_count()
    result["server_cpu_share"], result["client_cpu_share"] = round(server_cpu / capacity, 3), round(client_cpu / capacity, 3)
    return result


def in_process_images_per_s(path: Path, batch: int, threads: int) -> float:
    """The served file's own throughput in ONNX Runtime at one batch size: what the server could at best reach."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shape = [batch, *[d for d in session.get_inputs()[0].shape[1:]]]
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for _ in range(20):
        session.run(None, {"pixels": x})
    rates = []
    for _ in range(7):
        started, count = time.perf_counter(), 0
        while time.perf_counter() - started < 0.3:
            session.run(None, {"pixels": x})
            count += 1
        rates.append(count * batch / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


CAPTURE_CASES = (("binary", 1), ("binary", 32), ("png", 1), ("png", 32))  # (request kind, concurrency)


def _answers_accounted(port: int) -> float:
    """Answers the capture-on server has written or dropped so far."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return _metric(text, "graft_captured_total") + _metric(text, "graft_capture_dropped_total")


ROUND_METRICS = ("graft_capture_writer_cpu_seconds_total", "graft_executions_total", "graft_inferences_total",
                 "graft_model_execution_seconds_sum")


def _round_metrics(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {name: _metric(text, name) for name in ROUND_METRICS}


def _capture_round(server: subprocess.Popen, port: int, request: bytes, concurrency: int, seconds: float,
                   capturing: bool) -> dict:
    """One timed round. With capture on it waits, after the last answer, until every answer of the round is written
    (or dropped): the writer's backlog is drained inside the round, not in the next one. Its throughput is the
    answers over the time they were sent in; `with_drain_rps` counts the drain too (a one-off wait of up to the
    writer's gathering interval and one write, not a rate: over a longer run its share shrinks). Beside the server's
    CPU, the writer thread's and the model's own time a row (ONNX Runtime's wall time per execution over its rows):
    what capture costs the model itself."""
    before = _answers_accounted(port) if capturing else 0.0
    cpu_before, metrics_before = _cpu_seconds(server.pid), _round_metrics(port)
    started = time.perf_counter()
    result = asyncio.run(_drive(port, request, concurrency, seconds, 10**6))
    driven = time.perf_counter() - started
    while capturing and _answers_accounted(port) - before < result["requests"]:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    after = _round_metrics(port)
    delta = {name: after[name] - metrics_before[name] for name in ROUND_METRICS}
    result.update(with_drain_rps=round(result["requests"] / elapsed, 1), backlog_s=round(elapsed - driven, 3),
                  server_cpu_ms_per_request=round(1000 * (_cpu_seconds(server.pid) - cpu_before) / result["requests"], 4),
                  writer_cpu_ms_per_request=round(
                      1000 * delta["graft_capture_writer_cpu_seconds_total"] / result["requests"], 4),
                  model_ms_per_row=round(
                      1000 * delta["graft_model_execution_seconds_sum"] / delta["graft_inferences_total"], 4),
                  mean_batch_size=round(delta["graft_inferences_total"] / delta["graft_executions_total"], 2))
    return result


ROUND_PAUSE_SECONDS = 0.5


def start_capture_pair(onnx: Path, variant: str, max_batch: int, delay_ms: float, threads: int,
                       folder: str) -> dict[str, tuple[subprocess.Popen, int]]:
    """Two servers of the same file, "off" and "on" (capturing every answer to `folder`, no budget to reach)."""
    return {"off": _start_server(onnx, variant, max_batch, delay_ms, threads),
            "on": _start_server(onnx, variant, max_batch, delay_ms, threads, "--capture-enabled", "--capture-sample",
                                "1", "--capture-folder", folder, "--capture-max-bytes", str(10**12))}


def capture_cost(off: list[dict], on: list[dict]) -> tuple[float, float, list[float]]:
    """What capture cost over rounds of (off, on) runs: 1 - mean(on) / mean(off) of their throughputs, its standard
    error (the rounds' spread: the host's noise, to judge the cost by) and each round's own cost. Each round's off and
    on ran back to back, in turns first and second: over an even number of rounds the mean throughputs' ratio cancels
    what running second costs (the pairs' median does not: their costs fall in two groups by order)."""
    paired = [1 - b["throughput_rps"] / a["throughput_rps"] for a, b in zip(off, on)]
    mean_off, mean_on = (statistics.fmean(r["throughput_rps"] for r in runs) for runs in (off, on))
    return 1 - mean_on / mean_off, statistics.stdev(paired) / len(paired) ** 0.5, paired


def compare_capture(onnx: Path, variant: str, max_batch: int, delay_ms: float, threads: int, seconds: float,
                    rounds: int, png: Path, capture_parent: Path) -> dict:
    """Capture off and capture on (every request, to a fresh folder in `capture_parent`) side by side, in
    alternating rounds (off-on, on-off, ...): throughput, latency and server CPU of each, and what capture costs,
    per request kind and concurrency. Each round starts both servers afresh: a server keeps where the system put its
    threads for its life (run one at a time, a server's c=1 median latency sat near 1.0 or near 1.25 ms for its whole
    life, capture on or off): with one pair for the whole run that alone read as a cost of 15-20% or of -6%, so
    each round is a new pair, and the rounds average it out."""
    samples: dict[tuple[str, int, str], list[dict]] = {}
    captured = dropped = 0.0
    for round_ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="graft-capture-bench-", dir=capture_parent) as folder:
            servers = start_capture_pair(onnx, variant, max_batch, delay_ms, threads, folder)
            try:
                port_on = servers["on"][1]
                served = httpx.get(f"http://127.0.0.1:{port_on}/v2/models/{MODEL}").json()
                rows = np.random.default_rng(0).normal(size=(1, *served["inputs"][0]["shape"][1:])).astype(np.float32)
                requests = {(kind, name): _request_bytes(port, rows, binary=True) if kind == "binary" else
                            _http_post(port, "/predict", "Content-Type: image/png\r\n", png.read_bytes())
                            for name, (_, port) in servers.items() for kind in ("binary", "png")}
                for (kind, name), request in requests.items():  # warm-up, not counted
                    asyncio.run(_drive(servers[name][1], request, 32, 0.5, 10**6))
                for kind, concurrency in CAPTURE_CASES:
                    for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                        time.sleep(ROUND_PAUSE_SECONDS)  # the other server quiet again (ONNX Runtime's threads spin)
                        process, port = servers[name]
                        result = _capture_round(process, port, requests[kind, name], concurrency, seconds, name == "on")
                        samples.setdefault((kind, concurrency, name), []).append(result)
                        print(json.dumps({"round": round_, "kind": kind, "server": name, **result}), flush=True)
                metrics = httpx.get(f"http://127.0.0.1:{port_on}/metrics").text
                captured += _metric(metrics, "graft_captured_total")
                dropped += _metric(metrics, "graft_capture_dropped_total")
            finally:
                for process, _ in servers.values():
                    process.terminate()
                    process.wait(timeout=60)
    cases = []
    for kind, concurrency in CAPTURE_CASES:
        off, on = samples[kind, concurrency, "off"], samples[kind, concurrency, "on"]

        def median(runs: list[dict], key: str) -> float:
            return round(statistics.median(r[key] for r in runs), 4)

        cost, standard_error, paired = capture_cost(off, on)
        mean_off, mean_on = (statistics.fmean(r["throughput_rps"] for r in runs) for runs in (off, on))
        mean_on_with_drain = statistics.fmean(r["with_drain_rps"] for r in on)
        cases.append({
            "kind": kind, "concurrency": concurrency, "rounds": rounds,
            "off_rps": round(mean_off, 1), "on_rps": round(mean_on, 1),
            "cost": round(cost, 4), "cost_by_round": [round(c, 4) for c in paired],
            "cost_with_drain": round(1 - mean_on_with_drain / mean_off, 4),
            "cost_median_of_rounds": round(statistics.median(paired), 4),
            "cost_standard_error": round(standard_error, 4),
            "off_p50_ms": median(off, "p50_ms"), "on_p50_ms": median(on, "p50_ms"),
            "off_p99_ms": median(off, "p99_ms"), "on_p99_ms": median(on, "p99_ms"),
            "off_server_cpu_ms": median(off, "server_cpu_ms_per_request"),
            "on_server_cpu_ms": median(on, "server_cpu_ms_per_request"),
            "on_writer_cpu_ms": median(on, "writer_cpu_ms_per_request"),
            "off_model_ms_per_row": median(off, "model_ms_per_row"), "on_model_ms_per_row": median(on, "model_ms_per_row"),
            "off_mean_batch_size": median(off, "mean_batch_size"), "on_mean_batch_size": median(on, "mean_batch_size"),
            # the writer thread's CPU against all the CPU a request had (both cores, the load generator's too)
            "writer_cpu_share": round(statistics.fmean(r["writer_cpu_ms_per_request"] for r in on)
                                      / (1000 * os.cpu_count() / mean_on), 4),
            "on_backlog_s": median(on, "backlog_s"), "errors": sum(r["errors"] for r in off + on),
        })
    return {"cpu": cpu_description(), "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
            "variant": served["parameters"]["variant"], "input_shape": served["inputs"][0]["shape"][1:],
            "png_bytes": png.stat().st_size, "seconds_per_round": seconds, "cases": cases,
            "captured": captured, "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the batched setting's max batch size")
    parser.add_argument("--max-queue-delay-ms", type=float, default=0.0, help="the batched setting's queue delay")
    parser.add_argument("--variant", default="auto", help="the export variant the server runs (auto: as it would choose)")
    parser.add_argument("--protocols", nargs="+", choices=["json", "binary", "grpc"],
                        help="only the batched settings of these protocols, at c=1 and c=32 (with --threads 1: the "
                             "server's CPU outside the model, exactly)")
    parser.add_argument("--capture", action="store_true", help="capture off against capture on, side by side")
    parser.add_argument("--rounds", type=int, default=4, help="--capture: alternating rounds per case")
    parser.add_argument("--png", type=Path, default=Path("data/raw/animal-mnist/bear/00000.png"),
                        help="--capture: the image uploaded to /predict")
    parser.add_argument("--capture-parent", type=Path, default=Path("."),
                        help="--capture: where the capture folder is made (default: here, where serving.capture.folder "
                             "captures/ would be); removed afterwards")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/serve.json (serve_capture.json with "
                                                 "--capture)")
    args = parser.parse_args()
    uvloop.install()  # a lean load generator: it shares the cores with the server it measures
    if args.capture:
        summary = compare_capture(args.onnx, args.variant, args.max_batch_size, args.max_queue_delay_ms, args.threads,
                                  args.seconds, args.rounds, args.png, args.capture_parent)
        out = args.out or Path("benchmarks/results/serve_capture.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        for case in summary["cases"]:
            print(f"{case['kind']} c={case['concurrency']}: {case['off_rps']} -> {case['on_rps']} req/s with capture, "
                  f"cost {case['cost']:.1%} +- {case['cost_standard_error']:.1%} ({case['cost_with_drain']:.1%} with "
                  f"the drain of the last batch), the writer's CPU "
                  f"{case['writer_cpu_share']:.1%} of the machine's per request, the model "
                  f"{1000 * case['off_model_ms_per_row']:.0f} -> {1000 * case['on_model_ms_per_row']:.0f} us a row")
        print(f"captured {summary['captured']:.0f}, dropped {summary['dropped']:.0f}")
        return
    batched = (args.max_batch_size, args.max_queue_delay_ms)
    settings = [("json", 1, 0.0, 1), ("binary", 1, 0.0, 1), ("binary", 1, 0.0, 32), ("binary", *batched, 1),
                ("binary", *batched, 32), ("json", *batched, 32), ("grpc", *batched, 1), ("grpc", *batched, 32)]
    if args.protocols:
        settings = [s for s in settings if s[0] in args.protocols and s[1] > 1]
    runs = []
    for protocol, max_batch, delay, concurrency in settings:
        result = _run_setting(args.onnx, args.variant, protocol, max_batch, delay, concurrency, args.seconds, args.threads)
        if max_batch > 1 and concurrency > 1:  # the model alone, at the batch size this server formed
            served_file = variant_path(args.onnx, result["variant"])
            formed = max(1, round(result["mean_batch_size"]))
            result["in_process_images_per_s_at_formed_batch"] = in_process_images_per_s(served_file, formed, args.threads)
            result["share_of_in_process"] = round(result["throughput_rps"] / result["in_process_images_per_s_at_formed_batch"], 3)
            # In-process had every core; the server had what the load generator left it.
            result["share_of_in_process_per_core_used"] = round(result["share_of_in_process"] / result["server_cpu_share"], 3)
        runs.append(result)
        print(json.dumps(result), flush=True)
    summary = {"cpu": cpu_description(), "runs": runs}
    if args.protocols:  # the batched settings of those protocols only (the CPU split at c=1 and c=32)
        out = args.out or Path("benchmarks/results/serve_cpu.json")
        out.write_text(json.dumps(summary, indent=2) + "\n")
        return
    unbatched32 = next(r for r in runs if r["max_batch_size"] == 1 and r["concurrency"] == 32)
    batched32 = next(r for r in runs if r["max_batch_size"] > 1 and r["concurrency"] == 32 and r["protocol"] == "binary")
    summary["batched_over_unbatched_at_32"] = round(batched32["throughput_rps"] / unbatched32["throughput_rps"], 2)
    out = args.out or Path("benchmarks/results/serve.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"dynamic batching at concurrency 32: {summary['batched_over_unbatched_at_32']}x the unbatched throughput; "
          f"{batched32['share_of_in_process']:.0%} of the model's in-process throughput at batch "
          f"{batched32['mean_batch_size']}")


if __name__ == "__main__":
    main()
