"""`graft sweep` as a Prefect flow whose branches run in parallel on Dask (prefect-dask's DaskTaskRunner): a
temporary `distributed.LocalCluster` by default, or the Dask scheduler at sweep.dask.address /
DASK_SCHEDULER_ADDRESS. The logic is components/sweep.py: the data is prepared once, before any branch; each
branch task logs its own MLflow child run under the sweep's parent run, on whichever worker runs it."""
from __future__ import annotations

import contextlib
import os

import torch
from prefect import flow, task
from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

from components.settings import Settings, SweepDask
from components.sweep import (
    Branch,
    SweepPlan,
    close_sweep,
    open_sweep,
    run_logged_branch,
)


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


def dask_runner(dask: SweepDask) -> DaskTaskRunner:
    """The scheduler at dask.address (or in DASK_SCHEDULER_ADDRESS), else a LocalCluster of dask.workers
    processes; the choice is printed."""
    address = dask.scheduler_address()
    if address:
        print(f"sweep: branches on the Dask scheduler at {address}", flush=True)
        return DaskTaskRunner(address=address)
    print(f"sweep: branches on a local Dask cluster of {dask.workers} worker processes x {dask.threads()} torch "
          "thread(s)", flush=True)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          # One branch at a time a worker; its torch uses dask.threads() cores (branch_task).
                          cluster_kwargs={"n_workers": dask.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None, "host": "127.0.0.1"})


@flow(name="sweep", log_prints=True)
def sweep_flow(root: str, params: Settings) -> dict:
    plan = open_task(root, params)
    futures = {branch.key: branch_task.submit(plan, params, branch)
               for branch in plan.todo}
    return close_task(plan, params, {key: future.result() for key, future in futures.items()})


@contextlib.contextmanager
def prefect_api_for_workers():
    """The Prefect server the sweep's task runs report to, known to every Dask worker. With none configured, a
    temporary one for this sweep, named to the workers through the environment: each worker is another
    process, and would otherwise start a temporary server of its own."""
    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        yield
        return
    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # LocalCluster workers inherit this process's environment
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        APILogWorker.drain_all(timeout=10)  # the run's last log lines, before their server goes
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def run_sweep_on_dask(root: str, params: Settings) -> dict:
    with prefect_api_for_workers():
        return sweep_flow.with_options(task_runner=dask_runner(params.sweep.dask))(root, params)
