"""Where capture's cost lands inside the server: each thread's CPU a request, capture off against capture on.

    .venv/bin/python benchmarks/capture_threads.py --rounds 8 --seconds 4     # after a `graft run`; ~2.5 min

Binary V2 tensors at c=32 (the case where capture costs most), a fresh pair of servers each round, driven in turn
as serve_benchmark.py --capture drives them (a capture-on run lasts until its last answer is on disk). Threads have no names the system can see, so each server's
threads are ranked by the CPU they used in the run ("main" is the event loop's, rank01 the busiest other, ...) and the
ranks averaged over rounds. Beside them: the mean batch and the model's time a row (ONNX Runtime's per execution, over
its rows), and the throughput cost with its standard error.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from deploy.cpu import cpu_description
from serve_benchmark import (  # this folder
    MODEL, ROUND_PAUSE_SECONDS, _capture_round, _drive, _request_bytes, capture_cost, start_capture_pair)

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[str, tuple[float, float]]:
    """Each live thread's (user, system) CPU seconds so far, by thread id ("main": the process's first thread)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        threads["main" if task.name == str(pid) else task.name] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
    return threads


def ranked(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The run's CPU of each thread as "<rank>:user" and "<rank>:system", the threads ranked by their total."""
    used = {tid: [a - b for a, b in zip(after[tid], before.get(tid, (0.0, 0.0)))] for tid in after}
    others = sorted((tid for tid in used if tid != "main"), key=lambda tid: -sum(used[tid]))
    names = {"main": "main", **{tid: f"rank{number:02d}" for number, tid in enumerate(others, 1)}}
    return {f"{names[tid]}:{kind}": value for tid, cpu in used.items() for kind, value in zip(("user", "system"), cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    cpu = {"off": collections.Counter(), "on": collections.Counter()}
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="graft-capture-threads-", dir=".") as folder:
            servers = start_capture_pair(args.onnx, "auto", 32, 0.0, 0, folder)
            try:
                shape = httpx.get(f"http://127.0.0.1:{servers['on'][1]}/v2/models/{MODEL}").json()["inputs"][0]["shape"]
                rows = np.random.default_rng(0).normal(size=(1, *shape[1:])).astype(np.float32)
                for name in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                    process, port = servers[name]
                    request = _request_bytes(port, rows, binary=True)
                    asyncio.run(_drive(port, request, 32, 1.0, 10**6))  # warm-up, not counted
                    time.sleep(ROUND_PAUSE_SECONDS)
                    threads = thread_cpu(process.pid)
                    result = _capture_round(process, port, request, 32, args.seconds, name == "on")
                    cpu[name].update({key: value / result["requests"]
                                      for key, value in ranked(threads, thread_cpu(process.pid)).items()})
                    runs[name].append(result)
                    print(f"round {round_} capture {name}: {result['throughput_rps']} req/s", flush=True)
            finally:
                for process, _ in servers.values():
                    process.terminate()
                    process.wait(timeout=60)
    print(f"{cpu_description()}; binary tensors, c=32, {args.rounds} rounds of {args.seconds} s")
    print(f"{'thread:CPU':18s} {'off us/req':>10s} {'on us/req':>10s} {'on - off':>9s}")
    for key in sorted(set(cpu["off"]) | set(cpu["on"])):
        off, on = (1e6 * cpu[name][key] / args.rounds for name in ("off", "on"))
        if max(off, on) >= 0.5:
            print(f"{key:18s} {off:10.1f} {on:10.1f} {on - off:9.1f}")
    off, on = (1e6 * sum(cpu[name].values()) / args.rounds for name in ("off", "on"))
    print(f"{'all':18s} {off:10.1f} {on:10.1f} {on - off:9.1f}")
    for name in ("off", "on"):
        print(f"capture {name}: mean batch {statistics.fmean(r['mean_batch_size'] for r in runs[name]):.2f}, the model "
              f"{1000 * statistics.fmean(r['model_ms_per_row'] for r in runs[name]):.0f} us a row")
    cost, standard_error, paired = capture_cost(runs["off"], runs["on"])
    print(f"cost {cost:.1%} +- {standard_error:.1%} (rounds: {', '.join(f'{c:.1%}' for c in paired)})")


if __name__ == "__main__":
    main()
