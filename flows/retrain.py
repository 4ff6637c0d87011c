"""The retraining flow: the pipeline's stages as Prefect tasks, in order. The logic lives in components/."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.config import load_params
from components.pipeline import STAGE_ORDER, StageOutcome, collect_summary, format_table, reproduce_stage


@task
def check_params(root: str) -> None:
    """Fail in a second, naming the bad key, rather than minutes later inside a stage."""
    load_params(Path(root) / "params.yaml")


@task(task_run_name="{name}")
def run_stage(root: str, name: str) -> StageOutcome:
    outcome = reproduce_stage(root, name)
    get_run_logger().info("stage %s %s in %.1fs", name, "ran" if outcome.ran else "was up to date", outcome.seconds)
    return outcome


@flow(name="retrain", log_prints=True)
def retrain(root: str = ".") -> dict:
    """prepare_source -> prepare_target -> pretrain -> baseline -> finetune -> evaluate -> export -> register"""
    root = str(Path(root).resolve())
    check_params(root)
    outcomes = [run_stage(root, name) for name in STAGE_ORDER]
    summary = collect_summary(root, outcomes)
    create_markdown_artifact(format_table(summary, markdown=True), key="retrain-summary", description="Graft retrain summary")
    print("\n" + format_table(summary))
    return summary
