"""`graft monitor`: what the server captured, tested for drift against the served model's own reference, over time.

The captured records (deploy/capture.py) carry the features and class probabilities the model gave each request.
They are grouped by the model file that answered them (version and variant: each file stores its own reference,
deploy/drift.py) and cut, in capture order, into windows of serving.drift.window rows, each tested as the server
tests its live windows (the same DriftMonitor). The report says, window by window, the MMD statistic and p-value
against serving.drift.level, the predicted-class mix and the mean confidence; plots draw them over time; the check
(flows/production.py) reads `retrain_reasons`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.artifacts import atomic_path, save_png, write_json
from components.harvest import capture_folder, unharvested_labels
from components.project_lock import project_lock
from components.settings import Settings
from deploy.capture import CapturedItem, iter_items
from deploy.drift import DriftMonitor, DriftReference, DriftResult

REPORT, MARKDOWN, PLOT = Path("reports/monitor.json"), Path("reports/monitor.md"), Path("plots/monitor.png")


@dataclass(frozen=True)
class ServedFile:
    """The model file that answered a request: its reference is the one its features are tested against."""

    model: str
    version: str
    variant: str

    def __str__(self) -> str:
        return f"{self.model} v{self.version} {self.variant}"


@dataclass(frozen=True)
class Window:
    served: ServedFile
    first: str  # capture time of its first and last request (ISO 8601, UTC)
    last: str
    result: DriftResult

    def to_dict(self) -> dict:
        return {"model": self.served.model, "version": self.served.version, "variant": self.served.variant,
                "first": self.first, "last": self.last, **self.result.to_dict()}


@dataclass
class MonitorReport:
    captured: int = 0
    labelled: int = 0
    unharvested_labels: int = 0   # feedback labels no harvest has added yet
    without_features: int = 0     # captured from a model file with no features output: not tested
    window: int = 0
    level: float = 0.0
    windows: list[Window] = field(default_factory=list)
    untested: dict[str, str] = field(default_factory=dict)  # served file -> why its items were not tested

    @property
    def latest(self) -> Window | None:
        return max(self.windows, key=lambda w: w.last, default=None)

    def retrain_reasons(self, params: Settings) -> list[str]:
        """Why the production check should retrain now (nothing: it should not)."""
        reasons = []
        latest = self.latest
        if params.production.retrain_on_drift and latest is not None and latest.result.drifted:
            reasons.append(f"drift: the latest window of {latest.served} (to {latest.last}) has p = "
                           f"{latest.result.p_value:.4f} < serving.drift.level {self.level}")
        if self.unharvested_labels >= params.production.min_new_labels:
            reasons.append(f"{self.unharvested_labels} feedback labels wait to be harvested "
                           f"(production.min_new_labels {params.production.min_new_labels})")
        return reasons

    def to_dict(self) -> dict:
        return {"captured": self.captured, "labelled": self.labelled, "unharvested_labels": self.unharvested_labels,
                "without_features": self.without_features, "window": self.window, "level": self.level,
                "untested": self.untested, "windows": [w.to_dict() for w in self.windows]}


ReferenceOf = Callable[[ServedFile], "DriftReference | None"]  # a served file's drift reference, None: it has none


def test_windows(items: list[CapturedItem], served: ServedFile, reference: DriftReference, params: Settings) -> list[Window]:
    """The items one file answered, in capture order, tested window by window (a last partial window waits)."""
    drift = params.serving.drift
    monitor = DriftMonitor(reference, drift.window, drift.level, drift.permutations, seed=0)
    windows = []
    for start in range(0, len(items) - drift.window + 1, drift.window):
        chunk = items[start : start + drift.window]
        monitor.add(np.stack([i.features for i in chunk]), np.stack([i.probabilities for i in chunk]))
        windows.append(Window(served, chunk[0].record["time"], chunk[-1].record["time"], monitor.test()))
    return windows


def monitor(root: str | Path, params: Settings, reference_of: ReferenceOf, capture: str | Path | None = None) -> MonitorReport:
    """Every captured item, grouped by the file that answered it and tested window by window against that file's
    reference (`reference_of(served)`: None when the file has none)."""
    root = Path(root)
    folder = Path(capture) if capture else capture_folder(root, params)
    items = list(iter_items(folder))
    report = MonitorReport(captured=len(items), labelled=sum(i.label is not None for i in items),
                           unharvested_labels=unharvested_labels(root, params, items),
                           window=params.serving.drift.window, level=params.serving.drift.level)
    groups: dict[ServedFile, list[CapturedItem]] = {}
    for item in items:
        if item.features is None:
            report.without_features += 1
            continue
        groups.setdefault(ServedFile(item.record["model"], item.record["version"], item.record["variant"]), []).append(item)
    for served, group in groups.items():
        reference = reference_of(served)
        if reference is None:
            report.untested[str(served)] = "its model file holds no drift reference (exported before drift monitoring)"
            continue
        report.windows += test_windows(group, served, reference, params)
    report.windows.sort(key=lambda w: w.last)
    return report


def markdown(report: MonitorReport) -> str:
    lines = [f"captured {report.captured} requests, {report.labelled} labelled ({report.unharvested_labels} not yet "
             f"harvested); windows of {report.window}, drift when p < {report.level}", "",
             "| window | served by | last request | MMD^2 | p-value | drift | class TV (ref) | confidence (ref) |",
             "| ---: | --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for number, window in enumerate(report.windows, 1):
        r = window.result
        lines.append(f"| {number} | {window.served} | {window.last} | {r.statistic:.4f} | {r.p_value:.4f} | "
                     f"{'**yes**' if r.drifted else 'no'} | {r.class_tv_reference:.3f} | {r.mean_confidence:.3f} "
                     f"({r.reference_mean_confidence:.3f}) |")
    if not report.windows:
        lines.append(f"| - | no full window of {report.window} captured requests with features yet | | | | | | |")
    lines += [f"\n{served}: not tested, {why}" for served, why in report.untested.items()]
    return "\n".join(lines) + "\n"


def plot(report: MonitorReport, path: Path) -> Path:
    """Three panels over the windows: the p-value against the level, the predicted-class mix, the mean confidence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (p_axis, mix_axis, confidence_axis) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    x = np.arange(1, len(report.windows) + 1)
    results = [w.result for w in report.windows]
    # The range set before anything is drawn, not left to the data: with no window yet the level line alone would
    # span no height at all.
    p_axis.set_yscale("log")
    p_axis.set_ylim(min([report.level, *(r.p_value for r in results)]) / 3, 1.5)
    p_axis.plot(x, [r.p_value for r in results], "o-", label="MMD permutation p-value")
    p_axis.axhline(report.level, color="red", linestyle="--", label=f"level {report.level}")
    if not results:
        p_axis.text(0.5, 0.5, f"no full window of {report.window} captured requests yet", transform=p_axis.transAxes,
                    ha="center", va="center")
    p_axis.set_ylabel("p-value (log)")
    p_axis.legend(loc="lower left")
    p_axis.set_title(f"drift over time: windows of {report.window} captured requests")
    if results:
        mix = np.array([r.class_mix for r in results])
        bottom = np.zeros(len(results))
        for k in range(mix.shape[1]):
            mix_axis.bar(x, mix[:, k], bottom=bottom, width=0.8)
            bottom += mix[:, k]
    mix_axis.set_ylabel("predicted class mix")
    confidence_axis.plot(x, [r.mean_confidence for r in results], "o-", label="window")
    confidence_axis.plot(x, [r.reference_mean_confidence for r in results], "--", label="reference")
    confidence_axis.set_ylabel("mean top probability")
    confidence_axis.set_ylim(0, 1.02)
    confidence_axis.set_xlim(0.5, max(len(results), 1) + 0.5)  # the windows' numbers, shared by the three panels
    confidence_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    confidence_axis.set_xlabel("window")
    confidence_axis.legend(loc="lower left")
    figure.tight_layout()
    return save_png(figure, path, dpi=100)


