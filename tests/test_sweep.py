"""`graft sweep` in a real project after `dvc repro`: branches in parallel on a real 2-worker Dask LocalCluster
through Prefect, MLflow child runs under one parent, resumable (and the same numbers one branch at a time), the
table and the learning-curve plot; negative transfer marked only beyond the seed noise.

One 12-branch sweep (the `swept` fixture), read by the tests; a test that sweeps again does it in a copy of that
project with a copy of its registry."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from components.settings import SweepDask, parse_settings
from components.data import load_splits, prepare
from components.sweep import (
    POOL_FILE,
    Branch,
    labelled_subset,
    summarise,
)
from deploy.tags import SWEEP_BRANCH_TAG, SWEEP_WORKER_TAG
from tests.conftest import (
    copy_workspace,
    free_port,
    graft_cli,
    make_small_target,
    stop_process_group,
    tiny_params,
    unchanged_at_teardown,
)


@pytest.fixture(scope="module")
def swept(candidate_template, tmp_path_factory):
    template, _ = candidate_template
    root = copy_workspace(template, tmp_path_factory.mktemp("sweep") / "ws")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sweep"] = {"labels_per_class": [1, 3], "seeds": [0, 1],
                       "strategies": {"scratch": {"strategy": "scratch"}, "finetune": {"strategy": "finetune"},
                                      "joint_iw": {"joint": {"weight": 1.0, "instance_weights": "domain", "source_examples": 300}}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    url = f"sqlite:///{root / 'mlflow.db'}"
    done = graft_cli(root, url, "sweep")  # no Prefect server configured: the sweep starts its own, as for a user
    with unchanged_at_teardown(root):
        yield root, url, done


def _copy(swept, dest):
    """The swept project and its registry, copied: a test may break a branch or sweep again there."""
    root = copy_workspace(swept[0], dest, registry=True)
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.mark.slow  # the 12-branch sweep
def test_every_branch_is_a_child_run_of_one_parent_with_its_test_accuracy(swept):
    root, url, done = swept
    report = json.loads((root / "reports" / "sweep.json").read_text())
    client = MlflowClient(tracking_uri=url)
    children = client.search_runs([client.get_run(report["parent_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{report['parent_run_id']}'")
    assert len(children) == 3 * 2 * 2 and all(r.info.status == "FINISHED" for r in children)
    assert {r.data.tags[SWEEP_BRANCH_TAG] for r in children} == {Branch(s, k, seed).key for s in ("scratch", "finetune", "joint_iw")
                                                           for k in (1, 3) for seed in (0, 1)}
    by_key = {r.data.tags[SWEEP_BRANCH_TAG]: r for r in children}
    assert by_key["finetune/k=3/seed=1"].data.metrics["train_examples"] == 3 * 10  # the tiny target has 10 classes
    row = next(r for r in report["rows"] if (r["strategy"], r["labels_per_class"]) == ("joint_iw", 3))
    assert row["accuracy"] == [by_key[f"joint_iw/k=3/seed={s}"].data.metrics["test_accuracy"] for s in (0, 1)]
    assert len(row["minus_scratch"]) == 2 and report["reference"] == "scratch"
    assert 1 < by_key["joint_iw/k=1/seed=0"].data.metrics["source_effective_sample_size"] < 300
    artifacts = {a.path for a in client.list_artifacts(report["parent_run_id"], "sweep")}
    assert artifacts == {"sweep/sweep.json", "sweep/sweep.md", "sweep/sweep-learning-curves.png"}
    assert (root / "plots" / "sweep-learning-curves.png").stat().st_size > 10_000
    assert "| joint_iw |" in done.stdout and "12 to run" in done.stdout + done.stderr  # Prefect logs the flow's prints


@pytest.mark.slow  # the 12-branch sweep
def test_branches_ran_in_parallel_on_two_dask_workers_after_the_data_was_prepared_once(swept):
    root, url, done = swept
    assert "local Dask cluster of 2 worker processes" in done.stdout
    report = json.loads((root / "reports" / "sweep.json").read_text())
    client = MlflowClient(tracking_uri=url)
    children = client.search_runs([client.get_run(report["parent_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{report['parent_run_id']}'")
    workers = {r.data.tags[SWEEP_WORKER_TAG] for r in children}
    assert len(workers) == 2 and sorted(workers) == report["workers"]
    # Two branches overlapped in time: they ran side by side, not one after the other.
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert any(later_start < end for (_, end), (later_start, _) in zip(spans, spans[1:]))
    prepared_ms = (root / ".graft" / "sweep" / POOL_FILE).stat().st_mtime * 1000
    assert prepared_ms <= min(r.info.start_time for r in children)


@pytest.mark.slow  # the 12-branch sweep
def test_a_resumed_sweep_redoes_only_the_branches_that_did_not_finish(swept, tmp_path):
    root, url = _copy(swept, tmp_path / "ws")
    report = json.loads((root / "reports" / "sweep.json").read_text())
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_run(report["parent_run_id"]).info.experiment_id
    broken = client.search_runs([experiment], f"tags.`{SWEEP_BRANCH_TAG}` = 'finetune/k=1/seed=0'")[0]
    client.set_terminated(broken.info.run_id, "FAILED")  # as a branch killed part-way leaves it
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sweep"]["executor"] = "sequential"  # the same branch, now in graft's own process
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = graft_cli(root, url, "sweep")
    assert "11 finished before, 1 to run" in again.stdout + again.stderr
    rerun = client.search_runs([experiment], f"tags.`{SWEEP_BRANCH_TAG}` = 'finetune/k=1/seed=0'")
    assert sorted(r.info.status for r in rerun) == ["FAILED", "FINISHED"]
    on_dask, here = sorted(rerun, key=lambda r: r.info.status)
    # The same seeded branch; a Dask worker trains with 1 torch thread, this process with every core, and float
    # sums in another order move a 12-step model by a few of the 60 test images at most.
    assert here.data.metrics["train_examples"] == on_dask.data.metrics["train_examples"]
    assert abs(here.data.metrics["test_accuracy"] - on_dask.data.metrics["test_accuracy"]) <= 0.05
    assert json.loads((root / "reports" / "sweep.json").read_text())["parent_run_id"] == report["parent_run_id"]


@pytest.fixture
def dask_scheduler(tmp_path, prefect_server):
    """A Dask scheduler and one worker process started from the command line, as an operator runs them: with
    PREFECT_API_URL naming the Prefect server (the run's shared one) the sweep's task runs report to."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", address.rpartition(":")[2], "--no-dashboard"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1",
                               "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"], cwd=tmp_path, env=prefect_server,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            worker_pid = next(iter(client.run(os.getpid).values()))
        yield address, worker_pid
    finally:
        stop_process_group(worker)
        stop_process_group(scheduler)


