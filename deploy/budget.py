"""A share of one core for the server's optional work beside answering: the drift tests and the shadow's model runs.

On a machine whose cores the served model needs, every millisecond of side work is a millisecond an answer may wait
for (benchmarks/README.md, "Shadow and the champion's latency"): so side work is paced by what it costs. A piece of
work that took `seconds` keeps the next one from starting for `seconds / share` after it started, which holds it to
`share` of one core however heavy the traffic; under light traffic it never waits. What cannot start is skipped
(sampled out), never queued: the caller counts it.
"""
from __future__ import annotations

import math
import time


class CpuBudget:
    """`share` of one core (0 < share <= 1) for one kind of side work: `take()` says whether a piece may start now
    and reserves the time it is expected to cost (the last piece's cost); `spent()` records what it did cost. A
    piece whose `spent()` never comes (its request went away) holds the budget only for that reservation."""

    def __init__(self, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"a CPU share is in (0, 1], not {share}")
        self.share = share
        self._cost = 0.0  # the last piece's seconds: the next one is expected to cost as much
        self._next = -math.inf  # when the next piece may start

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now < self._next:
            return False
        self._next = now + self._cost / self.share
        return True

    def spent(self, started: float, seconds: float) -> None:
        """A piece that started at `started` (time.monotonic) took `seconds`."""
        self._cost = seconds
        self._next = max(self._next, started + seconds / self.share)
