"""Shadow traffic: a second model (serving.shadow.alias, `challenger` by default) run on a share of the answered
requests, after their answer is sent, and compared with what the served model answered.

The client never waits for it: the server answers, then offers the request to a bounded queue (`ShadowQueue.offer`,
from a background task that runs once the response is sent); a full queue drops the request (counted), never
waits. Before that, the shadow's runs are held to serving.shadow.cpu_share of one core (deploy/budget.py): on cores
the served model shares, each run slows its next answers, so under heavy traffic the answers beyond that share are
not offered (counted over_budget). Workers take requests from the queue and run the shadow model through its own
batcher, so concurrent shadowed requests share model calls as answered ones do. Each result is a `ShadowOutcome`:
both models' predicted classes and their model latency on the same request. The server counts them on /metrics
and, with capture on, the capture store keeps them (`<hour>/<batch>.shadow.jsonl`, deploy/capture.py) beside the
feedback labels, which is what `graft shadow report` and the promotion gate (components/shadow.py) judge.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import orjson

from deploy.capture import item_id, iso_time

log = logging.getLogger("graft.shadow")

OVER_BUDGET, QUEUE_FULL, FAILED, NO_SHADOW = "over_budget", "queue_full", "failed", "no_shadow"
# why a sampled answer was not compared (over_budget: the shadow's runs had their serving.shadow.cpu_share of a core
# already; no_shadow: the shadow was unloaded before its turn)
DROP_REASONS = (OVER_BUDGET, QUEUE_FULL, FAILED, NO_SHADOW)


@dataclass(frozen=True)
class ShadowJob:
    """An answered request as the shadow gets it: the input the served model had, and what it answered."""

    request_id: str
    inputs: bytes | np.ndarray  # the uploaded image file's bytes, or the float32 (rows, C, H, W) the served model ran
    version: str  # the served version that answered
    predicted: tuple[str, ...]  # its class for each row
    seconds: float  # its model latency: from the batcher's queue to the outputs
    time: float


@dataclass(frozen=True)
class ShadowOutcome:
    """A shadowed request: what the served model and the shadow each predicted, and how long each model took."""

    job: ShadowJob
    alias: str
    version: str  # the shadow's version
    predicted: tuple[str, ...]  # the shadow's class for each row
    seconds: float

    @property
    def agreements(self) -> int:
        return sum(a == b for a, b in zip(self.job.predicted, self.predicted))

    def records(self) -> list[bytes]:
        """One JSON line a row, as the capture store keeps them: {id, request_id, time, served: {version, predicted,
        latency_ms}, shadow: {alias, version, predicted, latency_ms}}."""
        rows = len(self.predicted)
        return [orjson.dumps({
            "id": item_id(self.job.request_id, row, rows), "request_id": self.job.request_id,
            "time": iso_time(self.job.time),
            "served": {"version": self.job.version, "predicted": self.job.predicted[row],
                       "latency_ms": 1000 * self.job.seconds},
            "shadow": {"alias": self.alias, "version": self.version, "predicted": self.predicted[row],
                       "latency_ms": 1000 * self.seconds},
        }, option=orjson.OPT_APPEND_NEWLINE) for row in range(rows)]


class ShadowQueue:
    """Requests waiting for the shadow model, at most `size`; `workers` coroutines run them (`run`: a job -> its
    outcome, None when there is no shadow to run it now) and hand each outcome to `done`. A request that finds the
    queue full, whose run fails, or that finds no shadow when its turn comes, goes to `dropped` with the reason."""

    def __init__(self, size: int, workers: int, run: Callable[[ShadowJob], Awaitable[ShadowOutcome | None]],
                 done: Callable[[ShadowOutcome], None], dropped: Callable[[str], None]) -> None:
        self._queue: asyncio.Queue[ShadowJob] = asyncio.Queue(size)
        self._run, self._done, self._dropped = run, done, dropped
        self._workers = [asyncio.get_running_loop().create_task(self._work()) for _ in range(workers)]

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def offer(self, job: ShadowJob) -> bool:
        """Queue `job` for the shadow, or drop it (counted) when the queue is full: never waits."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._dropped(QUEUE_FULL)
            return False
        return True

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                outcome = await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a shadow that fails must never touch serving: counted, logged, next
                log.warning("shadow run of request %s failed: %s", job.request_id, error)
                self._dropped(FAILED)
                continue
            if outcome is None:
                self._dropped(NO_SHADOW)
            else:
                self._done(outcome)

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)


def predicted_classes(logits: np.ndarray, classes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(classes[i] for i in np.asarray(logits).argmax(axis=1))
