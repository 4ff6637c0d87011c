"""Alias moves as Prefect flows, for the UI and for automations: the logic is components/registry.py."""
from __future__ import annotations

from mlflow import MlflowClient
from prefect import flow

from components.config import load_params
from components.register import use_experiment
from components.registry import format_history, history, promote, rollback


def _client(params_path: str) -> tuple[MlflowClient, str]:
    params = load_params(params_path)
    use_experiment(params.registry)
    return MlflowClient(), params.registry.model_name


@flow(name="promote", log_prints=True)
def promote_flow(params_path: str = "params.yaml", version: str | None = None, reason: str = "") -> dict:
    client, name = _client(params_path)
    move = promote(client, name, version, reason=reason)
    print(format_history(history(client, name)[-2:]))
    return {"model": name, "champion": move.version, "previous": move.previous}


@flow(name="rollback", log_prints=True)
def rollback_flow(params_path: str = "params.yaml", reason: str = "") -> dict:
    client, name = _client(params_path)
    move = rollback(client, name, reason=reason)
    print(format_history(history(client, name)[-2:]))
    return {"model": name, "champion": move.version, "previous": move.previous}
