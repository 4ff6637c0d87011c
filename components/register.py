"""Publish: log a judged candidate to MLflow, add its ONNX model to the registry, apply the gates' verdict.

Publishing looks at the registry as it is now, every time, and is idempotent by content: a candidate (its
ONNX bytes, data version, source and the params that made it: `candidate_key`) already registered is found
by its tag and reported, never registered twice; a registry that does not hold it gets it. A version is
created only after its files are stored, with its tags in the same call, so a crash never leaves a version
without artifacts or a version that cannot be found again.

The run holds every param, the per-step training curves of the transferred and from-scratch models, the
evaluation and parity metrics, the plots and reports, the data versions and the source model's lineage.
The source checkpoint gets an MLflow run of its own, logged once per checkpoint (found again by its
sha256), so the many fine-tunes of one source all point at the same source run.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
from mlflow import MlflowClient
from mlflow.models import infer_signature

from components import data as data_mod
from components.artifacts import atomic_path, read_json, write_json
from components.settings import Settings
from components.evaluate import SCORE_NAMES, read_history
from components.export import cpu_session
from components.gates import GateReport
from components.layout import Layout
from components.network import ModelSpec
from components.registry import (
    candidate_key,
    find_candidate,
    judged_key,
    registry_call,
    remember_history,
    tracking_uri,
    use_experiment,
)
from components.config import SCORES
from components.source_models import SourceIdentity
from deploy.digest import sha256_file
from deploy.tags import (
    CANDIDATE_TAG,
    CARD_FOLDER,
    DATA_VERSION_KEY,
    GATES_TAG,
    JUDGED_TAG,
    ONNX_SHA_TAG,
    RUN_ID_TAG,
    SELECTION_DECIDED_BY_TAG,
    SELECTION_TAG,
    SERVING_PROVIDER_TAG,
    SOURCE_DATA_VERSION_TAG,
    SOURCE_RUN_ID_TAG,
    SOURCE_SHA_TAG,
    STAGE_TAG,
    STRATEGY_KEY,
    TARGET_DATASET_TAG,
    gate_tag,
    metric_tag,
    source_tag,
    variant_score_tag,
)
from deploy.variants import FP32, VARIANT_DIR, sha_tag, variant_path
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
    new: bool = True  # False: the registry already held this candidate


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


def source_run(params: Settings, identity, checkpoint: Path, history: list[dict], metrics: dict, data_version: str) -> str:
    """The MLflow run that pretrained this pipeline source checkpoint: found by its sha256, or logged now."""
    query = f"tags.`{SOURCE_SHA_TAG}` = '{identity.sha256}' and tags.`{STAGE_TAG}` = 'pretrain'"
    found = mlflow.search_runs(filter_string=query, max_results=1, output_format="list")
    if found:
        return found[0].info.run_id
    candidate = params.sources.pipeline[identity.name]
    with mlflow.start_run(run_name=f"pretrain-{identity.name}-{identity.sha256[:8]}") as run:
        mlflow.set_tags({SOURCE_SHA_TAG: identity.sha256, STAGE_TAG: "pretrain", source_tag("name"): identity.name,
                         SOURCE_DATA_VERSION_TAG: data_version})
        mlflow.log_params(flatten({"source": candidate.model_dump(), "pretrain": params.pretrain.model_dump()}))
        log_history(history, "pretrain")
        mlflow.log_metrics({f"source_test.{k}": v for k, v in metrics.items()})
        mlflow.log_artifact(str(checkpoint), "checkpoint")
        mlflow.log_artifact(str(checkpoint.with_suffix(".json")), "checkpoint")
        return run.info.run_id


@dataclass(frozen=True)
class RunRecord:
    """What one pipeline run produced, gathered from the stages' declared outputs."""

    params: Settings
    tags: dict[str, str]
    metrics: dict[str, float]
    histories: dict[str, list[dict]]
    artifacts: list[Path]
    onnx_path: Path
    example: np.ndarray  # a few preprocessed test inputs, float32 NCHW
    variant_scores: dict[str, dict]  # export's measurements of every variant (metrics/export.json)


def register(record: RunRecord, source_run_id: str, key: str) -> Registration:
    registry = record.params.registry
    with mlflow.start_run(run_name=f"retrain-{record.tags[STRATEGY_KEY]}-{record.tags[DATA_VERSION_KEY]}") as run:
        lineage = {SOURCE_RUN_ID_TAG: source_run_id} if source_run_id else {}  # a pipeline source's pretraining run
        mlflow.set_tags({**record.tags, STAGE_TAG: "retrain", CANDIDATE_TAG: key, **lineage})
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
            pip_requirements=ONNX_REQUIREMENTS,
            onnx_execution_providers=ONNX_PROVIDERS,
            save_as_external_data=False,  # one self-contained model.onnx: what the server downloads and loads
        )
        # Registered only now that every file is stored, with every tag in the same call.
        # The bytes MLflow stored (it serialises the proto, external data off): what a server must find again.
        stored_sha = hashlib.sha256(proto.SerializeToString()).hexdigest()
        tags = {**record.tags, **{metric_tag(k): f"{v:.6g}" for k, v in record.metrics.items()},
                RUN_ID_TAG: run.info.run_id, CANDIDATE_TAG: key, ONNX_SHA_TAG: stored_sha, **lineage}
        tags.update(log_variants(info.model_id, record.onnx_path, record.variant_scores))
        version = mlflow.register_model(info.model_uri, registry.model_name, tags={k: str(v) for k, v in tags.items()})
        return Registration(
            run_id=run.info.run_id,
            model_name=registry.model_name,
            version=str(version.version),
            model_uri=f"models:/{registry.model_name}/{version.version}",
            source_run_id=source_run_id,
            tracking_uri=mlflow.get_tracking_uri(),
        )


