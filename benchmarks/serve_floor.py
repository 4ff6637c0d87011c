"""The floor under the server's own CPU per request: the same web stacks as `graft serve` with nothing of Graft's
in them, driven by serve_benchmark.py's own load generators with the same request (one FP32 image of the default `graft
run`'s model, 1x64x64, unless --shape).

    .venv/bin/python benchmarks/serve_floor.py      # 30 s

- http: uvicorn with uvloop and httptools (as deploy/server.py runs it) and a bare ASGI application that reads the
  body and answers a fixed V2 JSON answer, over keep-alive connections with Triton's binary tensor header.
- grpc: a grpc.aio server with the KServe V2 servicer (deploy/v2_protocol) whose ModelInfer answers a fixed
  response, over one channel with C callers (raw_input_contents).

What each costs in the server process's CPU a request, at c=1 and c=32, is what any handler on that stack pays
before its own work: set beside serve_benchmark.py's "outside the model" figures.

- graft (not by default): the other side, Graft's own work without the web server: deploy/server.py's application
  (the Guard outermost) serving --onnx like `python -m deploy.server --threads 1`, called in this process with 32
  binary V2 infer requests at a time as plain ASGI calls, no sockets; its CPU a request, less the model's (the
  thread that runs ONNX Runtime). --profile prints cProfile's top functions of it.

Results go to benchmarks/results/serve_floor.json.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop

from deploy.cpu import cpu_description
from serve_benchmark import MODEL, _cpu_seconds, _drive, _drive_grpc, _free_port, _request_bytes, binary_infer_body

ANSWER = json.dumps({"model_name": MODEL, "model_version": "1", "id": "", "outputs": [
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


def measure(stack: str, shape: tuple[int, ...], seconds: float) -> list[dict]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", stack, str(port)])
    rows = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    if stack == "grpc":
        def drive(concurrency: int, for_seconds: float) -> dict:
            return asyncio.run(_drive_grpc(port, rows, concurrency, for_seconds, 10**7))
    else:
        request = _request_bytes(port, rows, binary=True)

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


def graft_in_process(onnx: Path, rounds: int, profile: bool) -> dict:
    """Graft's application called directly: 32 binary V2 infer requests at a time, `rounds` times after a warm-up."""
    from deploy import server as graft

    options = graft.argument_parser().parse_args(["--onnx-file", str(onnx), "--model", MODEL, "--providers", "cpu",
                                                  "--threads", "1", "--grpc-port", "0"])
    serving = graft.serving_from(options, environ={})
    cache = tempfile.mkdtemp(prefix="serve-floor-")
    settings = graft.ServerSettings(serving=serving, model_name=MODEL, cache_dir=cache, token="")
    app = graft.create_app(graft.build_source(None, MODEL, serving.alias, str(onnx), cache), settings)
    server = app.app.state.server
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": f"/v2/models/{MODEL}/infer", "raw_path": f"/v2/models/{MODEL}/infer".encode(),
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    body = b""  # set once the model is loaded: its input shape

    async def request() -> None:
        delivered, statuses = False, []

        async def receive() -> dict:
            nonlocal delivered
            if delivered:  # nothing more comes: as a client that waits for its answer
                await asyncio.Event().wait()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
        await app(dict(scope), receive, send)
        if statuses != [200]:
            raise SystemExit(f"the application answered {statuses}")

    def model_cpu_seconds() -> float:
        return server.metrics.registry.get_sample_value("graft_model_cpu_seconds_total")

    async def run() -> dict:
        startup, started = asyncio.Queue(), asyncio.Queue()
        startup.put_nowait({"type": "lifespan.startup"})
        lifespan = asyncio.get_running_loop().create_task(
            app({"type": "lifespan", "asgi": {"version": "3.0"}}, startup.get, started.put))
        await started.get()
        while not server.ready:
            await asyncio.sleep(0.05)
        nonlocal body
        rows = np.random.default_rng(0).normal(size=(1, *server.served.model.contract.shape)).astype(np.float32)
        header, body = binary_infer_body(rows)
        scope["headers"] = [(b"host", b"127.0.0.1"), (b"content-type", b"application/octet-stream"),
                            (b"inference-header-content-length", str(len(header)).encode()),
                            (b"content-length", str(len(body)).encode())]
        for _ in range(20):
            await asyncio.gather(*(request() for _ in range(32)))
        profiler = cProfile.Profile() if profile else None
        cpu, model = time.process_time(), model_cpu_seconds()
        if profiler:
            profiler.enable()
        for _ in range(rounds):
            await asyncio.gather(*(request() for _ in range(32)))
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        cpu, model = time.process_time() - cpu, model_cpu_seconds() - model
        lifespan.cancel()
        count = 32 * rounds
        return {"stack": "graft", "concurrency": 32, "requests": count, "profiled": profile,
                "process_cpu_us_per_request": round(1e6 * cpu / count, 1),
                "model_cpu_us_per_request": round(1e6 * model / count, 1),
                "outside_model_cpu_us_per_request": round(1e6 * (cpu - model) / count, 1)}

    result = uvloop.run(run())
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 1, 64, 64], help="the request's tensor")
    parser.add_argument("--stacks", nargs="+", choices=["http", "grpc", "graft"], default=["http", "grpc"])
    parser.add_argument("--onnx", type=Path, default=Path("models/model.onnx"), help="graft: the file it serves")
    parser.add_argument("--rounds", type=int, default=300, help="graft: rounds of 32 requests")
    parser.add_argument("--profile", action="store_true", help="graft: print cProfile's top functions")
    parser.add_argument("--serve", nargs=2, metavar=("STACK", "PORT"), help=argparse.SUPPRESS)  # the server's own process
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_floor.json"))
    args = parser.parse_args()
    if args.serve:
        (serve_http if args.serve[0] == "http" else serve_grpc)(int(args.serve[1]))
        return
    uvloop.install()
    runs = []
    for stack in args.stacks:
        runs += ([graft_in_process(args.onnx, args.rounds, args.profile)] if stack == "graft"
                 else measure(stack, tuple(args.shape), args.seconds))
    args.out.write_text(json.dumps({"cpu": cpu_description(), "shape": args.shape, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
