"""Scheduled retraining against a real Prefect server on 127.0.0.1 and a real process worker."""
import asyncio
import contextvars
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.events.filters import EventFilter, EventNameFilter

from tests.conftest import (
    RAW,
    copy_workspace,
    stop_process_group,
    tiny_params,
)

DEPLOYMENT = "retrain/nightly-retrain"


@pytest.fixture(scope="module")
def scheduled(prefect_server, candidate_template, tmp_path_factory):
    """A workspace whose stages have run once (its first scheduled run judges and publishes), registered with
    `graft schedule`, and a worker on its pool."""
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
    stop_process_group(worker)


def _trigger():
    return run_deployment(DEPLOYMENT, timeout=900, poll_interval=2)


def _wait_for_event(name: str, seconds: float = 30):
    async def read():
        async with get_client() as client:
            return (await client.read_events(filter=EventFilter(event=EventNameFilter(name=[name])), limit=10)).events

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if events := asyncio.run(read()):
            return events
        time.sleep(1)
    raise AssertionError(f"no {name} event reached the server")


def _version(root) -> str:
    return yaml.safe_load((root / "outputs" / "registration.json").read_text())["version"]


def test_deployment_is_scheduled_with_the_params_cron(scheduled):
    async def read():
        async with get_client() as client:
            return await client.read_deployment_by_name(DEPLOYMENT)

    deployment = asyncio.run(read())
    assert deployment.work_pool_name == "graft-test"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
    assert deployment.parameters == {"root": str(scheduled)}


def test_trigger_retrain_then_nothing_to_do_then_new_data_retrains(scheduled):
    first = _trigger()
    assert first.state.is_completed(), first.state.message
    assert _version(scheduled) == "1"
    promoted = _wait_for_event("graft.model.promoted")
    assert promoted[0].payload["version"] == "1" and promoted[0].resource.id == "graft.model.graft-classifier"

    second = _trigger()
    assert second.state.is_completed() and second.state.message.startswith("nothing to do")
    seconds = (second.end_time - second.start_time).total_seconds()
    print(f"nothing-to-do run took {seconds:.1f} s")
    assert seconds < 60 and _version(scheduled) == "1"

    # New target data arrives the way users add it: image files in the class folders, then `dvc add`.
    for class_dir in sorted((RAW / "animal-mnist").iterdir()):
        for image in sorted(class_dir.iterdir())[30:35]:
            shutil.copy(image, scheduled / "data/raw/animal-mnist" / class_dir.name / image.name)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/animal-mnist"], cwd=scheduled, check=True)
    third = _trigger()
    assert third.state.is_completed(), third.state.message
    assert _version(scheduled) == "2"


def test_two_runs_at_once_one_waits_and_state_stays_consistent(scheduled):
    params = yaml.safe_load((scheduled / "params.yaml").read_text())
    params["seed"] = 1  # new inputs: a retrain is due
    (scheduled / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = int(_version(scheduled))
    with ThreadPoolExecutor(2) as pool:  # each trigger in its own thread, with this test's Prefect settings
        futures = [pool.submit(contextvars.copy_context().run, _trigger) for _ in range(2)]
        runs = [future.result() for future in futures]
    assert len(runs) == 2 and all(run.state.is_completed() for run in runs), [run.state.message for run in runs]
    messages = sorted(str(run.state.message or "") for run in runs)
    assert int(_version(scheduled)) == before + 1, f"exactly one new version; messages: {messages}"
    assert sum(m.startswith("nothing to do") for m in messages) == 1, messages
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=scheduled, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {"resolve_sources": ["always changed"]}, "every other stage is up to date"


def test_a_rejected_candidate_fails_the_run_with_the_gate_and_emits_an_event(scheduled):
    params = yaml.safe_load((scheduled / "params.yaml").read_text())
    params["gates"]["min_accuracy"] = 0.99
    (scheduled / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run = _trigger()
    assert run.state.is_failed() and "quality.accuracy" in run.state.message
    rejected = _wait_for_event("graft.model.rejected")
    assert "quality.accuracy" in rejected[0].payload["failed_gates"]