def log_variants(model_id: str, onnx_path: Path, scores: dict[str, dict]) -> dict[str, str]:
    """Store each export variant (export wrote only those within the accuracy bound) in the logged model's folder,
    beside model.onnx, and return the tags that publish it: its sha256 and its measured numbers."""
    tags = {}
    for variant, score in scores.items():
        path = variant_path(onnx_path, variant)
        if variant == FP32 or not path.is_file():
            continue
        MlflowClient().log_model_artifact(model_id, str(path), VARIANT_DIR)
        tags[sha_tag(variant)] = sha256_file(path)
        tags.update({variant_score_tag(variant, key): f"{score[key]:.6g}"
                     for key in ("accuracy", "accuracy_drop", "latency_ms_batch1", "latency_ms_batch64")})
    return tags


def lineage_tags(identity: SourceIdentity, params: Settings) -> dict[str, str]:
    """What the registered version says about where it came from."""
    return {
        source_tag("name"): identity.name,
        source_tag("kind"): identity.kind,
        source_tag("architecture"): identity.architecture,
        source_tag("weights"): identity.weights or identity.file,
        SOURCE_SHA_TAG: identity.sha256,
        source_tag("image_size"): str(identity.image_size),
        TARGET_DATASET_TAG: params.data.target.name,
        **({source_tag("dataset"): params.sources.pipeline[identity.name].data.name} if identity.kind == "pipeline" else {}),
    }


def run_record(root: Path, params: Settings) -> RunRecord:
    """Everything a run logs, read from the stages' declared outputs and the judge's report."""
    identity = SourceIdentity.from_dict(read_json(root / Layout.selected_source))
    evaluation = read_json(root / Layout.evaluate_metrics)
    parity = read_json(root / Layout.export_metrics)
    transfer_meta = read_json(root / Layout.transfer_model.with_suffix(".json"))
    selection = read_json(root / Layout.selection_report)
    metrics = {
        "test.accuracy": evaluation["transfer"]["accuracy"], "test.macro_f1": evaluation["transfer"]["macro_f1"],
        "test.balanced_accuracy": evaluation["transfer"]["balanced_accuracy"],
        "scratch.test.accuracy": evaluation["scratch"]["accuracy"], "scratch.test.macro_f1": evaluation["scratch"]["macro_f1"],
        "transfer_gain": evaluation["transfer_gain"],
        **{f"calibration.{key}": float(value) for key, value in evaluation["calibration"].items()},
        "onnx.max_abs_diff": parity["max_abs_diff"], "onnx.argmax_agreement": parity["argmax_agreement"],
        **{f"onnx.{variant}.{key}": float(score[key]) for variant, score in parity.get("variants", {}).items()
           for key in ("accuracy", "latency_ms_batch1", "latency_ms_batch64", "onnx_bytes", "published")},
    }
    for candidate in selection["candidates"]:
        metrics.update({f"selection.{candidate['name']}.{score}": candidate[score] for score in SCORES})
    if race := selection.get("race"):  # each racer's validation accuracy in the last rung it ran
        for rung in race["rungs"]:
            metrics.update({f"selection.{name}.race_val_accuracy": value for name, value in rung["accuracy"].items()})
    for name, scores in read_json(root / Layout.per_class)["transfer"].items():
        metrics.update({f"test.{metric}.{name}": value for metric, value in scores.items() if metric in SCORE_NAMES})
    tags = {
        **lineage_tags(identity, params),
        DATA_VERSION_KEY: transfer_meta["data_version"],
        STRATEGY_KEY: transfer_meta["strategy"],
        SELECTION_TAG: f"{selection['mode']}: {selection['chosen']} by {selection['score']} over {', '.join(selection['ranking'])}",
        SELECTION_DECIDED_BY_TAG: selection["decided_by"][:5000],  # MLflow's tag values hold 8000 characters
    }
    splits = data_mod.load_splits(root / Layout.selected_data)
    contract = ModelSpec.from_dict(read_json(root / Layout.selected_architecture)).contract
    artifacts = [root / p for p in (
        Layout.confusion_transfer, Layout.confusion_scratch, Layout.curves, Layout.predictions, Layout.evaluate_metrics, Layout.per_class,
        Layout.classification_report, Layout.calibration, Layout.reliability, Layout.mistakes_gallery, Layout.correct_gallery,
        Layout.gallery, Layout.transfer_model, Layout.transfer_model.with_suffix(".json"),  # for `graft explain`
        Layout.export_metrics, Layout.target_report, Layout.selection_report, Layout.selection_markdown, Layout.selection_plot,
        Layout.gate_report, Layout.gate_markdown, Layout.transfer_history, Layout.scratch_history,
    ) if (root / p).exists()]
    return RunRecord(
        params=params, tags=tags, metrics=metrics,
        histories={"transfer": read_history(root / Layout.transfer_history), "scratch": read_history(root / Layout.scratch_history)},
        artifacts=artifacts, onnx_path=root / Layout.onnx_model, example=contract.normalize(splits.x_test[:4]),
        variant_scores=parity.get("variants", {}),
    )


