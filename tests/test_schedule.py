"""Scheduled retraining against a real Prefect server on 127.0.0.1 (the run's shared one) and a real process worker.

One deployment, registered by `graft schedule`; each test triggers it on its own copy of the finished template
workspace (the deployment's `root` parameter): what a test changes in its project no other test sees, in any order."""
import asyncio
import contextvars
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

from tests.conftest import (
    RAW,
    copy_workspace,
    stop_process_group,
    tiny_params,
)

pytestmark = pytest.mark.slow  # a Prefect server, a worker, retraining runs

DEPLOYMENT = "retrain/nightly-retrain"
CHECK_DEPLOYMENT = "production-check/production-check"


@pytest.fixture(scope="module")
def deployment(prefect_server, candidate_template, tmp_path_factory):
    """A project registered with `graft schedule` (a copy of the template workspace), and a worker on its pool."""
    root = copy_workspace(candidate_template[0], tmp_path_factory.mktemp("scheduled") / "ws")
    params = tiny_params(**{"schedule.work_pool": "graft-test", "schedule.lock_wait_seconds": 900})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "graft", "schedule", "--root", str(root), "--paused"],
                          env=prefect_server, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "graft-test", "--type", "process"],
                              env={**prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1"}, cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield root
    # An idle Prefect 3.8 worker does not exit on SIGTERM (its handler sends itself SIGINT, which cancels nothing
    # here; measured: still running 60 s later): past a moment's grace it is killed, as a second SIGTERM would.
    stop_process_group(worker, grace_seconds=3)


@pytest.fixture
def scheduled(deployment, candidate_template, tmp_path):
    """This test's own project: a copy of the template workspace (its stages have run; its first scheduled run
    judges and publishes) with the scheduled project's params, run through the deployment (_trigger)."""
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    shutil.copy(deployment / "params.yaml", root / "params.yaml")
    return root


def _trigger(root):
    """A run of the deployment, as the schedule or `prefect deployment run` starts it, on the project at `root`."""
    return run_deployment(DEPLOYMENT, parameters={"root": str(root)}, timeout=900, poll_interval=2)


def _wait_for_event(name: str, since: datetime, seconds: float = 30):
    """The `name` events that occurred since `since` (the shared server holds other tests' events too)."""
    async def read():
        async with get_client() as client:
            found = await client.read_events(filter=EventFilter(event=EventNameFilter(name=[name]),
                                                                occurred=EventOccurredFilter(since=since)), limit=10)
            return found.events

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if events := asyncio.run(read()):
            return events
        time.sleep(1)
    raise AssertionError(f"no {name} event since {since} reached the server")


def _version(root) -> str:
    return yaml.safe_load((root / "outputs" / "registration.json").read_text())["version"]


async def read_deployment(name: str):
    async with get_client() as client:
        return await client.read_deployment_by_name(name)


def test_deployments_are_scheduled_with_the_params_crons(deployment):
    registered = asyncio.run(read_deployment(DEPLOYMENT))
    assert registered.work_pool_name == "graft-test"
    assert [s.schedule.cron for s in registered.schedules] == ["0 2 * * *"]
    assert registered.parameters == {"root": str(deployment)}
    check = asyncio.run(read_deployment(CHECK_DEPLOYMENT))
    assert [s.schedule.cron for s in check.schedules] == ["*/30 * * * *"] and check.parameters == {"root": str(deployment)}


def test_two_runs_at_once_one_retrains_the_other_waits_then_nothing_to_do_then_new_data_retrains(scheduled):
    # A retrain is due (this copy's registry lacks its candidate). Two runs at once: the first judges and publishes
    # it, the second waits for the project's lock and then finds nothing to do.
    since = datetime.now(timezone.utc)
    with ThreadPoolExecutor(2) as pool:  # each trigger in its own thread, with this test's Prefect settings
        futures = [pool.submit(contextvars.copy_context().run, _trigger, scheduled) for _ in range(2)]
        runs = [future.result() for future in futures]
    assert len(runs) == 2 and all(run.state.is_completed() for run in runs), [run.state.message for run in runs]
    messages = sorted(str(run.state.message or "") for run in runs)
    assert _version(scheduled) == "1", f"exactly one new version; messages: {messages}"
    assert sum(m.startswith("nothing to do") for m in messages) == 1, messages
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=scheduled, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {"resolve_sources": ["always changed"]}, "every other stage is up to date"
    promoted = _wait_for_event("graft.model.promoted", since)
    assert len(promoted) == 1, [e.payload for e in promoted]
    assert promoted[0].payload["version"] == "1" and promoted[0].resource.id == "graft.model.graft-classifier"
    assert promoted[0].payload["run_id"] == yaml.safe_load((scheduled / "outputs" / "registration.json").read_text())["run_id"]

    again = _trigger(scheduled)
    assert again.state.is_completed() and again.state.message.startswith("nothing to do")
    seconds = (again.end_time - again.start_time).total_seconds()
    print(f"nothing-to-do run took {seconds:.1f} s")
    assert seconds < 60 and _version(scheduled) == "1"

    # New target data arrives the way users add it: image files in the class folders, then `dvc add`.
    for class_dir in sorted((RAW / "animal-mnist").iterdir()):
        for image in sorted(class_dir.iterdir())[30:35]:
            shutil.copy(image, scheduled / "data/raw/animal-mnist" / class_dir.name / image.name)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/animal-mnist"], cwd=scheduled, check=True)
    third = _trigger(scheduled)
    assert third.state.is_completed(), third.state.message
    assert _version(scheduled) == "2"


def test_a_rejected_candidate_fails_the_run_with_the_gate_and_emits_an_event(scheduled):
    params = yaml.safe_load((scheduled / "params.yaml").read_text())
    params["gates"]["min_accuracy"] = 0.99
    (scheduled / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    since = datetime.now(timezone.utc)
    run = _trigger(scheduled)
    assert run.state.is_failed() and "quality.accuracy" in run.state.message
    rejected = _wait_for_event("graft.model.rejected", since)
    assert len(rejected) == 1 and "quality.accuracy" in rejected[0].payload["failed_gates"]
    assert rejected[0].payload["run_id"] == yaml.safe_load((scheduled / "outputs" / "registration.json").read_text())["run_id"]


def test_the_production_check_is_scheduled_and_two_checks_on_the_same_capture_register_one_version(scheduled):
    from mlflow import MlflowClient

    from tests.test_harvest import _capture, _fresh_images

    params = yaml.safe_load((scheduled / "params.yaml").read_text())
    params["production"]["min_new_labels"] = 10  # one label a class below: enough to call for a retrain
    (scheduled / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    target = scheduled / "data/raw/animal-mnist"
    classes = sorted(p.name for p in target.iterdir() if p.is_dir())
    fresh = _fresh_images(classes, 100, 2)
    _capture(scheduled / params["serving"]["capture"]["folder"],
             [*((files[0], name) for name, files in fresh.items()), *((files[1], None) for files in fresh.values())],
             classes)

    def check():
        return run_deployment(CHECK_DEPLOYMENT, parameters={"root": str(scheduled)}, timeout=900, poll_interval=2)

    with ThreadPoolExecutor(2) as pool:  # two triggers at once for the same captured data
        runs = [future.result() for future in [pool.submit(contextvars.copy_context().run, check) for _ in range(2)]]
    assert all(run.state.is_completed() for run in runs), [run.state.message for run in runs]
    versions = MlflowClient(f"sqlite:///{scheduled / 'mlflow.db'}").search_model_versions("name='graft-classifier'")
    assert len(versions) == 1, "exactly one model version for the one new data version"
    harvested = [p for p in target.glob("*/production-*")]
    assert len(harvested) == len(classes)
    assert yaml.safe_load((scheduled / "params.yaml").read_text())["finetune"]["adaptation"]["method"] == "coral"
    assert json.loads((scheduled / "reports/monitor.json").read_text())["labelled"] == len(classes)
