"""The retrain flow, in this process, against the run's one real Prefect server (tests/conftest.py prefect_server):
each stage a task, what changed rerun, nothing to do when nothing changed, failures as Prefect sees them. The flow
from an empty project to the registry, and its retries while the registry is away, are tests/test_faults.py's
(through `graft run`)."""
import asyncio
import json
import logging
import time

import pytest
import yaml
from prefect.client.orchestration import get_client

from components.config import ParamsError
from components.errors import CandidateRejected
from components.settings import parse_settings
from components.dvc_runner import StageRefused
from components.stage_runner import stage_order
from flows.retrain import retrain
from tests.conftest import copy_workspace, tiny_params

STAGES = stage_order(parse_settings(tiny_params()))


async def _task_runs(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time)


def _finished_workspace(template, root, **overrides):
    """A copy of a workspace whose stages are done, with `overrides` in its params: a run of the flow reruns what
    they change, then judges and publishes (the copy has no registry)."""
    copy_workspace(template, root)
    params = tiny_params(**overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


# What a change to the export params reruns (resolve_sources always runs): every other stage is skipped. FP32 only,
# which also keeps each judging below short.
CHANGE, RERUN = {"export.variants": []}, ["resolve_sources", "export"]


def test_flow_runs_each_stage_as_a_task_reruns_what_changed_then_skips_when_nothing_did(prefect_server, candidate_template,
                                                                                       tmp_path, monkeypatch):
    root = _finished_workspace(candidate_template[0], tmp_path / "ws", **CHANGE)
    state = retrain(root=str(root), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["model version"] == "graft-classifier v1 (challenger, champion)"
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    assert [r.name for r in runs] == ["check_params", "plan", *STAGES[1:], "judge", "publish", "announce"]
    assert all(r.state.is_completed() and r.total_run_time.total_seconds() > 0 for r in runs)
    assert set(RERUN) <= set(STAGES)
    for name in STAGES:
        assert f"{name} {'ran' if name in RERUN else 'skipped'}" in summary["stages"], (name, summary["stages"])
    assert summary["selection"] == "fashion-mnist, selection.use (mode: report)"
    assert summary["source scores"].startswith("logme: ") and "efficientnet-lite0" in summary["source scores"]
    assert set(json.loads((root / "metrics" / "export.json").read_text())["variants"]) == {"fp32"}, "export ran anew"

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


def test_flow_fails_on_bad_params_and_registers_nothing(prefect_server, tmp_path):
    bad = tiny_params(**{"finetune.strategy": "everything"})
    root = tmp_path  # the params are checked first: no data, DVC or registry is reached
    (root / "params.yaml").write_text(yaml.safe_dump(bad))
    state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    with pytest.raises(ParamsError, match="finetune.strategy"):
        state.result()
    assert not (root / "outputs" / "registration.json").exists()


def test_bad_data_fails_once_with_the_reason_and_is_not_retried(prefect_server, candidate_template, tmp_path):
    root = _finished_workspace(candidate_template[0], tmp_path / "ws", **{"schedule.retries": 2,
                                                                           "schedule.retry_delay_seconds": 0})
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


def test_second_run_waits_for_the_lock_then_refuses(prefect_server, tmp_path, caplog):
    from components.project_lock import ProjectBusy, project_lock

    root = tmp_path  # the lock is taken right after the params are read: before any data, DVC or registry
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(**{"schedule.lock_wait_seconds": 1}), sort_keys=False))
    with project_lock(root, 0, "a test holding the project"), caplog.at_level(logging.WARNING, logger="graft.lock"):
        state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    waiting = [r.getMessage() for r in caplog.records if r.name == "graft.lock"]
    assert len(waiting) == 1 and "waiting up to 1s (schedule.lock_wait_seconds)" in waiting[0], waiting
    assert "a test holding the project" in waiting[0], "says for whom it waits"
    with pytest.raises(ProjectBusy, match="another retraining run is using .*a test holding the project"):
        state.result()


def test_only_an_unreachable_registry_is_retried():
    """The registry steps' retry condition (no server needed): a transient registry failure, never bad data, bad params
    or a gate (test_bad_data_fails_once_... sees it in a real run)."""
    from prefect.states import Completed, Failed

    from components.errors import RegistryUnavailable
    from flows.retrain import retry_when_unreachable

    assert retry_when_unreachable(None, None, Failed(data=RegistryUnavailable("registry at http://127.0.0.1:1 not answering")))
    for refusal in (StageRefused("stage prepare_target: no usable images"), ParamsError("finetune.strategy: bad"),
                    CandidateRejected("candidate rejected by 1 gate(s): quality.accuracy")):
        assert not retry_when_unreachable(None, None, Failed(data=refusal)), refusal
    assert not retry_when_unreachable(None, None, Completed(data={}))
