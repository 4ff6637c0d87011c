"""Does writing capture's files slow ONNX Runtime down beyond the CPU the writing takes? The model alone, against the
model beside a process that writes files as the capture writer does, against the model beside a process that burns
the same CPU without touching a file.

    .venv/bin/python benchmarks/capture_interference.py --onnx models/model.onnx     # ~3 min
    .venv/bin/python benchmarks/capture_interference.py --rounds 4 --threads 1       # one ONNX Runtime thread
    .venv/bin/python benchmarks/capture_interference.py --rounds 4 --config session.intra_op.allow_spinning=0

The model (`--onnx`, ONNX Runtime on CPU, its default threads: as `graft serve` runs it) runs batches of `--batch`
rows back to back for `--seconds`, in this process; beside it, in a child process, one neighbour:
- `idle`: none;
- `files`: deploy/capture.py's writing at the rate of binary tensors at c=32 (about 1,800 items a second): every 50 ms
  a batch of 90 items (a 1x64x64 float32 row with its .npy header and 1,280 float32 features, 21.6 kB) as two files,
  its writeback begun and its pages dropped a batch later (`posix_fadvise(DONTNEED)`);
- `cpu`: every 50 ms, a busy loop as long as the `files` neighbour's CPU a batch in the round before (no file, no
  system call): the same CPU share, spent in user space.
Rounds take the neighbours in turn (idle, files, cpu; then files, cpu, idle), and the model's rows a second are
compared with `idle`'s of the same round: mean ± standard error over rounds. The neighbour's CPU (user, system) is its
own process's, from when it is ready: its start-up (Python importing its modules) is over before the model's time is
taken (counted, it slowed the model by 14% and looked like interference).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from capture_page_cache import GATHER_SECONDS, batch_inputs, write_batch  # this folder: the writer's way, stated once
from deploy.cpu import cpu_description

ITEMS = 90  # a batch of binary tensors at c=32: about 1,800 answers a second, 50 ms apart


def _write_files(folder: str, ready: multiprocessing.Event, stop: multiprocessing.Event, cpu: multiprocessing.Value) -> None:
    ready.set()
    inputs = batch_inputs("tensor", ITEMS)
    settling, batch, started = [], 0, os.times()
    while not stop.is_set():
        settling, batch = write_batch(folder, batch, inputs, ITEMS, settling, drop=True), batch + 1
        time.sleep(GATHER_SECONDS)
    for descriptor in settling:
        os.close(descriptor)
    ended = os.times()
    cpu.value = (ended.user - started.user + ended.system - started.system) / max(batch, 1)  # seconds a batch
    _report(started, ended, batch)


def _burn(ready: multiprocessing.Event, stop: multiprocessing.Event, cpu: multiprocessing.Value) -> None:
    ready.set()
    seconds, batch, started = cpu.value, 0, os.times()
    while not stop.is_set():
        until = time.thread_time() + seconds
        while time.thread_time() < until:
            pass
        batch += 1
        time.sleep(GATHER_SECONDS)
    _report(started, os.times(), batch)


def _report(started: os.times_result, ended: os.times_result, batches: int) -> None:
    print(f"    neighbour: {batches} batches, CPU user {ended.user - started.user:.2f} s, system "
          f"{ended.system - started.system:.2f} s", flush=True)


def rows_per_second(session: ort.InferenceSession, rows: np.ndarray, seconds: float) -> float:
    name = session.get_inputs()[0].name
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {name: rows})
        done += len(rows)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="ONNX Runtime session config entries, e.g. session.dynamic_block_base=4")
    args = parser.parse_args()
    options = ort.SessionOptions()
    for entry in args.config:
        options.add_session_config_entry(*entry.split("=", 1))
    if args.threads:
        options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.onnx), options, providers=["CPUExecutionProvider"])
    shape = [args.batch, *session.get_inputs()[0].shape[1:]]
    rows = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    rows_per_second(session, rows, 2.0)  # warm-up
    context = multiprocessing.get_context("spawn")
    cpu = context.Value("d", 0.0)
    speeds: dict[str, list[float]] = {"idle": [], "files": [], "cpu": []}
    print(f"{cpu_description()}; {args.onnx} at batch {args.batch}, threads {args.threads or 'default'} {' '.join(args.config)}")
    for round_ in range(args.rounds):
        order = ("idle", "files", "cpu") if round_ % 2 == 0 else ("files", "cpu", "idle")  # cpu after files: its share
        for neighbour in order:
            with tempfile.TemporaryDirectory(prefix="graft-interference-", dir=".") as folder:
                stop, process = context.Event(), None
                if neighbour != "idle":
                    target, extra = (_write_files, (folder,)) if neighbour == "files" else (_burn, ())
                    ready = context.Event()
                    process = context.Process(target=target, args=(*extra, ready, stop, cpu))
                    process.start()
                    ready.wait()  # started and imported: its start-up is not the neighbour measured
                    time.sleep(0.5)
                speed = rows_per_second(session, rows, args.seconds)
                stop.set()
                if process is not None:
                    process.join()
                speeds[neighbour].append(speed)
                print(f"round {round_} {neighbour}: {speed:.0f} rows/s", flush=True)
                time.sleep(0.5)
    for neighbour in ("files", "cpu"):
        slowdowns = [1 - speed / idle for speed, idle in zip(speeds[neighbour], speeds["idle"])]
        print(f"beside {neighbour}: {statistics.mean(speeds[neighbour]):.0f} rows/s against "
              f"{statistics.mean(speeds['idle']):.0f} alone, slower by {statistics.mean(slowdowns):.1%} +- "
              f"{statistics.stdev(slowdowns) / len(slowdowns) ** 0.5:.1%}")


if __name__ == "__main__":
    main()
