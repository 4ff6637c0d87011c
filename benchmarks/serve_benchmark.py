"""Serving benchmark: the real server over HTTP on 127.0.0.1, with and without dynamic batching.

    .venv/bin/python benchmarks/serve_benchmark.py --onnx models/model.onnx --seconds 10

For each setting it starts `python -m deploy.server --onnx-file ...`, drives it with C concurrent keep-alive
connections sending V2 infer requests (one image each) for a bounded time, and reports throughput and
p50/p99 latency. It reads the server's /metrics to split a request's time into model time and the rest.
It also measures the ceiling the model itself allows (ONNX Runtime batch 64 vs batch 1) and ONNX Runtime
against PyTorch eager on the same model and batch. Results go to benchmarks/results/serve.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

MODEL = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request_bytes(port: int, rows: np.ndarray) -> bytes:
    body = json.dumps({"inputs": [{"name": "pixels", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": [round(float(v), 4) for v in rows.ravel()]}]}).encode()
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
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


def _run_setting(onnx: Path, max_batch: int, delay_ms: float, concurrency: int, seconds: float, threads: int) -> dict:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "deploy.server", "--onnx-file", str(onnx), "--model", MODEL, "--port", str(port),
         "--providers", "cpu", "--max-batch-size", str(max_batch), "--max-queue-delay-ms", str(delay_ms),
         "--threads", str(threads)],
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
        rows = np.random.default_rng(0).normal(size=(1, 1, 28, 28)).astype(np.float32)
        request = _request_bytes(port, rows)
        asyncio.run(_drive(port, request, concurrency, 1.0, 10**6))  # warm-up, not counted
        before = httpx.get(f"{base}/metrics").text
        result = asyncio.run(_drive(port, request, concurrency, seconds, 200_000))
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
        "max_batch_size": max_batch, "max_queue_delay_ms": delay_ms,
        "mean_batch_size": round(inferences / executions, 2) if executions else 0,
        # Of the time the server spent on requests (sum of per-request latencies inside the server),
        # the part that was not the model's own execution time (each batch's time shared by its rows).
        "model_ms_per_request": round(1000 * model_seconds / max(1, inferences), 4),
        "server_ms_per_request": round(1000 * server_seconds / max(1, result["requests"]), 4),
    })
    result["share_outside_model"] = round(1 - result["model_ms_per_request"] / result["server_ms_per_request"], 3)
    return result


def model_ceiling(onnx: Path, threads: int) -> dict:
    """Images/s of ONNX Runtime and PyTorch eager on the same model, batch 1 and 64, in-process."""
    import onnxruntime as ort
    import torch

    from components.model import load_checkpoint

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    model, _ = load_checkpoint(onnx.with_name("transfer.pt"))
    results = {}
    for batch in (1, 64):
        x = np.random.default_rng(0).normal(size=(batch, 1, 28, 28)).astype(np.float32)
        for name, run in (("onnxruntime", lambda: session.run(None, {"pixels": x})),
                          ("pytorch_eager", lambda: model(torch.from_numpy(x)))):
            with torch.inference_mode():
                for _ in range(20):
                    run()
                timings = []
                for _ in range(7):
                    started, count = time.perf_counter(), 0
                    while time.perf_counter() - started < 0.3:
                        run()
                        count += 1
                    timings.append(count * batch / (time.perf_counter() - started))
            results[f"{name}_batch{batch}_images_per_s"] = round(statistics.median(timings), 1)
    results["onnxruntime_batch64_over_batch1"] = round(results["onnxruntime_batch64_images_per_s"] / results["onnxruntime_batch1_images_per_s"], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the batched setting's max batch size")
    parser.add_argument("--max-queue-delay-ms", type=float, default=0.0, help="the batched setting's queue delay")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve.json"))
    args = parser.parse_args()
    batched = (args.max_batch_size, args.max_queue_delay_ms)
    settings = [(1, 0.0, 1), (1, 0.0, 32), (*batched, 1), (*batched, 32)]
    runs = []
    for max_batch, delay, concurrency in settings:
        result = _run_setting(args.onnx, max_batch, delay, concurrency, args.seconds, args.threads)
        runs.append(result)
        print(json.dumps(result))
    ceiling = model_ceiling(args.onnx, args.threads)
    print(json.dumps(ceiling))
    unbatched32 = next(r for r in runs if r["max_batch_size"] == 1 and r["concurrency"] == 32)
    batched32 = next(r for r in runs if r["max_batch_size"] > 1 and r["concurrency"] == 32)
    summary = {"runs": runs, "model": ceiling,
               "batched_over_unbatched_at_32": round(batched32["throughput_rps"] / unbatched32["throughput_rps"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"dynamic batching at concurrency 32: {summary['batched_over_unbatched_at_32']}x the unbatched throughput; "
          f"model ceiling (ORT batch 64 vs 1): {ceiling['onnxruntime_batch64_over_batch1']}x")


if __name__ == "__main__":
    main()
