"""Register Graft's flows as cron deployments on a process work pool of a real Prefect server: the nightly retrain
and the production check (flows/production.py)."""
from __future__ import annotations

import asyncio
from pathlib import Path

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from components.settings import Settings

RETRAIN_ENTRYPOINT = "flows/retrain.py:retrain"
CHECK_ENTRYPOINT = "flows/production.py:production_check"


async def ensure_work_pool(name: str) -> None:
    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def _deploy(root: Path, entrypoint: str, name: str, cron: str, params: Settings, description: str, paused: bool) -> str:
    """The deployment runs `entrypoint` from `root` (the project folder) with root as its parameter."""
    deployment_id = flow.from_source(source=str(root), entrypoint=entrypoint).deploy(
        name=name, work_pool_name=params.schedule.work_pool, schedule=Cron(cron, timezone=params.schedule.timezone),
        parameters={"root": str(root)}, description=description, tags=["graft"], paused=paused, print_next_steps=False,
    )
    return str(deployment_id)


def deploy_flows(root: Path, params: Settings, paused: bool = False) -> dict[str, str]:
    """Both deployments, by name -> id: the retrain on schedule.cron, the production check on production.check_cron."""
    root = Path(root).resolve()
    asyncio.run(ensure_work_pool(params.schedule.work_pool))
    return {
        f"retrain/{params.schedule.deployment}": _deploy(
            root, RETRAIN_ENTRYPOINT, params.schedule.deployment, params.schedule.cron, params,
            "Graft retraining: skips when nothing changed, retrains, gates and registers when it did", paused),
        f"production-check/{params.production.deployment}": _deploy(
            root, CHECK_ENTRYPOINT, params.production.deployment, params.production.check_cron, params,
            "Graft production check: drift and feedback labels in what the server captured; when they call for it, "
            "harvest them into a new data version and retrain", paused),
    }
