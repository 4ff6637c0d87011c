"""The retrain flow through Prefect's real test harness (a real local Prefect API and database)."""
import asyncio
import json
import logging
import threading
import time

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from components.config import ParamsError
from components.settings import parse_settings
from components.errors import CandidateRejected
from components.dvc_runner import StageRefused
from components.stage_runner import stage_order
from flows.retrain import retrain
from tests.conftest import (
    copy_workspace,
    free_port,
    start_mlflow_server,
    stop_process_group,
    tiny_params,
)

STAGES = stage_order(parse_settings(tiny_params()))


@pytest.fixture(scope="module")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


async def _task_runs(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time)


def test_flow_runs_each_stage_as_a_task_then_skips_when_nothing_changed(prefect_api, workspace_factory, repro_workspace,
                                                                        tmp_path, monkeypatch):
    root = workspace_factory("flow")
    state = retrain(root=str(root), return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["model version"] == "graft-classifier v1 (challenger, champion)"
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    assert [r.name for r in runs] == ["check_params", "plan", *STAGES[1:], "judge", "publish", "announce"]
    assert all(r.state.is_completed() and r.total_run_time.total_seconds() > 0 for r in runs)
    assert all(f"{name} ran" in summary["stages"] for name in STAGES)
    assert summary["selection"] == "fashion-mnist, selection.use (mode: report)"
    assert summary["source scores"].startswith("logme: ") and "efficientnet-lite0" in summary["source scores"]

    # Same params and data as the `dvc repro` workspace: the same metrics, to the last digit.
    _, _, repro_metrics = repro_workspace
    assert json.loads((root / "metrics" / "evaluate.json").read_text()) == repro_metrics["evaluate"]
    pretrain = json.loads((root / "metrics" / "pretrain-fashion-mnist.json").read_text())
    assert pretrain["test_accuracy"] == repro_metrics["pretrain"]["test_accuracy"]

    started = time.monotonic()
    again = retrain(root=str(root), return_state=True)
    assert again.is_completed() and again.message.startswith("nothing to do")
    assert "registered this candidate as graft-classifier v1, which passed every gate" in again.message
    assert time.monotonic() - started < 30

    # Another registry (the operator points MLFLOW_TRACKING_URI elsewhere): it lacks the candidate, so the
    # run judges and publishes there; DVC still skips every stage.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh.db'}")
    fresh = retrain(root=str(root), return_state=True)
    assert fresh.is_completed() and not str(fresh.message or "").startswith("nothing to do")
    assert fresh.result()["model version"] == "graft-classifier v1 (challenger, champion)"
    assert all(f"{name} skipped" in fresh.result()["stages"] for name in STAGES[1:])
    assert retrain(root=str(root), return_state=True).message.startswith("nothing to do"), "now that registry holds it too"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    forced = retrain(root=str(root), force=True, return_state=True).result()
    assert all(f"{name} skipped" in forced["stages"] for name in STAGES[1:]), "force reruns the flow, DVC still skips"
    assert f"{STAGES[0]} ran" in forced["stages"], "the weights files outside the project are looked at every time"
    assert "already registered: not duplicated" in forced["model version"]


def test_flow_fails_on_bad_params_and_registers_nothing(prefect_api, workspace_factory):
    bad = tiny_params(**{"finetune.strategy": "everything"})
    root = workspace_factory("bad-params")
    (root / "params.yaml").write_text(yaml.safe_dump(bad))
    state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(ParamsError, match="finetune.strategy"):
        state.result()
    assert not (root / "outputs" / "registration.json").exists()


def test_bad_data_fails_once_with_the_reason_and_is_not_retried(prefect_api, workspace_factory):
    root = workspace_factory("bad-data", tiny_params(**{"schedule.retries": 2, "schedule.retry_delay_seconds": 0}))
    # A class whose files are not images: enough of them for the split to fit by count (checked before any stage),
    # so the prepare stage is what finds none of them usable.
    unicorns = root / "data/raw/animal-mnist/unicorn"
    unicorns.mkdir()
    for i in range(20):
        (unicorns / f"{i}.png").write_bytes(b"not a png")
    state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    failed = [r for r in runs if r.state.is_failed()]
    assert [r.name for r in failed] == ["prepare_target"] and failed[0].run_count == 1, "bad data is not retried"
    assert "fewer than 3 usable images: unicorn (0)" in failed[0].state.message
    with pytest.raises(StageRefused, match="stage prepare_target: .*fewer than 3 usable images"):
        state.result()


def test_second_run_waits_for_the_lock_then_refuses(prefect_api, workspace_factory, caplog):
    from components.project_lock import ProjectBusy, project_lock

    root = workspace_factory("locked", tiny_params(**{"schedule.lock_wait_seconds": 1}))
    with project_lock(root, 0, "a test holding the project"), caplog.at_level(logging.WARNING, logger="graft.lock"):
        state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    waiting = [r.getMessage() for r in caplog.records if r.name == "graft.lock"]
    assert len(waiting) == 1 and "waiting up to 1s (schedule.lock_wait_seconds)" in waiting[0], waiting
    assert "a test holding the project" in waiting[0], "says for whom it waits"
    with pytest.raises(ProjectBusy, match="another retraining run is using .*a test holding the project"):
        state.result()


def _finished_workspace(template, root, **overrides):
    """A copy of a workspace whose stages are done: a run of the flow only judges and publishes."""
    copy_workspace(template, root)
    params = tiny_params(**overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def test_a_gate_failure_fails_the_flow_with_the_report_and_emits_rejected(prefect_api, candidate_template, tmp_path):
    root = _finished_workspace(candidate_template[0], tmp_path / "ws", **{"gates.min_accuracy": 0.99})
    state = retrain(root=str(root), return_state=True)
    assert state.is_failed() and "quality.accuracy" in state.message
    with pytest.raises(CandidateRejected):
        state.result()
    registration = json.loads((root / "outputs" / "registration.json").read_text())
    assert registration["gates_passed"] is False, "the rejected candidate is registered for diagnosis"


def test_mlflow_outage_is_retried_until_it_is_back(prefect_api, candidate_template, tmp_path, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)       # nothing listens there yet
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    root = _finished_workspace(candidate_template[0], tmp_path / "ws", **{"schedule.retries": 4, "schedule.retry_delay_seconds": 3})
    server = {}

    def bring_mlflow_back():
        time.sleep(4)  # the registry look-up's first attempt meets a closed port
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
    runs = {r.name: r for r in asyncio.run(_task_runs(state.state_details.flow_run_id))}
    assert runs["plan"].run_count > 1, "the registry look-up was retried"
    assert json.loads((root / "outputs" / "registration.json").read_text())["tracking_uri"] == url
