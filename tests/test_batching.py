"""The dynamic batcher on its own: grouping, limits, results to the right callers, draining on stop."""
import asyncio
import threading
import time

import numpy as np
import pytest

from deploy.batching import BatcherClosed, DynamicBatcher


def _double(rows: np.ndarray) -> np.ndarray:
    time.sleep(0.005)  # long enough for concurrent callers to queue up behind a running batch
    return rows * 2


def _run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_are_batched_and_answered_individually():
    sizes = []

    async def scenario():
        batcher = DynamicBatcher(_double, max_batch_size=8, max_delay_s=0.01, on_batch=lambda n, s, cpu: sizes.append(n))
        batcher.start()
        inputs = [np.full((1, 3), i, np.float32) for i in range(40)]
        outputs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.stop()
        return inputs, outputs

    inputs, outputs = _run(scenario())
    for x, y in zip(inputs, outputs):
        np.testing.assert_array_equal(y, x * 2)
    assert sum(sizes) == 40 and max(sizes) == 8 and len(sizes) <= 10


def test_multi_row_requests_never_split_and_respect_the_limit():
    sizes = []

    async def scenario():
        batcher = DynamicBatcher(_double, max_batch_size=8, max_delay_s=0.005, on_batch=lambda n, s, cpu: sizes.append(n))
        batcher.start()
        inputs = [np.full((n, 2), n, np.float32) for n in (3, 5, 6, 2, 7, 1)]
        outputs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        await batcher.stop()
        return inputs, outputs

    inputs, outputs = _run(scenario())
    assert all(np.array_equal(y, x * 2) for x, y in zip(inputs, outputs))
    assert all(size <= 8 for size in sizes) and sum(sizes) == 24


def test_a_single_request_waits_at_most_the_delay():
    async def scenario():
        batcher = DynamicBatcher(lambda rows: rows, max_batch_size=64, max_delay_s=0.02)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(np.zeros((1, 1)))
        waited = time.perf_counter() - started
        await batcher.stop()
        return waited

    assert 0.015 <= _run(scenario()) < 0.5


def test_stop_drains_queued_requests_and_refuses_new_ones():
    async def scenario():
        batcher = DynamicBatcher(_double, max_batch_size=4, max_delay_s=0.0)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(np.ones((1, 1)) * i)) for i in range(10)]
        await asyncio.sleep(0)
        await batcher.stop()
        with pytest.raises(BatcherClosed):
            await batcher.submit(np.ones((1, 1)))
        return await asyncio.gather(*pending)

    results = _run(scenario())
    assert [float(r[0, 0]) for r in results] == [2.0 * i for i in range(10)]


def test_a_model_error_reaches_every_caller_in_the_batch():
    def broken(rows):
        raise RuntimeError("onnxruntime failed")

    async def scenario():
        batcher = DynamicBatcher(broken, max_batch_size=4, max_delay_s=0.01)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(np.ones((1, 1))) for _ in range(3)), return_exceptions=True)
        await batcher.stop()
        return results

    assert all(isinstance(r, RuntimeError) for r in _run(scenario()))


def test_each_execution_is_timed_in_its_own_thread_wall_and_cpu_apart():
    """A model call that sleeps takes wall time and next to no CPU; one that computes takes both. Measured in the
    worker thread, so the event loop's own delay in resuming is not counted as the model's."""
    executions = []

    def sleeping(rows):
        time.sleep(0.05)
        return rows

    def computing(rows):
        ends = time.thread_time() + 0.05
        while time.thread_time() < ends:
            pass
        return rows

    async def scenario(run):
        batcher = DynamicBatcher(run, max_batch_size=4, max_delay_s=0.0,
                                 on_batch=lambda n, seconds, cpu: executions.append((seconds, cpu)))
        batcher.start()
        await batcher.submit(np.ones((1, 1)))
        await batcher.stop()

    _run(scenario(sleeping))
    _run(scenario(computing))
    (slept, slept_cpu), (computed, computed_cpu) = executions
    assert slept >= 0.05 and slept_cpu < 0.02
    assert computed_cpu >= 0.05 and computed >= computed_cpu


def test_after_run_sees_each_whole_batch_once_in_the_worker_thread():
    """Per-batch work (the drift monitor's) runs on the batch's outputs off the event loop, once per execution."""
    seen, sizes = [], []

    async def scenario():
        loop_thread = threading.get_ident()
        batcher = DynamicBatcher(_double, max_batch_size=8, max_delay_s=0.01,
                                 on_batch=lambda n, seconds, cpu: sizes.append(n),
                                 after_run=lambda outputs: seen.append((outputs.copy(), threading.get_ident())))
        batcher.start()
        outputs = await asyncio.gather(*(batcher.submit(np.full((1, 1), i, np.float32)) for i in range(20)))
        await batcher.stop()
        return loop_thread, outputs

    loop_thread, outputs = _run(scenario())
    assert [len(batch) for batch, _ in seen] == sizes and sum(sizes) == 20
    assert all(thread != loop_thread for _, thread in seen)
    np.testing.assert_array_equal(np.sort(np.concatenate([batch for batch, _ in seen]).ravel()),
                                  np.sort(np.concatenate(outputs).ravel()))
