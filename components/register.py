"""Register: log a pipeline run to MLflow and add the ONNX model to the registry as a new version.

The run holds every param, the per-step training curves of the transferred and from-scratch models, the
evaluation and parity metrics, the plots and reports, the data versions and the source model's lineage.
The source checkpoint gets an MLflow run of its own, logged once per checkpoint (found again by its
sha256), so the many fine-tunes of one source all point at the same source run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
from mlflow import MlflowClient
from mlflow.models import infer_signature

from components.config import Params, RegistryParams, load_params
from components.export import cpu_session

SOURCE_SHA_TAG = "graft.source.sha256"
ONNX_REQUIREMENTS = ["onnxruntime-gpu==1.31.1", "onnx==1.23.2", "numpy"]
ONNX_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@dataclass(frozen=True)
class Registration:
    run_id: str
    model_name: str
    version: str
    model_uri: str
    source_run_id: str
    tracking_uri: str


def tracking_uri(registry: RegistryParams) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or registry.tracking_uri


def use_experiment(registry: RegistryParams) -> str:
    """Point MLflow at the configured store and experiment (created with its artifact folder if new)."""
    uri = tracking_uri(registry)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(registry.experiment)
    if experiment is None and uri.startswith(("http://", "https://")):
        # A tracking server stores artifacts where it was told (--artifacts-destination), not in our folder.
        experiment_id = mlflow.create_experiment(registry.experiment)
    elif experiment is None:
        location = registry.artifact_location
        if "://" not in location:
            location = Path(location).resolve().as_uri()
        experiment_id = mlflow.create_experiment(registry.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def open_registry(params_path: str | Path) -> tuple[MlflowClient, str]:
    """A client on the configured store, and the registered model's name: what alias commands work on."""
    params = load_params(params_path)
    use_experiment(params.registry)
    return MlflowClient(), params.registry.model_name


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_history(history: list[dict], prefix: str) -> None:
    for record in history:
        metrics = {f"{prefix}.{k}": float(v) for k, v in record.items() if k not in ("step", "phase", "epoch")}
        mlflow.log_metrics(metrics, step=int(record["step"]))


def source_run(params: Params, identity, checkpoint: Path, history: list[dict], metrics: dict, data_version: str) -> str:
    """The MLflow run that pretrained this pipeline source checkpoint: found by its sha256, or logged now."""
    query = f"tags.`{SOURCE_SHA_TAG}` = '{identity.sha256}' and tags.`graft.stage` = 'pretrain'"
    found = mlflow.search_runs(filter_string=query, max_results=1, output_format="list")
    if found:
        return found[0].info.run_id
    candidate = params.sources.pipeline[identity.name]
    with mlflow.start_run(run_name=f"pretrain-{identity.name}-{identity.sha256[:8]}") as run:
        mlflow.set_tags({SOURCE_SHA_TAG: identity.sha256, "graft.stage": "pretrain", "graft.source.name": identity.name,
                         "graft.source_data_version": data_version})
        mlflow.log_params(flatten({"source": candidate.model_dump(), "pretrain": params.pretrain.model_dump()}))
        log_history(history, "pretrain")
        mlflow.log_metrics({f"source_test.{k}": v for k, v in metrics.items()})
        mlflow.log_artifact(str(checkpoint), "checkpoint")
        mlflow.log_artifact(str(checkpoint.with_suffix(".json")), "checkpoint")
        return run.info.run_id


@dataclass(frozen=True)
class RunRecord:
    """What one pipeline run produced, gathered from the stages' declared outputs."""

    params: Params
    tags: dict[str, str]
    metrics: dict[str, float]
    histories: dict[str, list[dict]]
    artifacts: list[Path]
    onnx_path: Path
    example: np.ndarray  # a few preprocessed test inputs, float32 NCHW


def register(record: RunRecord, source_run_id: str) -> Registration:
    registry = record.params.registry
    client = MlflowClient()
    with mlflow.start_run(run_name=f"retrain-{record.tags['graft.strategy']}-{record.tags['graft.data_version']}") as run:
        lineage = {"graft.source_run_id": source_run_id} if source_run_id else {}  # a pipeline source's pretraining run
        mlflow.set_tags({**record.tags, "graft.stage": "retrain", **lineage})
        mlflow.log_params(flatten(record.params.model_dump()))
        for name, history in record.histories.items():
            log_history(history, name)
        mlflow.log_metrics(record.metrics)
        for artifact in record.artifacts:
            mlflow.log_artifact(str(artifact), artifact.parent.name)
        proto = onnx.load(str(record.onnx_path))
        outputs = cpu_session(record.onnx_path).run(None, {proto.graph.input[0].name: record.example})[0]
        # MLflow test-loads the model with the GPU providers; on a CPU-only machine ONNX Runtime prints a
        # long libcuda error for that. MLflow's own warning still says which providers were dropped.
        ort.set_default_logger_severity(4)
        info = mlflow.onnx.log_model(
            proto,
            name="model",
            signature=infer_signature(record.example, outputs),
            input_example=record.example,
            registered_model_name=registry.model_name,
            pip_requirements=ONNX_REQUIREMENTS,
            onnx_execution_providers=ONNX_PROVIDERS,
            save_as_external_data=False,  # one self-contained model.onnx: what the server downloads and loads
        )
        version = str(info.registered_model_version)
        for key, value in {**record.tags, **{f"metric.{k}": f"{v:.6g}" for k, v in record.metrics.items()},
                           "graft.run_id": run.info.run_id, **lineage}.items():
            client.set_model_version_tag(registry.model_name, version, key, str(value))
        return Registration(
            run_id=run.info.run_id,
            model_name=registry.model_name,
            version=version,
            model_uri=f"models:/{registry.model_name}/{version}",
            source_run_id=source_run_id,
            tracking_uri=mlflow.get_tracking_uri(),
        )


def apply_gate_verdict(params: Params, registration: dict, report: dict) -> dict:
    """Tag the new version with every gate's result; give it `challenger` only if all passed; promote it
    when promotion.auto_promote is on, or when there is no champion yet."""
    from components.registry import (
        CHALLENGER,
        CHAMPION,
        GATES_TAG,
        alias_version,
        move_alias,
        promote,
    )

    client = MlflowClient()
    name, version, run_id = registration["model_name"], registration["version"], registration["run_id"]
    client.set_model_version_tag(name, version, GATES_TAG, "passed" if report["passed"] else "failed")
    client.set_model_version_tag(name, version, "graft.serving_provider", report["provider"])
    for gate in report["gates"]:
        value = "" if gate["value"] is None else f"{gate['value']:.6g}"
        for field, text in (("verdict", gate["verdict"]), ("value", value), ("bound", gate["bound"])):
            client.set_model_version_tag(name, version, f"gate.{gate['name']}.{field}", text)
    if not report["passed"]:
        return {"gates_passed": False, "challenger": False, "promoted": False}
    move_alias(client, name, CHALLENGER, version, "challenger", "passed every gate", run_id)
    first = alias_version(client, name, CHAMPION) is None
    if params.promotion.auto_promote or first:
        reason = "first model to pass every gate" if first else "auto_promote: passed every gate"
        promote(client, name, version, reason=reason, run_id=run_id)
    return {"gates_passed": True, "challenger": True, "promoted": params.promotion.auto_promote or first}
