"""Serving benchmark: the real server over HTTP on 127.0.0.1, with and without dynamic batching, JSON and binary.

    .venv/bin/python benchmarks/serve_benchmark.py --onnx models/model.onnx --seconds 10

For each setting it starts `python -m deploy.server --onnx-file ...` (serving.variant auto unless --variant),
drives it with C concurrent keep-alive connections sending V2 infer requests (one image each, as a JSON list or
with Triton's binary tensor extension) for a bounded time, and reports throughput and p50/p99 latency. It reads
the server's /metrics to split a request's time into model time and the rest, and measures the served file's
own in-process throughput at the batch size the server formed. Results go to benchmarks/results/serve.json.
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
import time
from pathlib import Path

import httpx
import numpy as np
import uvloop

from components.compute import cpu_model
from deploy.variants import variant_path

MODEL = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request_bytes(port: int, rows: np.ndarray, binary: bool) -> bytes:
    tensor = {"name": "pixels", "shape": list(rows.shape), "datatype": "FP32"}
    if binary:  # the JSON header, then the tensor's raw little-endian bytes; the answer comes back binary too
        data = rows.astype("<f4").tobytes()
        header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(data)}}],
                             "parameters": {"binary_data_output": True}}).encode()
        body, extra = header + data, f"Inference-Header-Content-Length: {len(header)}\r\nContent-Type: application/octet-stream\r\n"
    else:
        body = json.dumps({"inputs": [{**tensor, "data": [round(float(v), 4) for v in rows.ravel()]}]}).encode()
        extra = "Content-Type: application/json\r\n"
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
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
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "seconds": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * ordered[len(ordered) // 2], 3),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
    }


def _metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_setting(onnx: Path, variant: str, binary: bool, max_batch: int, delay_ms: float, concurrency: int,
                 seconds: float, threads: int) -> dict:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "deploy.server", "--onnx-file", str(onnx), "--model", MODEL, "--port", str(port),
         "--providers", "cpu", "--variant", variant, "--max-batch-size", str(max_batch), "--max-queue-delay-ms",
         str(delay_ms), "--threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        served = httpx.get(f"{base}/v2/models/{MODEL}").json()
        rows = np.random.default_rng(0).normal(size=(1, *served["inputs"][0]["shape"][1:])).astype(np.float32)
        request = _request_bytes(port, rows, binary)
        asyncio.run(_drive(port, request, concurrency, 1.0, 10**6))  # warm-up, not counted
        before = httpx.get(f"{base}/metrics").text
        cpu_before = (_cpu_seconds(server.pid), time.process_time())
        result = asyncio.run(_drive(port, request, concurrency, seconds, 200_000))
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
    result.update({
        "protocol": "binary" if binary else "json", "variant": served["parameters"]["variant"],
        "max_batch_size": max_batch, "max_queue_delay_ms": delay_ms,
        "mean_batch_size": round(inferences / executions, 2) if executions else 0,
        # Of the time the server spent on requests (sum of per-request latencies inside the server),
        # the part that was not the model's own execution time (each batch's time shared by its rows).
        "model_ms_per_request": round(1000 * model_seconds / max(1, inferences), 4),
        "server_ms_per_request": round(1000 * server_seconds / max(1, result["requests"]), 4),
    })
    result["share_outside_model"] = round(1 - result["model_ms_per_request"] / result["server_ms_per_request"], 3)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the batched setting's max batch size")
    parser.add_argument("--max-queue-delay-ms", type=float, default=0.0, help="the batched setting's queue delay")
    parser.add_argument("--variant", default="auto", help="the export variant the server runs (auto: as it would choose)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = parser.parse_args()
    uvloop.install()  # a lean load generator: it shares the cores with the server it measures
    batched = (args.max_batch_size, args.max_queue_delay_ms)
    settings = [(False, 1, 0.0, 1), (True, 1, 0.0, 1), (True, 1, 0.0, 32), (True, *batched, 1), (True, *batched, 32),
                (False, *batched, 32)]
    runs = []
    for binary, max_batch, delay, concurrency in settings:
        result = _run_setting(args.onnx, args.variant, binary, max_batch, delay, concurrency, args.seconds, args.threads)
        if max_batch > 1 and concurrency > 1:  # the model alone, at the batch size this server formed
            served_file = variant_path(args.onnx, result["variant"])
            formed = max(1, round(result["mean_batch_size"]))
            result["in_process_images_per_s_at_formed_batch"] = in_process_images_per_s(served_file, formed, args.threads)
            result["share_of_in_process"] = round(result["throughput_rps"] / result["in_process_images_per_s_at_formed_batch"], 3)
            # In-process had every core; the server had what the load generator left it.
            result["share_of_in_process_per_core_used"] = round(result["share_of_in_process"] / result["server_cpu_share"], 3)
        runs.append(result)
        print(json.dumps(result), flush=True)
    summary = {"cpu": cpu_model(), "runs": runs}
    unbatched32 = next(r for r in runs if r["max_batch_size"] == 1 and r["concurrency"] == 32)
    batched32 = next(r for r in runs if r["max_batch_size"] > 1 and r["concurrency"] == 32 and r["protocol"] == "binary")
    summary["batched_over_unbatched_at_32"] = round(batched32["throughput_rps"] / unbatched32["throughput_rps"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"dynamic batching at concurrency 32: {summary['batched_over_unbatched_at_32']}x the unbatched throughput; "
          f"{batched32['share_of_in_process']:.0%} of the model's in-process throughput at batch "
          f"{batched32['mean_batch_size']}")


if __name__ == "__main__":
    main()
