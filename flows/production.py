"""The production check: test what the server captured for drift, count the feedback labels, and when either calls
for it, harvest the captured requests into a new data version and run the retraining flow on it.

It runs on a schedule (production.check_cron, registered by `graft schedule`) rather than on a Prefect event sent
by the server: the capture folder is the durable record of what was served, so a check that reads it misses
nothing while a server restarts or no Prefect server is reachable from where the model serves (the serving image
has no Prefect, by design), and a check every half hour is soon enough for retraining that takes minutes. It is
exactly once per data version by construction: a harvest with nothing new changes no file, so the retrain finds
every stage up to date and the registry already holding the candidate, and registers nothing; two checks at once
queue on the project lock. The logic lives in components/.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from components.harvest import Harvest, harvest
from components.monitor import MonitorReport, check_capture, markdown
from components.project_lock import project_lock
from components.settings import Settings
from deploy.settings import default_cache_dir
from flows.retrain import check_params, retrain, say


@task(task_run_name="monitor")
def monitor_capture(root: str, params: Settings) -> MonitorReport:
    report, _ = check_capture(root, params, default_cache_dir())
    create_markdown_artifact(markdown(report), key="drift-report", description="Graft drift report")
    return report


@task(task_run_name="harvest")
def harvest_capture(root: str, params: Settings) -> Harvest:
    with project_lock(root, params.schedule.lock_wait_seconds, "the production check's harvest"):
        return harvest(root)


@flow(name="production-check")
def production_check(root: str = ".", force: bool = False):
    """check params -> monitor (drift windows, feedback labels) -> [no reason to retrain: done] -> harvest -> retrain.
    `force`: harvest and retrain whatever the monitor says."""
    root = str(Path(root).resolve())
    params = check_params(root)
    report = monitor_capture(root, params)
    reasons = report.retrain_reasons(params)
    if not reasons and not force:
        latest = report.latest
        message = (f"no reason to retrain: {report.unharvested_labels} labels wait (production.min_new_labels "
                   f"{params.production.min_new_labels}), " + (f"the latest window's p = {latest.result.p_value:.4f}"
                                                                if latest else "no full drift window yet"))
        say(message)
        return Completed(message=message)
    say("retraining: " + ("; ".join(reasons) or "forced"))
    harvested = harvest_capture(root, params)
    say(f"harvest: {sum(harvested.added_labelled.values())} labelled, {harvested.added_unlabelled} unlabelled images added"
        + (f"; a new data version of {', '.join(harvested.tracked)}" if harvested.changed else "; nothing new"))
    return retrain(root=root)
