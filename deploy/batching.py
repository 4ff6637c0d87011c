"""Dynamic batching: concurrent requests are grouped into one model call, and each caller gets its rows back.

A batch closes when it holds max_batch_size rows or when its first request has waited max_delay seconds.
The model runs in a worker thread (ONNX Runtime releases the GIL), so requests keep arriving and queueing
while a batch runs: under load, batches fill up even with a zero delay.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future
    queued_at: float


class BatcherClosed(RuntimeError):
    """This batcher's model was replaced; submit to the one now served."""


class DynamicBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_delay_s: float,
                 on_batch: Callable[[int, float, float], None] | None = None,
                 after_run: Callable[[np.ndarray], None] | None = None) -> None:
        """`on_batch(rows, seconds, cpu_seconds)` after each execution: its wall time and the CPU time of the thread
        that ran it, both measured in that thread (from the event loop, the wait for the loop to come back would be
        counted as the model's). `after_run(outputs)`: work on the whole batch's outputs in that thread, after the
        model and outside its time, instead of once a request on the event loop."""
        self.run, self.max_batch_size, self.max_delay_s = run, max_batch_size, max_delay_s
        self.on_batch = on_batch or (lambda size, seconds, cpu_seconds: None)
        self.after_run = after_run
        self.queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._carried: _Pending | None = None
        self.closed = False

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish every request already queued, then stop; later submits raise BatcherClosed."""
        self.closed = True
        self.queue.put_nowait(None)
        if self._worker:
            await self._worker

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        if self.closed:  # checked and queued with no await between: stop() cannot slip in
            raise BatcherClosed()
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Pending(rows, future, time.perf_counter()))
        return await future

    async def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """Rows for one model call; True once the stop marker was seen."""
        batch, size = [first], len(first.rows)
        deadline = first.queued_at + self.max_delay_s
        while size < self.max_batch_size:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if item is None:
                return batch, True
            if size + len(item.rows) > self.max_batch_size:
                self._carried = item  # too big to join: it opens the next batch, keeping arrival order
                break
            batch.append(item)
            size += len(item.rows)
        return batch, False

    def _timed_run(self, rows: np.ndarray) -> tuple[np.ndarray, float, float]:
        started, cpu_started = time.perf_counter(), time.thread_time()
        outputs = self.run(rows)
        seconds, cpu_seconds = time.perf_counter() - started, time.thread_time() - cpu_started
        if self.after_run is not None:
            self.after_run(outputs)
        return outputs, seconds, cpu_seconds

    async def _run(self, batch: list[_Pending]) -> None:
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
        try:
            outputs, seconds, cpu_seconds = await asyncio.to_thread(self._timed_run, rows)
        except Exception as error:  # the model failed: every caller in the batch hears why
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        self.on_batch(len(rows), seconds, cpu_seconds)
        offset = 0
        for pending in batch:
            count = len(pending.rows)
            if not pending.future.done():
                pending.future.set_result(outputs[offset : offset + count])
            offset += count

    async def _loop(self) -> None:
        stopping = False
        while True:
            if self._carried is not None:
                first, self._carried = self._carried, None
            elif stopping:
                return
            else:
                first = await self.queue.get()
                if first is None:
                    return
            batch, stopping = await self._collect(first)
            await self._run(batch)