@pytest.mark.slow  # the 12-branch sweep
def test_a_sweep_runs_on_the_dask_scheduler_named_in_the_environment(swept, dask_scheduler, prefect_server, tmp_path):
    root, url = _copy(swept, tmp_path / "ws")
    address, worker_pid = dask_scheduler
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sweep"].update(executor="dask", labels_per_class=[2], seeds=[5], strategies={"finetune": {"strategy": "finetune"}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = graft_cli(root, url, "sweep", env={**prefect_server, "DASK_SCHEDULER_ADDRESS": address})
    assert f"branches on the Dask scheduler at {address}" in done.stdout
    report = json.loads((root / "reports" / "sweep.json").read_text())
    assert [worker.rpartition(":")[2] for worker in report["workers"]] == [str(worker_pid)]  # that worker ran it
    child = MlflowClient(tracking_uri=url).search_runs(
        [MlflowClient(tracking_uri=url).get_run(report["parent_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{report['parent_run_id']}'")
    assert [r.data.tags[SWEEP_BRANCH_TAG] for r in child] == ["finetune/k=2/seed=5"]


def test_a_branch_draws_the_labels_the_pipeline_would_draw_with_its_seed(tmp_path):
    raw = make_small_target(tmp_path / "raw", per_class=12, classes=4)
    params = parse_settings(tiny_params(**{"data.target.path": str(raw), "data.target.val_size": 8, "data.target.test_size": 8}))
    everything = params.data.target.model_copy(update={"labels_per_class": None})
    prepare(everything, params.data, 1, [28], 0, tmp_path / "all.npz", tmp_path / "all.json")
    for seed in (0, 3):
        prepare(params.data.target.model_copy(update={"labels_per_class": 2}), params.data, 1, [28], seed,
                tmp_path / "k.npz", tmp_path / "k.json")
        cut = labelled_subset(load_splits(tmp_path / "all.npz"), 2, seed)
        assert sorted(cut.origin_train) == sorted(load_splits(tmp_path / "k.npz").origin_train)


def _summary(scratch: list[float], transfer: list[float]) -> dict:
    params = parse_settings(tiny_params(**{"sweep": {"labels_per_class": [5], "seeds": [0, 1, 2],
                                                   "strategies": {"scratch": {"strategy": "scratch"}, "ft": {}}}}))
    done = {Branch(s, 5, seed).key: {"test_accuracy": a} for s, accs in (("scratch", scratch), ("ft", transfer))
            for seed, a in enumerate(accs)}
    pool = type("Pool", (), {"y_train": np.zeros(50), "y_test": np.zeros(20), "classes": tuple("abcde")})
    plan = [Branch(s, 5, seed) for s in ("scratch", "ft") for seed in range(3)]
    return next(r for r in summarise(params, plan, done, pool)["rows"] if r["strategy"] == "ft")


def test_negative_transfer_is_marked_only_beyond_the_seed_noise():
    assert _summary([0.80, 0.81, 0.82], [0.70, 0.71, 0.72])["negative_transfer"], "10 points below on every seed"
    assert not _summary([0.80, 0.81, 0.82], [0.79, 0.80, 0.83])["negative_transfer"], "one seed above scratch"
    assert not _summary([0.70, 0.80, 0.90], [0.65, 0.78, 0.88])["negative_transfer"], "below on every seed, within the spread"


def test_the_dask_scheduler_is_the_environments_then_the_params_else_a_local_cluster(monkeypatch):
    from flows.on_dask import dask_runner

    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.5:8786")
    assert dask_runner(SweepDask(address="tcp://dask.params:8786"), "sweep: branches").address == "tcp://10.0.0.5:8786"
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
    assert dask_runner(SweepDask(address="tcp://dask.params:8786"), "sweep: branches").address == "tcp://dask.params:8786"
    local = dask_runner(SweepDask(workers=3), "sweep: branches")
    assert local.address is None and local.cluster_kwargs["n_workers"] == 3
    assert SweepDask(workers=2).threads() == max(1, os.cpu_count() // 2) and SweepDask(threads_per_worker=3).threads() == 3
    assert local.cluster_kwargs["host"] == "127.0.0.1"  # a local cluster listens on loopback only