def write_report(root: str | Path, report: MonitorReport) -> list[Path]:
    root = Path(root)
    write_json(root / REPORT, report.to_dict())
    with atomic_path(root / MARKDOWN) as tmp:
        Path(tmp).write_text(markdown(report))
    return [root / REPORT, root / MARKDOWN, plot(report, root / PLOT)]


def log_report(params: Settings, root: str | Path, report: MonitorReport, files: list[Path]) -> str:
    """A `monitor` run in the project's experiment: each window's statistic, p-value and class shift as a step, the
    report and plot as artifacts. Its id."""
    import mlflow

    from components.registry import registry_call, tracking_uri

    uri = tracking_uri(params.registry, root)
    with registry_call("logging the monitor report", uri):
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(params.registry.experiment)
        with mlflow.start_run(run_name="monitor", tags={"graft.stage": "monitor"}) as run:
            mlflow.log_params({"window": report.window, "level": report.level})
            mlflow.log_metrics({"captured": report.captured, "labelled": report.labelled,
                                "unharvested_labels": report.unharvested_labels})
            for step, window in enumerate(report.windows):
                r = window.result
                mlflow.log_metrics({"drift_statistic": r.statistic, "drift_p_value": r.p_value,
                                    "class_tv_reference": r.class_tv_reference, "mean_confidence": r.mean_confidence},
                                   step=step)
            for path in files:
                mlflow.log_artifact(str(path), artifact_path="monitor")
            return run.info.run_id


def registry_references(params: Settings, root: str | Path, cache_dir: str | Path) -> ReferenceOf:
    """reference_of for `monitor`: each served file fetched from the registry (checked against its registered hash,
    as the server fetches it) and its drift reference read."""
    from components.registry import registry_call, tracking_uri
    from deploy.model import load_model
    from deploy.source import RegistrySource

    uri = tracking_uri(params.registry, root)
    sources: dict[str, RegistrySource] = {}

    def reference_of(served: ServedFile) -> DriftReference | None:
        with registry_call(f"fetching {served} for its drift reference", uri):
            if served.model not in sources:
                sources[served.model] = RegistrySource(uri, served.model, params.serving.alias, cache_dir)
            return load_model(sources[served.model].fetch(served.version, served.variant).onnx_path, ["cpu"]).drift_reference

    return reference_of


def check_capture(root: str | Path, params: Settings, cache_dir: str | Path,
                  capture: str | Path | None = None) -> tuple[MonitorReport, list[Path]]:
    """`monitor` over the capture with the registry's references, its report written (reports/, plots/) and logged
    to MLflow: under the project lock, since the report files and the MLflow store are the project's, and two checks
    at once on a project whose store is new would both create its tables (one then read a table half made)."""
    with project_lock(root, params.schedule.lock_wait_seconds, "a production check's drift report"):
        report = monitor(root, params, registry_references(params, root, cache_dir), capture)
        files = write_report(root, report)
        log_report(params, root, report, files)
    return report, files
