"""The retrain flow through Prefect's real test harness (a real local Prefect API and database)."""
import asyncio
import json

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from components.pipeline import STAGE_ORDER
from flows.retrain import retrain
from tests.conftest import tiny_params


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
    assert summary["model version"] == "graft-classifier v1"
    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    assert [r.name for r in runs] == ["check_params-0", *STAGE_ORDER]
    assert all(r.state.is_completed() and r.total_run_time.total_seconds() > 0 for r in runs)
    assert all(f"{name} ran" in summary["stages"] for name in STAGE_ORDER)

    # Same params and data as the `dvc repro` workspace: the same metrics, to the last digit.
    _, _, repro_metrics = repro_workspace
    assert json.loads((root / "metrics" / "evaluate.json").read_text()) == repro_metrics["evaluate"]
    assert json.loads((root / "metrics" / "pretrain.json").read_text())["test_accuracy"] == repro_metrics["pretrain"]["test_accuracy"]

    again = retrain(root=str(root), return_state=True).result()
    assert all(f"{name} skipped" in again["stages"] for name in STAGE_ORDER)
    assert again["model version"] == "graft-classifier v1", "nothing changed, so no new version"


def test_flow_fails_on_bad_params_and_registers_nothing(prefect_api, workspace_factory):
    bad = tiny_params(**{"finetune.strategy": "everything"})
    root = workspace_factory("bad-params")
    (root / "params.yaml").write_text(yaml.safe_dump(bad))
    state = retrain(root=str(root), return_state=True)
    assert state.is_failed()
    assert "finetune.strategy" in str(state.message) or "finetune.strategy" in repr(state.result(raise_on_failure=False))
    assert not (root / "outputs" / "registration.json").exists()
