"""What storing captured items costs the machine, through a growing page cache and with capture's pages dropped.

    .venv/bin/python benchmarks/capture_page_cache.py            # ~2 min: each way 3 times, tensor and PNG items

Writes batches as the capture writer does (deploy/capture.py: one file of inputs and one of records every 50 ms,
100 items a batch: a 1x64x64 float32 tensor row with its .npy header and 1,280 float32 features, 21.6 kB; or a
291-byte PNG with its features) for 10 s, each way in a fresh process a few seconds after the last (freed pages
go back to the host meanwhile, as they do in a long-running server), and reports the writing thread's CPU and the
whole machine's busy time (/proc/stat, after a final sync so writeback is counted) per item. Ways: `growing` (the
page cache keeps every page written: plain buffered writes), `dropped` (deploy/capture.py's way: writeback begun
once a file is written, its pages dropped a batch later). No arguments: both ways, both kinds, 3 rounds each.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ITEMS, BATCHES, GATHER_SECONDS = 100, 200, 0.05
DONTNEED = os.POSIX_FADV_DONTNEED


def _busy_ticks() -> int:
    with open("/proc/stat") as stat:
        user, nice, system, idle, iowait, irq, softirq = map(int, stat.readline().split()[1:8])
    return user + nice + system + irq + softirq


def batch_inputs(kind: str, items: int) -> list:
    """A batch's .inputs chunks as capture writes them: per item a tensor row (its .npy header, then 1x64x64 float32)
    or a 291-byte PNG, then 1,280 float32 features."""
    rng = np.random.default_rng(0)
    header, png = bytes(128), b"\x89PNG\r\n\x1a\n" + bytes(283)
    return [chunk for _ in range(items)
            for chunk in ((header, rng.normal(size=(1, 64, 64)).astype(np.float32)) if kind == "tensor" else (png,))
            + (rng.normal(size=1280).astype(np.float32),)]


def write_batch(folder: str, batch: int, inputs: list, items: int, settling: list[int], drop: bool) -> list[int]:
    """One batch as deploy/capture.py writes it: its inputs, then a 600-byte record an item. With `drop`, each
    file's writeback begun and the batch before's files (`settling`) out of the page cache and closed; returns the
    descriptors of this batch left to settle."""
    written = []
    for suffix, body in ((".inputs", inputs), (".jsonl", [bytes(600)] * items)):
        descriptor = os.open(f"{folder}/{batch}{suffix}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.writev(descriptor, body)
        if drop:
            os.posix_fadvise(descriptor, 0, 0, DONTNEED)
            written.append(descriptor)
        else:
            os.close(descriptor)
    for descriptor in settling:
        os.posix_fadvise(descriptor, 0, 0, DONTNEED)
        os.close(descriptor)
    return written


def measure(kind: str, way: str) -> None:
    inputs = batch_inputs(kind, ITEMS)
    folder = tempfile.mkdtemp(prefix="graft-page-cache-", dir=os.getcwd())
    thread, busy, settling = time.thread_time(), _busy_ticks(), []
    for batch in range(BATCHES):
        settling = write_batch(folder, batch, inputs, ITEMS, settling, way == "dropped")
        time.sleep(GATHER_SECONDS)
    thread = time.thread_time() - thread
    os.sync()
    busy = (_busy_ticks() - busy) / os.sysconf("SC_CLK_TCK")
    items = ITEMS * BATCHES
    print(f"{kind:6s} {way:8s} writing thread {thread / items * 1e6:5.1f} us/item, machine {busy / items * 1e6:5.1f} "
          f"us/item", flush=True)
    shutil.rmtree(folder)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        measure(sys.argv[1], sys.argv[2])
    else:
        from deploy.cpu import cpu_description  # the parent only: each measuring child stays without torch

        print(cpu_description())
        for kind in ("tensor", "png"):
            for _ in range(3):
                for way in ("growing", "dropped"):
                    subprocess.run([sys.executable, __file__, kind, way], check=True)
                    time.sleep(3)
