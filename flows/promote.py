"""Alias moves as Prefect flows, for the UI and for automations: the logic is components/registry.py."""
from __future__ import annotations

from prefect import flow

from components.registry import (
    format_history,
    history,
    open_registry,
    promote,
    rollback,
)


@flow(name="promote", log_prints=True)
def promote_flow(params_path: str = "params.yaml", version: str | None = None, reason: str = "") -> dict:
    client, name = open_registry(params_path)
    move = promote(client, name, version, reason=reason)
    print(format_history(history(client, name)[-2:]))
    return {"model": name, "champion": move.version, "previous": move.previous}


@flow(name="rollback", log_prints=True)
def rollback_flow(params_path: str = "params.yaml", reason: str = "") -> dict:
    client, name = open_registry(params_path)
    move = rollback(client, name, reason=reason)
    print(format_history(history(client, name)[-2:]))
    return {"model": name, "champion": move.version, "previous": move.previous}
