"""The retrain flow through Prefect's real test harness (a real local Prefect API and database)."""
import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from components.config import parse_params
from components.stages import stage_order
from flows.retrain import retrain
from tests.conftest import (
    free_port,
    start_mlflow_server,
    stop_process_group,
    tiny_params,
)

STAGES = stage_order(parse_params(tiny_params()))


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _task_runs(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time)


def test_flow_runs_each_stage_as_a_task_then_skips_when_nothing_changed(prefect_api, workspace_factory, repro_workspace):
    root = workspace_factory("flow")
    state = retrain(root=str(root), return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["model version"] == "graft-classifier v1 (challenger, champion)"
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    assert [r.name for r in runs] == ["check_params", STAGES[0], "check_inputs", *STAGES[1:], "announce", "enforce_gates"]
    assert all(r.state.is_completed() and r.total_run_time.total_seconds() > 0 for r in runs)
    assert all(f"{name} ran" in summary["stages"] for name in STAGES)
    assert summary["selection"].startswith("report by logme: ") and "efficientnet-lite0" in summary["selection"]

    # Same params and data as the `dvc repro` workspace: the same metrics, to the last digit.
    _, _, repro_metrics = repro_workspace
    assert json.loads((root / "metrics" / "evaluate.json").read_text()) == repro_metrics["evaluate"]
    pretrain = json.loads((root / "metrics" / "pretrain-fashion-mnist.json").read_text())
    assert pretrain["test_accuracy"] == repro_metrics["pretrain"]["test_accuracy"]

    started = time.monotonic()
    again = retrain(root=str(root), return_state=True)
    assert again.is_completed() and again.message.startswith("nothing to do")
    assert time.monotonic() - started < 30
    assert json.loads((root / "outputs" / "registration.json").read_text())["version"] == "1", "no new version"

    forced = retrain(root=str(root), force=True, return_state=True).result()
    assert all(f"{name} skipped" in forced["stages"] for name in STAGES[1:]), "force reruns the flow, DVC still skips"
    assert f"{STAGES[0]} ran" in forced["stages"], "the weights files outside the project are looked at every time"


def test_flow_fails_on_bad_params_and_registers_nothing(prefect_api, workspace_factory):
    bad = tiny_params(**{"finetune.strategy": "everything"})
    root = workspace_factory("bad-params")
    (root / "params.yaml").write_text(yaml.safe_dump(bad))
    state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    assert "finetune.strategy" in str(state.message) or "finetune.strategy" in repr(state.result(raise_on_failure=False))
    assert not (root / "outputs" / "registration.json").exists()


def test_bad_data_fails_once_with_the_reason_and_is_not_retried(prefect_api, workspace_factory):
    root = workspace_factory("bad-data", tiny_params(**{"schedule.retries": 2, "schedule.retry_delay_seconds": 0}))
    (root / "data/raw/animal-mnist/unicorn").mkdir()
    state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    failed = [r for r in runs if r.state.is_failed()]
    assert [r.name for r in failed] == ["prepare_target"] and failed[0].run_count == 1, "bad data is not retried"
    assert "empty class folder(s): unicorn" in failed[0].state.message


def test_second_run_waits_for_the_lock_then_refuses(prefect_api, workspace_factory):
    from components.pipeline import ProjectBusy, project_lock

    root = workspace_factory("locked", tiny_params(**{"schedule.lock_wait_seconds": 1}))
    with project_lock(root, 0, "a test holding the project"):
        state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(ProjectBusy, match="another retraining run is using .*a test holding the project"):
        state.result()


def test_a_gate_failure_fails_the_flow_with_the_report_and_emits_rejected(prefect_api, workspace_factory):
    root = workspace_factory("rejected", tiny_params(**{"gates.min_accuracy": 0.99}))
    state = retrain(root=str(root), return_state=True)
    assert state.is_failed() and "quality.accuracy" in state.message
    registration = json.loads((root / "outputs" / "registration.json").read_text())
    assert registration["gates_passed"] is False, "the rejected candidate is registered for diagnosis"


def test_mlflow_outage_is_retried_until_it_is_back(prefect_api, workspace_factory, tmp_path, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)       # the stages inherit it: nothing listens there yet
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    root = workspace_factory("outage", tiny_params(**{"schedule.retries": 4, "schedule.retry_delay_seconds": 3}))
    server = {}

    def bring_mlflow_back():
        lock = root / "dvc.lock"
        while not (lock.exists() and "\n  export:" in lock.read_text()):
            time.sleep(0.3)
        time.sleep(3)  # the gate stage's first attempt meets a closed port
        server["process"] = start_mlflow_server(tmp_path, port, wait=False)[0]

    thread = threading.Thread(target=bring_mlflow_back, daemon=True)
    thread.start()
    try:
        state = retrain(root=str(root), return_state=True)
    finally:
        thread.join(timeout=600)
        if "process" in server:
            stop_process_group(server["process"])
    assert state.is_completed(), state.message
    gate = next(r for r in asyncio.run(_task_runs(state.state_details.flow_run_id)) if r.name == "gate")
    assert gate.run_count > 1, "the gate stage was retried"
    assert json.loads((root / "outputs" / "registration.json").read_text())["tracking_uri"] == url


def test_promote_and_rollback_flows_move_the_champion(prefect_api, repro_workspace, tmp_path, monkeypatch):
    from flows.promote import promote_flow, rollback_flow

    source, _, _ = repro_workspace
    root = tmp_path / "ws"
    shutil.copytree(source, root, symlinks=True)
    monkeypatch.chdir(root)  # the embedded store is sqlite:///mlflow.db, relative to the project folder
    subprocess.run([sys.executable, "-m", "graft", "stage", "register"], cwd=root, check=True, capture_output=True)
    newest = json.loads((root / "outputs" / "registration.json").read_text())["version"]
    promoted = promote_flow(params_path=str(root / "params.yaml"), reason="flow test")
    assert promoted["champion"] == newest and promoted["previous"] != newest
    rolled = rollback_flow(params_path=str(root / "params.yaml"))
    assert rolled["champion"] == promoted["previous"]
