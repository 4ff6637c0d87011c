"""The pipeline's stages: each reads params.yaml and writes exactly the outputs dvc.yaml declares for it.

`graft stage NAME` runs one of these; DVC runs that command; the Prefect flow asks DVC to run it. All paths
are relative to the project folder (the one holding dvc.yaml and params.yaml).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from components import data as data_mod
from components.artifacts import atomic_path, read_json, sha256_file, write_json
from components.config import Params, load_params
from components.evaluate import plot_confusion, plot_curves, read_history, score, write_history, write_predictions
from components.export import check_parity, export_onnx
from components.model import ModelSpec, build, graft, load_checkpoint, save_checkpoint
from components.train import Normalizer, Phase, predict_logits, strategy_phases, train


class Layout:
    """Where every stage output lives; dvc.yaml names the same paths (a test keeps them in step)."""

    source_data = Path("data/prepared/source.npz")
    target_data = Path("data/prepared/target.npz")
    source_report = Path("reports/prepare-source.json")
    target_report = Path("reports/prepare-target.json")
    source_model = Path("models/source.pt")
    transfer_model = Path("models/transfer.pt")
    scratch_model = Path("models/scratch.pt")
    onnx_model = Path("models/model.onnx")
    pretrain_metrics = Path("metrics/pretrain.json")
    evaluate_metrics = Path("metrics/evaluate.json")
    export_metrics = Path("metrics/export.json")
    pretrain_history = Path("plots/pretrain_history.csv")
    transfer_history = Path("plots/transfer_history.csv")
    scratch_history = Path("plots/scratch_history.csv")
    predictions = Path("plots/test_predictions.csv")
    per_class = Path("reports/per-class.json")
    confusion_transfer = Path("plots/confusion_transfer.png")
    confusion_scratch = Path("plots/confusion_scratch.png")
    curves = Path("plots/curves.png")
    gate_report = Path("reports/gates.json")
    gate_markdown = Path("reports/gates.md")
    registration = Path("outputs/registration.json")


def model_spec(params: Params, classes: tuple[str, ...]) -> ModelSpec:
    return ModelSpec(
        in_channels=params.data.channels, image_size=params.data.image_size, widths=tuple(params.model.widths),
        classes=classes, mean=tuple(params.data.mean), std=tuple(params.data.std),
    )


def prepare_source(params: Params) -> data_mod.PrepareResult:
    # The source's optional k-a-class cut follows split_seed: the target's seed must not touch pretraining.
    return data_mod.prepare(params.data.source, params.data, params.data.split_seed, Layout.source_data, Layout.source_report)


def prepare_target(params: Params) -> data_mod.PrepareResult:
    return data_mod.prepare(params.data.target, params.data, params.seed, Layout.target_data, Layout.target_report)


def pretrain(params: Params) -> dict:
    splits = data_mod.load_splits(Layout.source_data)
    model = build(model_spec(params, splits.classes), params.pretrain.seed)
    steps = params.pretrain.epochs * -(-len(splits.y_train) // params.pretrain.batch_size)
    started = time.perf_counter()
    history = train(model, splits, params.pretrain, [Phase("pretrain", steps, 1.0)], params.pretrain.seed, desc="pretrain")
    seconds = time.perf_counter() - started
    test = score(splits.y_test, predict_logits(model, splits.x_test, _normalizer(model)).argmax(1).numpy(), splits.classes)
    metrics = {"test_accuracy": test.accuracy, "test_macro_f1": test.macro_f1, "steps": steps}
    # Timing goes with the checkpoint, not the metrics: metrics must be identical on a rerun.
    save_checkpoint(model, Layout.source_model, {"data_version": data_mod.data_version(Layout.source_data),
                                                 "metrics": metrics, "train_seconds": seconds})
    write_history(history, Layout.pretrain_history)
    write_json(Layout.pretrain_metrics, metrics)
    return metrics


def _normalizer(model) -> Normalizer:
    return Normalizer.of(model.spec.mean, model.spec.std)


def _train_target(params: Params, strategy: str, out: Path, history_path: Path) -> dict:
    splits = data_mod.load_splits(Layout.target_data)
    spec = model_spec(params, splits.classes)
    if strategy == "scratch":
        model = build(spec, params.seed)
    else:
        source, _ = load_checkpoint(Layout.source_model)
        model = graft(source, spec, params.seed)
    started = time.perf_counter()
    history = train(model, splits, params.finetune, strategy_phases(params.finetune, strategy), params.seed, desc=strategy)
    extra = {"strategy": strategy, "data_version": data_mod.data_version(Layout.target_data), "train_seconds": time.perf_counter() - started}
    if strategy != "scratch":
        extra["source_sha256"] = sha256_file(Layout.source_model)
    save_checkpoint(model, out, extra)
    write_history(history, history_path)
    return extra


def baseline(params: Params) -> dict:
    """The from-scratch model on the same target data, steps and augmentation: what transfer must beat."""
    return _train_target(params, "scratch", Layout.scratch_model, Layout.scratch_history)


def finetune(params: Params) -> dict:
    return _train_target(params, params.finetune.strategy, Layout.transfer_model, Layout.transfer_history)


def evaluate(params: Params) -> dict:  # noqa: ARG001 - every stage takes params
    splits = data_mod.load_splits(Layout.target_data)
    results, strategies, per_class = {}, {}, {}
    for label, path, plot in (("transfer", Layout.transfer_model, Layout.confusion_transfer),
                              ("scratch", Layout.scratch_model, Layout.confusion_scratch)):
        model, meta = load_checkpoint(path)
        predicted = predict_logits(model, splits.x_test, _normalizer(model)).argmax(1).numpy()
        evaluation = score(splits.y_test, predicted, splits.classes)
        plot_confusion(evaluation, splits.classes, f"{label} ({meta['strategy']}) on the test split", plot)
        strategies[label] = meta["strategy"]
        results[label] = {"accuracy": evaluation.accuracy, "macro_f1": evaluation.macro_f1}
        per_class[label] = evaluation.per_class
        if label == "transfer":
            write_predictions(splits.y_test, predicted, splits.classes, Layout.predictions)
    results["transfer_gain"] = results["transfer"]["accuracy"] - results["scratch"]["accuracy"]
    results["test_examples"] = int(len(splits.y_test))
    plot_curves({"transfer": read_history(Layout.transfer_history), "scratch": read_history(Layout.scratch_history)},
                Layout.curves, f"target training ({strategies['transfer']} vs scratch)")
    write_json(Layout.per_class, per_class)
    write_json(Layout.evaluate_metrics, results)
    return results


def export(params: Params) -> dict:
    model, meta = load_checkpoint(Layout.transfer_model)
    export_onnx(model, Layout.onnx_model, params.export.opset, {
        "graft.strategy": meta["strategy"], "graft.data_version": meta["data_version"],
        "graft.source_sha256": meta.get("source_sha256", ""),
    })
    splits = data_mod.load_splits(Layout.target_data)
    parity = check_parity(model, Layout.onnx_model, splits.x_test, params.export.parity_atol)
    # Metrics only: the exporter's bytes are not reproducible (DVC's lock keeps the file's hash).
    result = {**asdict(parity), "passed": parity.passed, "onnx_bytes": Layout.onnx_model.stat().st_size}
    write_json(Layout.export_metrics, result)
    if not parity.passed:
        raise RuntimeError(
            f"ONNX parity failed: max |diff| {parity.max_abs_diff:.2e} (allowed {parity.atol:.0e}), "
            f"top-1 agreement {parity.argmax_agreement:.4f} (need 1.0); the model is not registered"
        )
    return result


def _score_champion(params: Params, x_test: np.ndarray, y_test: np.ndarray, classes: tuple[str, ...]) -> tuple[str | None, float | None, str]:
    """The current champion's accuracy on this run's test split, scored with ONNX Runtime as it is served."""
    from mlflow import MlflowClient

    from components import register as register_mod
    from components.registry import CHAMPION, alias_version, loaded_version
    from deploy.model import normalize

    register_mod.use_experiment(params.registry)
    version = alias_version(MlflowClient(), params.registry.model_name, CHAMPION)
    if version is None:
        return None, None, ""
    with loaded_version(params.registry.model_name, version) as champion:
        if champion.contract.shape != x_test.shape[1:] or champion.classes != classes:
            return version, None, (f"champion v{version} takes {champion.contract.shape} images of classes {list(champion.classes)}; "
                                   f"this run has {x_test.shape[1:]} and {list(classes)}: not comparable on one test split")
        logits = np.concatenate([champion.run(normalize(x_test[i : i + 512], champion.contract)) for i in range(0, len(x_test), 512)])
    return version, score(y_test, logits.argmax(1), classes).accuracy, ""


def gate(params: Params) -> dict:
    """Every gate, its value, bound and verdict; the report is written whether the gates pass or not."""
    from components import gates as gates_mod

    evaluation = read_json(Layout.evaluate_metrics)
    splits = data_mod.load_splits(Layout.target_data)
    champion_version, champion_accuracy, incomparable = _score_champion(params, splits.x_test, splits.y_test, splits.classes)
    regression = gates_mod.regression_gate(evaluation["transfer"]["accuracy"], champion_accuracy, params.gates)
    if incomparable:
        regression = gates_mod.Gate("no_regression", gates_mod.FAILED, None, "", incomparable)
    serving, provider, extra = gates_mod.serving_gates(Layout.onnx_model, splits.x_test, splits.y_test, params.gates, params.serving)
    report = gates_mod.GateReport(
        gates=[*gates_mod.quality_gates(evaluation, params.gates), gates_mod.transfer_gate(evaluation, params.gates),
               regression, *gates_mod.parity_gates(read_json(Layout.export_metrics)), *serving],
        provider=provider, champion_version=champion_version,
        extra={**extra, "champion_accuracy": champion_accuracy},
    )
    write_json(Layout.gate_report, report.to_dict())
    with atomic_path(Layout.gate_markdown) as tmp:
        tmp.write_text(report.markdown() + "\n")
    return report.to_dict()


def register(params: Params) -> dict:
    from components import register as register_mod  # mlflow takes seconds to import; only this stage needs it

    register_mod.use_experiment(params.registry)
    source_meta = read_json(Layout.source_model.with_suffix(".json"))
    source_sha = sha256_file(Layout.source_model)
    source_run_id = register_mod.source_run(
        params, source_sha, Layout.source_model, read_history(Layout.pretrain_history),
        read_json(Layout.pretrain_metrics), source_meta["data_version"],
    )
    evaluation = read_json(Layout.evaluate_metrics)
    parity = read_json(Layout.export_metrics)
    transfer_meta = read_json(Layout.transfer_model.with_suffix(".json"))
    metrics = {
        "test.accuracy": evaluation["transfer"]["accuracy"], "test.macro_f1": evaluation["transfer"]["macro_f1"],
        "scratch.test.accuracy": evaluation["scratch"]["accuracy"], "scratch.test.macro_f1": evaluation["scratch"]["macro_f1"],
        "transfer_gain": evaluation["transfer_gain"],
        "onnx.max_abs_diff": parity["max_abs_diff"], "onnx.argmax_agreement": parity["argmax_agreement"],
        "source.test.accuracy": source_meta["metrics"]["test_accuracy"],
    }
    for name, scores in read_json(Layout.per_class)["transfer"].items():
        metrics.update({f"test.{metric}.{name}": value for metric, value in scores.items()})
    tags = {
        "graft.data_version": transfer_meta["data_version"],
        "graft.source_data_version": source_meta["data_version"],
        "graft.source_sha256": source_sha,
        "graft.strategy": transfer_meta["strategy"],
        "graft.target_dataset": params.data.target.name,
        "graft.source_dataset": params.data.source.name,
    }
    splits = data_mod.load_splits(Layout.target_data)
    model, _ = load_checkpoint(Layout.transfer_model)
    example = _normalizer(model)(torch.from_numpy(splits.x_test[:4])).numpy().astype(np.float32)
    artifacts = [p for p in (
        Layout.confusion_transfer, Layout.confusion_scratch, Layout.curves, Layout.predictions, Layout.evaluate_metrics, Layout.per_class,
        Layout.export_metrics, Layout.pretrain_metrics, Layout.source_report, Layout.target_report,
        Layout.gate_report, Layout.gate_markdown,
        Layout.transfer_history, Layout.scratch_history,
    ) if p.exists()]
    record = register_mod.RunRecord(
        params=params, tags=tags, metrics=metrics,
        histories={"transfer": read_history(Layout.transfer_history), "scratch": read_history(Layout.scratch_history)},
        artifacts=artifacts, onnx_path=Layout.onnx_model, example=example,
    )
    registration = asdict(register_mod.register(record, source_run_id))
    registration.update(register_mod.apply_gate_verdict(params, registration, read_json(Layout.gate_report)))
    write_json(Layout.registration, registration)
    return registration


STAGES: dict[str, Callable[[Params], object]] = {
    "prepare_source": prepare_source,
    "prepare_target": prepare_target,
    "pretrain": pretrain,
    "baseline": baseline,
    "finetune": finetune,
    "evaluate": evaluate,
    "export": export,
    "gate": gate,
    "register": register,
}


def run_stage(name: str, params_path: str | Path = "params.yaml") -> object:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name](load_params(params_path))
