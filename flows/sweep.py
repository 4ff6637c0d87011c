"""`graft sweep` as a Prefect flow whose branches run in parallel on Dask (prefect-dask's DaskTaskRunner): a
temporary `distributed.LocalCluster` by default, or the Dask scheduler at sweep.dask.address /
DASK_SCHEDULER_ADDRESS. The logic is components/sweep.py: the data is prepared once, before any branch; each
branch task logs its own MLflow child run under the sweep's parent run, on whichever worker runs it."""
from __future__ import annotations

import torch
from prefect import flow, task

from components.settings import Settings
from components.sweep import (
    Branch,
    SweepPlan,
    close_sweep,
    open_sweep,
    run_logged_branch,
)
from flows.on_dask import dask_runner, prefect_api_for_workers


@task(task_run_name="open sweep")
def open_task(root: str, params: Settings) -> SweepPlan:
    return open_sweep(root, params)


@task(task_run_name="branch {branch.key}")
def branch_task(plan: SweepPlan, params: Settings, branch: Branch) -> dict:
    # Computed on the worker, of the worker's machine: its share of the cores, not every core once a worker.
    torch.set_num_threads(params.sweep.dask.threads())
    return run_logged_branch(plan, params, branch)


@task(task_run_name="close sweep")
def close_task(plan: SweepPlan, params: Settings, results: dict[str, dict]) -> dict:
    return close_sweep(plan, params, results)


@flow(name="sweep", log_prints=True)
def sweep_flow(root: str, params: Settings) -> dict:
    plan = open_task(root, params)
    futures = {branch.key: branch_task.submit(plan, params, branch)
               for branch in plan.todo}
    return close_task(plan, params, {key: future.result() for key, future in futures.items()})


def run_sweep_on_dask(root: str, params: Settings) -> dict:
    with prefect_api_for_workers():
        return sweep_flow.with_options(task_runner=dask_runner(params.sweep.dask, "sweep: branches"))(root, params)
