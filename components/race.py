"""A fine-tuning race between source candidates: successive halving on the target's validation split.

Transferability scores are cheap and often right, but no score is reliable across data sets (a 42,000-experiment
study of 23 of them found none; ../shared/ANCHORS.md). When the scores disagree, or the leader's lead is within
their noise, the honest tie-breaker is to fine-tune: every candidate for a few steps with the pipeline's own recipe,
the better half again with twice the steps, until one is left or the time budget would be passed. The test split
is never seen.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Rung:
    steps: int                   # fine-tuning steps each candidate of this rung trained
    accuracy: dict[str, float]   # validation accuracy by candidate, best first
    seconds: float


@dataclass(frozen=True)
class RaceResult:
    winner: str
    rungs: list[Rung]
    stopped_by_budget: bool      # the budget ended the race before one candidate was left

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rungs)

    def to_dict(self) -> dict:
        return {"winner": self.winner, "stopped_by_budget": self.stopped_by_budget, "seconds": self.seconds,
                "rungs": [asdict(r) for r in self.rungs]}

    def summary(self) -> str:
        rungs = "; ".join(f"{r.steps} steps: " + ", ".join(f"{n} {a:.3f}" for n, a in r.accuracy.items()) for r in self.rungs)
        budget = ", stopped by the time budget" if self.stopped_by_budget else ""
        return f"validation accuracy after {rungs} ({self.seconds:.0f}s{budget})"


def successive_halving(names: list[str], fine_tune: Callable[[str, int], float], first_steps: int,
                       budget_seconds: float, clock: Callable[[], float] = time.perf_counter) -> RaceResult:
    """`fine_tune(name, steps)` trains a fresh copy of candidate `name` for `steps` and returns its validation
    accuracy. `names` come best first by the scores: a tie in accuracy keeps that order."""
    started, survivors, steps, rungs = clock(), list(names), first_steps, []
    while True:
        rung_started = clock()
        accuracy = {name: fine_tune(name, steps) for name in survivors}
        ranked = sorted(survivors, key=lambda name: -accuracy[name])
        rungs.append(Rung(steps, {name: accuracy[name] for name in ranked}, clock() - rung_started))
        survivors = ranked[: (len(ranked) + 1) // 2]
        if len(survivors) == 1:
            return RaceResult(survivors[0], rungs, stopped_by_budget=False)
        # The next rung: half the candidates at twice the steps, about as long as this one.
        if clock() - started + rungs[-1].seconds * len(survivors) * 2 / len(ranked) > budget_seconds:
            return RaceResult(ranked[0], rungs, stopped_by_budget=True)
        steps *= 2
