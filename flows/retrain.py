"""The retraining flow: the pipeline's stages as Prefect tasks, in order. The logic lives in components/."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.events import emit_event
from prefect.states import Completed

from components.artifacts import read_json
from components.config import Params, load_params
from components.errors import TransientStageError
from components.gates import GateReport
from components.pipeline import (ALWAYS_RUN, StageOutcome, collect_summary, format_table, pending_stages, project_lock,
                                 reproduce_stage)
from components.stages import Layout, stage_order


class GateFailed(RuntimeError):
    """The candidate failed a gate: it is registered for diagnosis, without the challenger alias."""


def retry_only_transient(task, task_run, state) -> bool:
    """Retry an MLflow outage or an I/O error; never bad data, bad params or a failed gate."""
    try:
        state.result()
    except TransientStageError:
        return True
    except Exception:
        return False
    return False


@task(task_run_name="check_params")
def check_params(root: str) -> Params:
    """Fail in a second, naming the bad key, rather than minutes later inside a stage."""
    return load_params(Path(root) / "params.yaml")


@task(task_run_name="check_inputs")
def check_inputs(root: str) -> list[str]:
    """What changed since the last successful run: tracked data, params or code behind any stage."""
    return pending_stages(root)


@task(task_run_name="{name}")
def run_stage(root: str, name: str) -> StageOutcome:
    outcome = reproduce_stage(root, name)
    get_run_logger().info("stage %s %s in %.1fs", name, "ran" if outcome.ran else "was up to date", outcome.seconds)
    return outcome


@task(task_run_name="announce")
def announce(root: str, registered: bool) -> str | None:
    """A Prefect event for what happened to the new version, for automations (alerts, a deploy) to follow."""
    if not registered:
        return None
    registration = read_json(Path(root) / Layout.registration)
    report = GateReport.from_dict(read_json(Path(root) / Layout.gate_report))
    if registration.get("promoted"):
        name = "graft.model.promoted"
    elif registration.get("challenger"):
        name = "graft.model.challenger"
    else:
        name = "graft.model.rejected"
    emit_event(
        event=name,
        resource={"prefect.resource.id": f"graft.model.{registration['model_name']}",
                  "prefect.resource.name": registration["model_name"]},
        payload={"version": registration["version"], "run_id": registration["run_id"],
                 "failed_gates": [g.name for g in report.failures], "reason": report.failure_text()},
    )
    return name


@task(task_run_name="enforce_gates")
def enforce_gates(root: str) -> None:
    report = GateReport.from_dict(read_json(Path(root) / Layout.gate_report))
    create_markdown_artifact(report.markdown(), key="gate-report", description="Graft gate report")
    if not report.passed:
        raise GateFailed(f"candidate rejected by {len(report.failures)} gate(s): {report.failure_text()}")


@flow(name="retrain", log_prints=True)
def retrain(root: str = ".", force: bool = False):
    """check params -> (lock) -> resolve_sources -> check inputs -> prepare_source@NAME -> prepare_target
    -> pretrain@NAME -> select_source -> baseline -> finetune -> evaluate -> export -> gate -> register
    -> announce -> enforce gates  (NAME: each pipeline source; pretrained sources have no stages of their own)"""
    root = str(Path(root).resolve())
    params = check_params(root)
    holder = f"flow run {get_run_context().flow_run.name}"
    with project_lock(root, params.schedule.lock_wait_seconds, holder):
        backoff = [params.schedule.retry_delay_seconds * 2**i for i in range(params.schedule.retries)] or 0
        stage = run_stage.with_options(retries=params.schedule.retries, retry_condition_fn=retry_only_transient,
                                       retry_delay_seconds=backoff)
        # The sources' weights live outside the project: look at them first, then ask DVC what changed.
        outcomes = [stage(root, name) for name in ALWAYS_RUN]
        changed = check_inputs(root)
        if not changed and not force and (Path(root) / Layout.registration).exists():
            message = "nothing to do: data, params, code and source weights are unchanged since the last successful run"
            create_markdown_artifact(f"**{message}**", key="retrain-summary", description="Graft retrain summary")
            print(message)
            return Completed(message=message, data={"run": message})
        outcomes += [stage(root, name) for name in stage_order(params) if name not in ALWAYS_RUN]
        summary = collect_summary(root, outcomes)
        report = format_table(summary, markdown=True)
        gate_markdown = Path(root) / Layout.gate_markdown
        create_markdown_artifact(report + "\n\n" + gate_markdown.read_text(), key="retrain-summary", description="Graft retrain summary")
        print("\n" + format_table(summary))
        announce(root, registered=outcomes[-1].ran)
        enforce_gates(root)
    return summary
