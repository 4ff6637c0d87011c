"""The tracking and orchestration services on PostgreSQL, stated once: deploy/compose.yaml runs them so in
production and the tests start them so (tests/test_postgres.py; tests/test_deploy_files.py holds the compose file
to the same flags and settings).

MLflow: `mlflow server` with its backend store on PostgreSQL and the artifacts proxied by the server
(`--serve-artifacts`): clients need only the server's URL, never the artifact store's credentials. Prefect: the
server's database on the same PostgreSQL (its own database), by Prefect's own setting.
"""
from __future__ import annotations

PREFECT_DATABASE_SETTING = "PREFECT_API_DATABASE_CONNECTION_URL"


def mlflow_store_url(postgres: str, database: str = "mlflow") -> str:
    """`postgres`: user:password@host:port."""
    return f"postgresql://{postgres}/{database}"


def prefect_database_url(postgres: str, database: str = "prefect") -> str:
    return f"postgresql+asyncpg://{postgres}/{database}"


def mlflow_server_args(backend_store_uri: str, artifacts_destination: str, host: str, port: int, workers: int = 2) -> list[str]:
    """The arguments of `mlflow server` (after the program's name)."""
    return ["server", "--host", host, "--port", str(port), "--workers", str(workers),
            "--backend-store-uri", backend_store_uri, "--artifacts-destination", artifacts_destination, "--serve-artifacts"]


# Settings both the compose file and the tests give the MLflow server's environment.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
