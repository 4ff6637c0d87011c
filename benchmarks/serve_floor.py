"""The floor under the server's own CPU per request: the same web stacks as `graft serve` with nothing of Graft's
in them, driven by serve_benchmark.py's own load generators with the same request (one 3x64x64 FP32 image).

    .venv/bin/python benchmarks/serve_floor.py      # 30 s

- http: uvicorn with uvloop and httptools (as deploy/server.py runs it) and a bare ASGI application that reads the
  body and answers a fixed V2 JSON answer, over keep-alive connections with Triton's binary tensor header.
- grpc: a grpc.aio server with the KServe V2 servicer (deploy/v2_protocol) whose ModelInfer answers a fixed
  response, over one channel with C callers (raw_input_contents).

What each costs in the server process's CPU a request, at c=1 and c=32, is what any handler on that stack pays
before its own work: set beside serve_benchmark.py's "outside the model" figures. Results go to
benchmarks/results/serve_floor.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import uvloop

from components.compute import cpu_description
from serve_benchmark import _cpu_seconds, _drive, _drive_grpc, _free_port, _http_post

SHAPE = (1, 3, 64, 64)
ANSWER = json.dumps({"model_name": "bench", "model_version": "1", "id": "", "outputs": [
    {"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": [0.1] * 10}]}).encode()


def serve_http(port: int) -> None:
    import uvicorn

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]})
        await send({"type": "http.response.body", "body": ANSWER})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


def serve_grpc(port: int) -> None:
    from grpc import aio

    from deploy.v2_protocol import grpc_predict_v2_pb2 as pb
    from deploy.v2_protocol.grpc_predict_v2_pb2_grpc import (
        GRPCInferenceServiceServicer,
        add_GRPCInferenceServiceServicer_to_server,
    )
    logits = np.zeros((1, 10), "<f4").tobytes()

    class Fixed(GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            output = pb.ModelInferResponse.InferOutputTensor(name="logits", datatype="FP32", shape=[1, 10])
            return pb.ModelInferResponse(model_name=request.model_name, outputs=[output], raw_output_contents=[logits])

    async def main() -> None:
        server = aio.server()
        add_GRPCInferenceServiceServicer_to_server(Fixed(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(main())


def measure(stack: str, seconds: float) -> list[dict]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", stack, str(port)])
    rows = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    if stack == "grpc":
        def drive(concurrency: int, for_seconds: float) -> dict:
            return asyncio.run(_drive_grpc(port, rows, concurrency, for_seconds, 10**7))
    else:
        data = rows.astype("<f4").tobytes()
        header = json.dumps({"inputs": [{"name": "pixels", "shape": list(SHAPE), "datatype": "FP32",
                                         "parameters": {"binary_data_size": len(data)}}]}).encode()
        request = _http_post(port, "/v2/models/bench/infer", f"Inference-Header-Content-Length: {len(header)}\r\n"
                             "Content-Type: application/octet-stream\r\n", header + data)

        def drive(concurrency: int, for_seconds: float) -> dict:
            return asyncio.run(_drive(port, request, concurrency, for_seconds, 10**7))
    try:
        for _ in range(100):  # until it answers
            try:
                if not drive(1, 0.05)["errors"]:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        results = []
        for concurrency in (1, 32):
            drive(concurrency, 1.0)  # warm-up, not counted
            cpu_before = _cpu_seconds(server.pid)
            result = drive(concurrency, seconds)
            result["server_cpu_us_per_request"] = round(1e6 * (_cpu_seconds(server.pid) - cpu_before) / max(1, result["requests"]), 1)
            results.append({"stack": stack, **result})
            print(json.dumps(results[-1]), flush=True)
        return results
    finally:
        server.terminate()
        server.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--stacks", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    parser.add_argument("--serve", nargs=2, metavar=("STACK", "PORT"), help=argparse.SUPPRESS)  # the server's own process
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_floor.json"))
    args = parser.parse_args()
    if args.serve:
        (serve_http if args.serve[0] == "http" else serve_grpc)(int(args.serve[1]))
        return
    uvloop.install()
    runs = [run for stack in args.stacks for run in measure(stack, args.seconds)]
    args.out.write_text(json.dumps({"cpu": cpu_description(), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