def _source_run_id(root: Path, params: Settings) -> str:
    identity = SourceIdentity.from_dict(read_json(root / Layout.selected_source))
    if identity.kind != "pipeline":
        return ""
    checkpoint = root / Layout.source_model(identity.name)
    return source_run(params, identity, checkpoint, read_history(root / Layout.pretrain_history(identity.name)),
                      read_json(root / Layout.pretrain_metrics(identity.name)),
                      read_json(checkpoint.with_suffix(".json"))["data_version"])


def _existing(client: MlflowClient, name: str, version: str) -> Registration:
    found = client.get_model_version(name, version)
    return Registration(run_id=found.run_id, model_name=name, version=version, model_uri=f"models:/{name}/{version}",
                        source_run_id=found.tags.get(SOURCE_RUN_ID_TAG, ""), tracking_uri=mlflow.get_tracking_uri(),
                        new=False)


def publish(root: str | Path, params: Settings, report: GateReport) -> dict:
    """Register the candidate unless the registry already holds it, then apply the verdict (tags, aliases)."""
    root = Path(root)
    name = params.registry.model_name
    with registry_call("publishing the candidate", tracking_uri(params.registry, root)):
        use_experiment(params.registry, root)
        key = candidate_key(root, params)
        version = find_candidate(MlflowClient(), name, key)
        if version is None:
            registration = register(run_record(root, params), _source_run_id(root, params), key)
        else:
            registration = _existing(MlflowClient(), name, version)
        log_card(root, params, asdict(registration), report)  # before any alias: no version is served without one
        outcome = {**asdict(registration), **apply_gate_verdict(params, asdict(registration), report)}
        remember_history(MlflowClient(), root, params.registry)
    write_json(root / Layout.registration, outcome)
    return outcome


def log_card(root: Path, params: Settings, registration: dict, report: GateReport) -> Path:
    """The version's model card (components/card.py), in reports/ and beside the version's ONNX files in the registry
    (where `graft card VERSION` and the server read it); written again, whole, each time the version is judged."""
    from components.card import model_card

    path = root / Layout.model_card
    with atomic_path(path) as tmp:
        tmp.write_text(model_card(root, params, registration, report.to_dict()))
    client = MlflowClient()
    version = client.get_model_version(registration["model_name"], registration["version"])
    # MLflow 3 registers a logged model ("models:/m-..." is its URI); the version does not always fill model_id.
    model_id = version.model_id or version.source.removeprefix("models:/")
    for file in (path, root / Layout.mistakes_gallery):
        if file.exists():
            client.log_model_artifact(model_id, str(file), CARD_FOLDER)
    return path


def apply_gate_verdict(params: Settings, registration: dict, report: GateReport) -> dict:
    """Tag the version with every gate's result; give it `challenger` only if all passed; promote it when
    promotion.auto_promote is on, or when there is no champion yet. Applying a verdict twice changes nothing."""
    from components.registry import (
        CHALLENGER,
        CHAMPION,
        alias_version,
        move_alias,
        promote,
    )

    client = MlflowClient()
    name, version, run_id = registration["model_name"], registration["version"], registration["run_id"]
    tags = {GATES_TAG: "passed" if report.passed else "failed", SERVING_PROVIDER_TAG: report.provider,
            JUDGED_TAG: judged_key(params)}
    for gate in report.gates:
        value = "" if gate.value is None else f"{gate.value:.6g}"
        tags.update({gate_tag(gate.name, "verdict"): gate.verdict, gate_tag(gate.name, "value"): value, gate_tag(gate.name, "bound"): gate.bound})
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if not report.passed:
        return {"gates_passed": False, "challenger": False, "promoted": False}
    if alias_version(client, name, CHALLENGER) != version:
        move_alias(client, name, CHALLENGER, version, "challenger", "passed every gate", run_id,
                   params.serving.switch_lead_seconds)
    champion = alias_version(client, name, CHAMPION)
    # With the shadow gate required, only the first model is promoted here: a later one has no live evidence yet.
    automatic = params.promotion.auto_promote and not params.promotion.shadow.required
    if champion != version and (automatic or champion is None):
        reason = "first model to pass every gate" if champion is None else "auto_promote: passed every gate"
        promote(client, name, version, reason=reason, run_id=run_id, lead_seconds=params.serving.switch_lead_seconds)
    return {"gates_passed": True, "challenger": True, "promoted": alias_version(client, name, CHAMPION) == version}
