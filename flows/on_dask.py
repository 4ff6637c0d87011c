"""What a flow needs to run its tasks in parallel on Dask (prefect-dask's DaskTaskRunner): the runner for the
cluster sweep.dask names (`graft sweep`'s branches, `graft tune`'s trials with tune.executor: dask), and a
Prefect server every worker reports to."""
from __future__ import annotations

import contextlib
import os

from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

from components.settings import SweepDask


def dask_runner(dask: SweepDask, what: str) -> DaskTaskRunner:
    """The scheduler at dask.address (or in DASK_SCHEDULER_ADDRESS), else a LocalCluster of dask.workers
    processes; the choice is printed, `what` (e.g. "sweep: branches") first."""
    address = dask.scheduler_address()
    if address:
        print(f"{what} on the Dask scheduler at {address}", flush=True)
        return DaskTaskRunner(address=address)
    print(f"{what} on a local Dask cluster of {dask.workers} worker processes x {dask.threads()} torch "
          "thread(s)", flush=True)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          # One task at a time a worker; its torch uses dask.threads() cores (the task sets it).
                          cluster_kwargs={"n_workers": dask.workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None, "host": "127.0.0.1"})


@contextlib.contextmanager
def prefect_api_for_workers():
    """The Prefect server the flow's task runs report to, known to every Dask worker. With none configured, a
    temporary one for this flow, named to the workers through the environment: each worker is another
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
