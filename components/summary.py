"""The run at a glance: a short table read from the stages' declared outputs, for the terminal and Prefect."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from components.artifacts import read_json
from components.dvc_runner import StageOutcome
from components.errors import GraftError
from components.layout import Layout


class NoRunYet(GraftError):
    pass


@dataclass(frozen=True)
class RunOutputs:
    """The stages' declared outputs that describe a run: what the summary and the model card are read from."""

    target: dict      # the prepare_target report
    selection: dict   # the source selection report
    source: dict      # the selected source's identity
    evaluation: dict  # metrics/evaluate.json
    export: dict      # metrics/export.json
    trained: dict     # the fine-tuned checkpoint's metadata
    calibration: dict  # the shipped temperature and how it was set

    # The files, in the fields' order.
    paths: ClassVar[tuple[Path, ...]] = (
        Layout.target_report, Layout.selection_report, Layout.selected_source, Layout.evaluate_metrics,
        Layout.export_metrics, Layout.transfer_model.with_suffix(".json"), Layout.calibration)

    @classmethod
    def read(cls, root: Path) -> RunOutputs:
        return cls(*(read_json(root / path) for path in cls.paths))


def collect_summary(root: str | Path, outcomes: list[StageOutcome] | None = None, registration: dict | None = None,
                    gate_report: dict | None = None) -> dict:
    """The run at a glance, read from the stages' declared outputs; the registration and gate report as the run
    holds them (read from outputs/ and reports/ when not given: `graft summary`)."""
    root = Path(root)
    if missing := [str(path) for path in (*RunOutputs.paths, Layout.per_class) if not (root / path).exists()]:
        # A clone has the committed metrics and reports but not DVC's outputs until a run or `dvc pull`.
        raise NoRunYet(f"no pipeline outputs in {root.resolve()} ({', '.join(missing)} missing): run `graft run` "
                       "(or `dvc repro`) first, or `dvc pull` them from the project's DVC remote")
    run = RunOutputs.read(root)
    target, selection, source, evaluation = run.target, run.selection, run.source, run.evaluation
    parity, transfer_meta = run.export, run.trained
    if registration is None:
        registration = read_json(root / Layout.registration) if (root / Layout.registration).exists() else {}
    if gate_report is None and (root / Layout.gate_report).exists():
        gate_report = read_json(root / Layout.gate_report)
    scores = {c["name"]: c[selection["score"]] for c in selection["candidates"]}
    ranking = ", ".join(f"{name} {scores[name]:.3f}" for name in selection["ranking"])
    return {
        "target data": f"{target['dataset']} @ {target['data_version']} "
                       f"(train {target['counts']['train']}, test {target['counts']['test']}, quarantined {target['quarantined']})",
        "source": f"{source['name']} ({source['kind']}: {source['architecture']}, {source['weights'] or source['file']}, "
                  f"{source['image_size']} px)" + _pretrained_line(root, source),
        "source scores": f"{selection['score']}: {ranking}",
        "selection": f"{selection['chosen']}, {selection['decided_by']}",
        "strategy": transfer_meta["strategy"],
        "transfer test acc": _accuracy_line(evaluation["transfer"]),
        "scratch test acc": _accuracy_line(evaluation["scratch"]) + ", same architecture",
        "transfer gain": f"{100 * evaluation['transfer_gain']:+.2f} points",
        "calibration": _calibration_line(evaluation["calibration"], run.calibration),
        "ONNX parity": f"max |diff| {parity['max_abs_diff']:.1e}, top-1 agreement {parity['argmax_agreement']:.4f}",
        "export variants": _variants_line(parity.get("variants", {}), parity["examples"]),
        "gates": _gate_line(gate_report),
        "model version": _version_line(registration),
        "stages": ", ".join(f"{o.name} {'ran' if o.ran else 'skipped'} {o.seconds:.0f}s" for o in outcomes) if outcomes else "",
    }


def _pretrained_line(root: Path, source: dict) -> str:
    if source["kind"] != "pipeline":
        return ""
    metrics = read_json(root / Layout.pretrain_metrics(source["name"]))
    return f", source test acc {metrics['test_accuracy']:.4f}"


def _accuracy_line(scores: dict) -> str:
    return (f"{scores['accuracy']:.4f} (balanced {scores['balanced_accuracy']:.4f}, "
            f"macro-F1 {scores['macro_f1']:.4f})")


def _calibration_line(calibration: dict, temperature: dict) -> str:
    return (f"test ECE {calibration['ece']:.4f} (uncalibrated {calibration['ece_before']:.4f}), "
            f"NLL {calibration['nll']:.4f} ({calibration['nll_before']:.4f}); "
            f"T = {calibration['temperature']:.3g}, {temperature['fit']}")


def _variants_line(variants: dict[str, dict], examples: int) -> str:
    """Each export variant's test accuracy and CPU batch-64 latency, and whether it was published; a refusal counts
    the test images it stands on (on a small split one image can be more than the whole bound)."""
    return "; ".join(
        f"{name} {score['accuracy']:.4f}, {score['latency_ms_batch64']:.1f} ms/64 on CPU"
        + ("" if score["published"] else f" (not published: {100 * score['accuracy_drop']:.2f} points below fp32: a net "
                                         f"{round(score['accuracy_drop'] * examples)} of {examples} test images)")
        for name, score in variants.items())


def _gate_line(report: dict | None) -> str:
    if report is None:
        return "not run"
    failed = [g["name"] for g in report["gates"] if g["verdict"] == "failed"]
    served = f"; graft serve here serves {report['served_variant']}" if report.get("served_variant") else ""
    return ("all passed" if report["passed"] else f"FAILED: {', '.join(failed)}") + f" (serving check on {report['provider']}{served})"


def _version_line(registration: dict) -> str:
    if not registration:
        return "not registered"
    aliases = [alias for alias, held in (("challenger", registration.get("challenger")), ("champion", registration.get("promoted"))) if held]
    found = "" if registration.get("new", True) else ", already registered: not duplicated"
    return (f"{registration['model_name']} v{registration['version']}"
            + (f" ({', '.join(aliases)}{found})" if aliases else f" (no alias: gates failed{found})"))


def summary_text(root: str | Path, summary: dict) -> str:
    """The summary table, then the fine-tuned model's classification report on the test split."""
    from components.evaluate import classification_report

    root = Path(root)
    accuracy = read_json(root / Layout.evaluate_metrics)["transfer"]["accuracy"]
    report = classification_report(read_json(root / Layout.per_class)["transfer"], accuracy)
    return f"{format_table(summary)}\n\nclassification report (transfer, test split)\n{report}"


def format_table(summary: dict, markdown: bool = False) -> str:
    rows = [(k, v) for k, v in summary.items() if v]
    if markdown:
        return "\n".join(["| item | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    width = max(len(k) for k, _ in rows)
    # A long value (the list of stages' times) wraps between its items to the terminal's width (120 columns in a
    # log file), under its own column.
    columns = max(width + 40, shutil.get_terminal_size((120, 24)).columns - 1)
    lines = [line for k, v in rows for line in _wrap_items(str(v), f"{k.ljust(width)}  ", columns)]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def _wrap_items(value: str, label: str, columns: int) -> list[str]:
    """`label` + value, broken only after the ", " between items, continuation lines indented under the value."""
    lines = [label]
    for item in value.split(", "):
        if len(lines[-1]) > len(label) and len(lines[-1]) + 2 + len(item) > columns:
            lines[-1] += ","
            lines.append(" " * len(label))
        lines[-1] += item if len(lines[-1]) == len(label) else ", " + item
    return lines
