"""Judge a candidate against the registry as it is now: every gate, in-process, on every run.

The DVC stages produce the candidate and cache it (the same inputs give the same files). Judging is never
cached: the champion it is compared with lives in the registry and moves on its own (a promotion, a
rollback, another registry). Its report is returned typed and also written to reports/gates.{json,md} for
people and for `graft summary`.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from components import data as data_mod
from components import gates as gates_mod
from components.artifacts import atomic_path, read_json, write_json
from components.settings import Settings
from components.layout import Layout
from deploy.model import PROVIDER_NAMES, load_model
from deploy.source import FileSource, IntegrityError
from deploy.variants import FP32


def champion_predictions(params: Settings, splits: data_mod.Splits, root: Path) -> tuple[str | None, np.ndarray | None, str]:
    """The current champion's class for each test example, scored as it is served: its file fetched and checked
    against its registered sha256 as the server fetches it, its own contract applied to the test files (a champion
    at another input size is still compared on the same images). Returns the version (None: no champion), the
    predictions, and why they are not comparable ("" when they are)."""
    from mlflow import MlflowClient

    from components.registry import (
        CHAMPION,
        alias_version,
        loaded_version,
        registry_call,
        tracking_uri,
        use_experiment,
    )

    name = params.registry.model_name
    uri = tracking_uri(params.registry, root)
    with registry_call("reading the champion", uri):
        use_experiment(params.registry, root)
        version = alias_version(MlflowClient(), name, CHAMPION)
        if version is None:
            return None, None, ""
        try:
            with loaded_version(name, version, uri) as champion:
                if champion.classes != splits.classes:
                    return version, None, (f"champion v{version} predicts classes {list(champion.classes)}; this run has "
                                           f"{list(splits.classes)}: not comparable on one test split")
                predicted = gates_mod.served_predictions(champion, splits, root)
        except IntegrityError as error:  # the server refuses it too: nothing to compare with, nothing passes
            return version, None, (f"champion v{version} cannot be compared: {error}; roll back (graft rollback) or "
                                   f"promote a version whose files are intact")
    if predicted is None:
        return version, None, (f"champion v{version} takes {champion.contract.shape} images and the test split has no image "
                               f"files to decode for it (this run: {splits.x_test.shape[1:]}): not comparable")
    return version, predicted, ""


def references(root: Path, evaluation: dict) -> dict[str, tuple[float, str]]:
    """Each variant's accuracy on the prepared test arrays, and what measured it: the evaluate stage for FP32 (PyTorch),
    the export stage for INT8 and FP16 (ONNX Runtime on that file): what served accuracy is held to (contract.*.skew)."""
    measured = {FP32: (evaluation["transfer"]["accuracy"], gates_mod.EVALUATED)}
    for variant, scores in read_json(root / Layout.export_metrics).get("variants", {}).items():
        if variant != FP32 and "accuracy" in scores:
            measured[variant] = (float(scores["accuracy"]), "the export stage")
    return measured


def judge(root: str | Path, params: Settings) -> gates_mod.GateReport:
    """Every gate, its value, bound and verdict; the report is written whether the gates pass or not."""
    root = Path(root)
    gates = params.gates
    evaluation = read_json(root / Layout.evaluate_metrics)
    splits = data_mod.load_splits(root / Layout.selected_data)
    # What is served, judged as the server would serve it: every exported variant through the server's own source
    # (a file: the project's models/ folder) and load path.
    served = gates_mod.judge_served(FileSource(root / Layout.onnx_model), "file", splits, references(root, evaluation),
                                    gates, params.serving, root)
    # The paired comparison with the champion: FP32 on CPU on both sides, as the champion is read.
    fp32 = served.loaded.get(FP32)
    if fp32 is not None and fp32.provider == PROVIDER_NAMES["cpu"]:
        predicted = served.predictions[FP32]
    else:
        predicted = gates_mod.served_predictions(load_model(root / Layout.onnx_model, providers=["cpu"]), splits, root)
    served_accuracy = None if predicted is None else float((predicted == splits.y_test).mean())
    paired = evaluation["paired"]
    transfer = gates_mod.PairedComparison.from_counts(evaluation["test_examples"], paired["transfer_only"],
                                                      paired["scratch_only"], gates.confidence)
    champion_version, champion_predicted, incomparable = champion_predictions(params, splits, root)
    against_champion = None
    if incomparable:
        regression = gates_mod.Gate("no_regression", gates_mod.FAILED, None, "", incomparable)
    elif champion_version is None:
        regression = gates_mod.regression_gate(None, gates)
    else:
        against_champion = gates_mod.PairedComparison.of(predicted == splits.y_test, champion_predicted == splits.y_test,
                                                         gates.confidence)
        regression = gates_mod.regression_gate(against_champion, gates)
    report = gates_mod.GateReport(
        gates=[*gates_mod.quality_gates(evaluation, gates), gates_mod.transfer_gate(transfer, gates), regression,
               gates_mod.calibration_gate(evaluation, gates),
               *gates_mod.parity_gates(read_json(root / Layout.export_metrics)), *served.gates],
        provider=served.provider, champion_version=champion_version, served_variant=served.variant,
        variants=served.variants,
        extra={**served.extra, "served_accuracy": served_accuracy,
               "champion_accuracy": None if champion_predicted is None else float((champion_predicted == splits.y_test).mean()),
               "transfer_vs_scratch": asdict(transfer),
               "candidate_vs_champion": asdict(against_champion) if against_champion else None},
    )
    write_json(root / Layout.gate_report, report.to_dict())
    with atomic_path(root / Layout.gate_markdown) as tmp:
        tmp.write_text(report.markdown() + "\n")
    return report
