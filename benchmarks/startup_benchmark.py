"""Orchestration and start-up costs on this machine: `graft --help`, a registry command (`graft history`, reading the
store, then from its cache), an unchanged `graft run`, and `graft serve` from launch to ready (the champion loaded
and warm), each repeated; medians, beside the time this Python takes to import torch and mlflow in the same run (the
reference: these machines' speed varies by day).

    .venv/bin/python benchmarks/startup_benchmark.py        # after a `graft run`: a champion and an up-to-date project

Results: benchmarks/results/startup.json.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from components.layout import Layout
from deploy.cpu import cpu_description

GRAFT = str(Path(sys.executable).parent / "graft")


def _seconds(*args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([GRAFT, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"graft {' '.join(args)} failed: {done.stdout[-500:]}{done.stderr[-500:]}")
    return elapsed


def _python_seconds(code: str) -> float:
    """The reference: this Python importing a library, timed in the same run (these machines' speed varies)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def _serve_to_ready() -> tuple[float, float]:
    """Seconds from launching `graft serve` to /v2/health/live, and to /v2/health/ready."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.perf_counter()
    server = subprocess.Popen([GRAFT, "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    live = None
    try:
        while time.perf_counter() - started < 120:
            try:
                if live is None and httpx.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=1).status_code == 200:
                    live = time.perf_counter() - started
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    return live, time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        raise SystemExit("graft serve was not ready within 120 s")
    finally:
        server.terminate()
        server.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/startup.json"))
    args = parser.parse_args()
    timings: dict[str, list[float]] = {"reference: python -c 'import torch'": [], "reference: python -c 'import mlflow'": [],
                                       "graft --help": [], "graft history (reads the store)": [],
                                       "graft history (repeated: its cache)": [], "graft run (unchanged)": [],
                                       "graft serve: live": [], "graft serve: ready": []}
    for _ in range(args.repeats):
        timings["reference: python -c 'import torch'"].append(_python_seconds("import torch"))
        timings["reference: python -c 'import mlflow'"].append(_python_seconds("import mlflow"))
        timings["graft --help"].append(_seconds("--help"))
        Layout.history_cache.unlink(missing_ok=True)  # as after any write to the store
        timings["graft history (reads the store)"].append(_seconds("history"))
        timings["graft history (repeated: its cache)"].append(_seconds("history"))
        timings["graft run (unchanged)"].append(_seconds("run"))
        live, ready = _serve_to_ready()
        timings["graft serve: live"].append(live)
        timings["graft serve: ready"].append(ready)
    result = {"cpu": cpu_description(), "median_seconds": {k: round(statistics.median(v), 2) for k, v in timings.items()},
              "all_seconds": {k: [round(x, 2) for x in v] for k, v in timings.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_seconds"], indent=2))


if __name__ == "__main__":
    main()
