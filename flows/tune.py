"""`graft tune` with tune.executor: dask, as a Prefect flow whose trials run in parallel on Dask: the cluster of
sweep.dask (flows/on_dask.py). The logic is components/tune.py: the study is opened once; each worker task runs
its share of the trials against the one study storage (its sampler seeded apart), each trial logging its own
MLflow child run under the study's parent run; the study is closed (report, proposal, plots) once they are done."""
from __future__ import annotations

import time

import torch
from prefect import flow, task

from components.settings import Settings
from components.tune import TunePlan, close_tune, run_trials, start_tune, worker_shares
from flows.on_dask import dask_runner, prefect_api_for_workers


@task(task_run_name="open study")
def open_task(root: str, params: Settings, trials: int | None) -> tuple[TunePlan, int]:
    return start_tune(root, params, trials)


@task(task_run_name="{count} trial(s), worker {worker}")
def trials_task(plan: TunePlan, params: Settings, count: int, worker: int) -> None:
    # Computed on the worker, of the worker's machine: its share of the cores, not every core once a worker.
    torch.set_num_threads(params.sweep.dask.threads())
    run_trials(plan, params, count, worker)


@task(task_run_name="close study")
def close_task(plan: TunePlan, params: Settings, seconds: float) -> dict:
    return close_tune(plan, params, seconds)


@flow(name="tune", log_prints=True)
def tune_flow(root: str, params: Settings, trials: int | None = None) -> dict:
    plan, todo = open_task(root, params, trials)
    started = time.perf_counter()
    futures = [trials_task.submit(plan, params, count, worker)
               for worker, count in enumerate(worker_shares(todo, params.sweep.dask.workers))]
    for future in futures:
        future.result()
    return close_task(plan, params, time.perf_counter() - started)


def run_tune_on_dask(root: str, params: Settings, trials: int | None = None) -> dict:
    with prefect_api_for_workers():
        return tune_flow.with_options(task_runner=dask_runner(params.sweep.dask, "tune: trials"))(root, params, trials)
