"""Shadow traffic's parts that need no server: the bounded queue drops and counts instead of waiting, the capture
store keeps shadow outcomes beside the feedback labels, and the evidence and gate read from them are right on a stream
built with known answers. (The live server shadowing a registry challenger: tests/test_server.py.)"""
from __future__ import annotations

import asyncio
import time

import numpy as np

from components.settings import GateParams, ShadowGateParams
from components.shadow import collect_evidence, shadow_gates, verdict
from deploy.capture import Answer, CaptureStore, iter_items, iter_shadow_records
from deploy.settings import CaptureSettings
from deploy.shadow import FAILED, NO_SHADOW, QUEUE_FULL, ShadowJob, ShadowOutcome, ShadowQueue

CLASSES = ("ant", "bee", "cat")


def _job(request_id: str, predicted: tuple[str, ...] = ("ant",), seconds: float = 0.002) -> ShadowJob:
    return ShadowJob(request_id, b"image", "1", predicted, seconds, time.time())


def test_a_full_queue_drops_and_counts_and_never_waits_and_so_does_a_missing_shadow():
    async def scenario() -> tuple[list[str], list[ShadowOutcome], list[bool]]:
        release, dropped, done = asyncio.Event(), [], []

        async def run(job: ShadowJob) -> ShadowOutcome | None:
            await release.wait()  # the shadow model is busy until the test lets it go
            if job.request_id == "c" * 32:
                raise RuntimeError("the shadow failed on this one")
            if job.request_id == "e" * 32:
                return None  # the shadow was unloaded before this one's turn
            return ShadowOutcome(job, "challenger", "2", ("bee",), 0.001)

        queue = ShadowQueue(1, 1, run, done.append, dropped.append)
        offered = [queue.offer(_job("a" * 32))]
        await asyncio.sleep(0)  # the worker takes the first: it waits in `run`, the queue is empty again
        offered += [queue.offer(_job(letter * 32)) for letter in "cd"]  # c queued; d finds the queue full
        release.set()
        for _ in range(100):
            await asyncio.sleep(0)
        offered.append(queue.offer(_job("e" * 32)))
        for _ in range(100):
            await asyncio.sleep(0)
        await queue.stop()
        return dropped, done, offered

    dropped, done, offered = asyncio.run(scenario())
    assert offered == [True, True, False, True]
    assert sorted(dropped) == sorted([QUEUE_FULL, FAILED, NO_SHADOW])
    assert [outcome.job.request_id for outcome in done] == ["a" * 32]
    assert done[0].agreements == 0


def _stream(folder, pairs: list[tuple[str, str, str | None]], latencies=(2.0, 3.0)) -> CaptureStore:
    """Each pair (champion's class, challenger's class, true label or None) as a captured answer of v1, its shadow
    outcome from v2 and (when given) its feedback label, through the capture store as the server feeds it."""
    store = CaptureStore(CaptureSettings(enabled=True, folder=str(folder)))
    for index, (champion, challenger, _) in enumerate(pairs):
        request_id = f"{index:032x}"
        job = ShadowJob(request_id, b"image", "1", (champion,), latencies[0] / 1000, time.time())
        store.submit(Answer(request_id, "predict", "m", "1", "fp32", CLASSES,
                            np.eye(3)[[CLASSES.index(champion)]], b"image"))
        outcome = ShadowOutcome(job, "challenger", "2", (challenger,), latencies[1] / 1000)
        store.submit_shadow(outcome.job.time, outcome.records())
    for index, (_, _, label) in enumerate(pairs):
        if label is not None:
            store.label(f"{index:032x}", label)
    store.close()
    return store


def test_evidence_counts_agreement_latency_and_paired_correctness_of_a_known_stream(tmp_path):
    pairs = ([("ant", "ant", "ant")] * 5 + [("ant", "bee", "bee")] * 4 + [("bee", "ant", "bee")] * 1
             + [("cat", "cat", None)] * 6 + [("cat", "bee", None)] * 4)
    store = _stream(tmp_path / "captures", pairs)
    assert store.stats.shadow_records == len(pairs) and len(list(iter_items(tmp_path / "captures"))) == len(pairs)
    # Another pair of versions in the same folder is not this pair's evidence.
    other = ShadowOutcome(_job("e" * 32), "challenger", "3", ("cat",), 0.001)
    extra = CaptureStore(CaptureSettings(enabled=True, folder=str(tmp_path / "captures")))
    extra.submit_shadow(other.job.time, other.records())
    extra.close()
    assert len(list(iter_shadow_records(tmp_path / "captures"))) == len(pairs) + 1

    evidence = collect_evidence(tmp_path / "captures", "1", "2", 0.95)
    assert (evidence.rows, evidence.agreements, evidence.labelled) == (20, 11, 10)
    assert (evidence.comparison.only_a, evidence.comparison.only_b) == (4, 1)  # challenger alone right 4x, champion 1x
    assert np.isclose(evidence.champion_p95_ms, 2.0) and np.isclose(evidence.challenger_p95_ms, 3.0)
    assert np.isclose(evidence.latency_ratio, 1.5)

    rules = ShadowGateParams(min_requests=20, min_agreement=0.5, max_latency_ratio=2.0, min_labelled=10)
    found = shadow_gates(evidence, rules, GateParams())
    assert verdict(found, rules) == (True, "every shadow gate passed")
    slow = ShadowGateParams(min_requests=20, min_agreement=0.6, max_latency_ratio=1.2, min_labelled=10)
    ok, why = verdict(shadow_gates(evidence, slow, GateParams()), slow)
    assert not ok and "55.0%" in why and "1.50x" in why


def test_no_evidence_or_too_few_labels_refuses_and_a_worse_challenger_is_refused(tmp_path):
    rules = ShadowGateParams(min_requests=10, min_agreement=0.0, max_latency_ratio=10.0, min_labelled=10)
    nothing = collect_evidence(tmp_path / "none", "1", "2", 0.95)
    ok, why = verdict(shadow_gates(nothing, rules, GateParams()), rules)
    assert not ok and "0 answers of v2 shadowing v1" in why

    unlabelled = collect_evidence(_stream(tmp_path / "few", [("ant", "ant", None)] * 12).folder, "1", "2", 0.95)
    ok, why = verdict(shadow_gates(unlabelled, rules, GateParams()), rules)
    assert not ok and "0 of its answers have a feedback label" in why

    # Labelled: the champion right and the challenger wrong on 12 of 12 where they differ: McNemar p = 2 * 0.5^12.
    worse = collect_evidence(_stream(tmp_path / "worse", [("ant", "bee", "ant")] * 12).folder, "1", "2", 0.95)
    ok, why = verdict(shadow_gates(worse, rules, GateParams()), rules)
    assert not ok and "worse than the champion on labelled production requests" in why
