"""Register the retraining flow as a cron deployment on a process work pool of a real Prefect server."""
from __future__ import annotations

import asyncio
from pathlib import Path

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from components.settings import ScheduleParams

ENTRYPOINT = "flows/retrain.py:retrain"


async def ensure_work_pool(name: str) -> None:
    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy_retrain(root: Path, schedule: ScheduleParams, paused: bool = False) -> str:
    """The deployment runs flows/retrain.py from `root` (the project folder) with root as its parameter."""
    root = Path(root).resolve()
    asyncio.run(ensure_work_pool(schedule.work_pool))
    retrain = flow.from_source(source=str(root), entrypoint=ENTRYPOINT)
    deployment_id = retrain.deploy(
        name=schedule.deployment,
        work_pool_name=schedule.work_pool,
        schedule=Cron(schedule.cron, timezone=schedule.timezone),
        parameters={"root": str(root)},
        description="Graft retraining: skips when nothing changed, retrains, gates and registers when it did",
        tags=["graft"],
        paused=paused,
        print_next_steps=False,
    )
    return str(deployment_id)
