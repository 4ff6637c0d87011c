-- MLflow uses the `mlflow` database (POSTGRES_DB); Prefect gets its own.
CREATE DATABASE prefect;
