"""The retraining flow: produce a candidate (the DVC stages), then judge and publish it against the registry
as it is now. The logic lives in components/."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.events import emit_event
from prefect.states import Completed

from components import runlog
from components.dvc_runner import ALWAYS_RUN, StageOutcome, push_to_remote, reproduce_stage
from components.errors import RegistryUnavailable
from components.gates import GateReport
from components.judge import judge
from components.project_lock import project_lock
from components.register import publish
from components.run_plan import RunPlan, plan_run
from components.settings import Settings, load_settings
from components.stage_runner import stage_order
from components.summary import collect_summary, format_table, summary_text


def say(message: str) -> None:
    """A line for the terminal (and the run's log in Prefect); the rest of a run's output goes to its log file."""
    get_run_logger().info(message, extra={runlog.TERMINAL: True})


def retry_when_unreachable(task, task_run, state) -> bool:
    """Retry only what the registry boundary classified as transient; never bad data, bad params or a gate."""
    try:
        state.result()
    except RegistryUnavailable:
        return True
    except Exception:
        return False
    return False


@task(task_run_name="check_params")
def check_params(root: str) -> Settings:
    """Fail in a second, naming the bad key, rather than minutes later inside a stage."""
    return load_settings(Path(root) / "params.yaml")


@task(task_run_name="plan")
def plan(root: str, params: Settings, force: bool) -> RunPlan:
    """The data folders exist and DVC's cache holds them intact (repaired from the project's copy where it can);
    what changed since the last successful run; when nothing did, the registry's verdict on this candidate."""
    return plan_run(root, params, force)


@task(task_run_name="{name}")
def run_stage(root: str, name: str) -> StageOutcome:
    outcome = reproduce_stage(root, name)
    say(f"stage {name} {'ran in' if outcome.ran else 'up to date,'} {outcome.seconds:.1f}s")
    return outcome


@task(task_run_name="judge")
def judge_candidate(root: str, params: Settings) -> GateReport:
    report = judge(root, params)
    create_markdown_artifact(report.markdown(), key="gate-report", description="Graft gate report")
    return report


@task(task_run_name="publish")
def publish_candidate(root: str, params: Settings, report: GateReport) -> dict:
    with runlog.quiet():
        return publish(root, params, report)


@task(task_run_name="push_to_remote", retries=2, retry_delay_seconds=10)
def push_files(root: str, url: str) -> str:
    """The run's data and stage outputs to the DVC remote (storage.dvc_remote): any clone can `dvc pull` them."""
    return push_to_remote(root, url)


@task(task_run_name="announce")
def announce(registration: dict, report: GateReport) -> str:
    """A Prefect event for what happened to the version, for automations (alerts, a deploy) to follow."""
    if registration["promoted"]:
        name = "graft.model.promoted"
    elif registration["challenger"]:
        name = "graft.model.challenger"
    else:
        name = "graft.model.rejected"
    emit_event(
        event=name,
        resource={"prefect.resource.id": f"graft.model.{registration['model_name']}",
                  "prefect.resource.name": registration["model_name"]},
        payload={"version": registration["version"], "run_id": registration["run_id"], "new": registration["new"],
                 "failed_gates": [g.name for g in report.failures], "reason": report.failure_text()},
    )
    return name


@flow(name="retrain")
def retrain(root: str = ".", force: bool = False, params: Settings | None = None, planned: RunPlan | None = None):
    """check params -> (lock) -> plan: resolve_sources, check inputs, what changed -> [nothing changed and the
    registry holds the candidate: done] -> prepare_source@NAME -> prepare_target -> pretrain@NAME -> select_source
    -> baseline -> finetune -> evaluate -> export -> judge -> publish -> [push_to_remote] -> announce  (NAME: each
    pipeline source; push_to_remote with storage.dvc_remote). `graft run` passes the params and plan it made
    (components/run_plan.py) when it has them; a scheduled run makes its own."""
    root = str(Path(root).resolve())
    params = params or check_params(root)
    holder = f"flow run {get_run_context().flow_run.name}"
    with project_lock(root, params.schedule.lock_wait_seconds, holder):
        backoff = [params.schedule.retry_delay_seconds * 2**i for i in range(params.schedule.retries)] or 0
        registry_step = {"retries": params.schedule.retries, "retry_condition_fn": retry_when_unreachable,
                         "retry_delay_seconds": backoff}
        planned = planned or plan.with_options(**registry_step)(root, params, force)
        for note in planned.notes():
            say(note)
        if planned.nothing_to_do and not force:
            message = planned.judged.message()
            create_markdown_artifact(f"**{message}**", key="retrain-summary", description="Graft retrain summary")
            planned.judged.enforce()
            say(message)
            return Completed(message=message, data={"run": message})
        outcomes = [*planned.always_ran, *(run_stage(root, name) for name in stage_order(params) if name not in ALWAYS_RUN)]
        report = judge_candidate.with_options(**registry_step)(root, params)
        registration = publish_candidate.with_options(**registry_step)(root, params, report)
        if params.storage.dvc_remote:
            say(f"dvc remote {params.storage.dvc_remote}: {push_files(root, params.storage.dvc_remote)}")
        summary = collect_summary(root, outcomes, registration, report.to_dict())
        create_markdown_artifact(format_table(summary, markdown=True) + "\n\n" + report.markdown(), key="retrain-summary",
                                 description="Graft retrain summary")
        say("\n" + summary_text(root, summary))
        announce(registration, report)
        report.enforce()
    return summary
