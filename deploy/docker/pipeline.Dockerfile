# The retraining side: Graft with torch, Prefect, DVC and MLflow; runs the Prefect worker.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /srv/graft
COPY . /srv/graft
RUN pip install --no-cache-dir -e . && useradd --system --uid 10001 graft && chown -R graft /srv/graft
USER graft
