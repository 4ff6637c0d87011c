"""Run the DVC stages of a project folder one at a time, and summarise what the pipeline produced.

DVC decides whether a stage must run (its deps, params or outs changed) and records what it did in
dvc.lock, so a run through Prefect and a plain `dvc repro` share one cache and one history.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from components.artifacts import read_json
from components.errors import (
    EXIT_TRANSIENT,
    GraftError,
    StageFailed,
    TransientStageError,
)
from components.stages import STAGES, Layout

# Runs every time (it checks the weights files outside the project); what depends on it reruns only when its
# output changed, so it never counts as "something changed".
ALWAYS_RUN = ("resolve_sources",)


@dataclass(frozen=True)
class StageOutcome:
    name: str
    ran: bool
    seconds: float


# DVC prints its own progress; without this, a logging set-up like Prefect's prints each line twice.
logging.getLogger("dvc").propagate = False


@contextmanager
def _in_folder(root: Path) -> Iterator[None]:
    """Stage commands are `graft stage ...`: put this interpreter's scripts first on PATH, run from root."""
    previous_cwd, previous_path = Path.cwd(), os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), previous_path])
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(previous_cwd)
        os.environ["PATH"] = previous_path


def _stage_failure(name: str, error: Exception, error_file: Path) -> Exception:
    """Turn DVC's "failed to reproduce" into StageFailed or TransientStageError with the stage's own message."""
    status = None
    cause: BaseException | None = error
    while cause is not None and status is None:
        if match := re.search(r"exited with (-?\d+)", str(cause)):
            status = int(match.group(1))
        cause = cause.__cause__ or cause.__context__
    reported = json.loads(error_file.read_text()) if error_file.exists() and error_file.stat().st_size else {}
    message = reported.get("message") or str(error)
    if status == EXIT_TRANSIENT:
        return TransientStageError(f"stage {name}: {message}")
    return StageFailed(f"stage {name} failed: {message}")


def reproduce_stage(root: str | Path, name: str) -> StageOutcome:
    """Run one stage if DVC finds it out of date; its upstream stages must already be up to date."""
    from dvc.exceptions import ReproductionError
    from dvc.repo import (
        Repo,  # imported here: dvc is heavy and only the runner needs it
    )

    if name.partition("@")[0] not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, _in_folder(Path(root).resolve()), Repo(".") as repo:
        error_file = Path(tmp) / "error.json"
        os.environ["GRAFT_ERROR_FILE"] = str(error_file)
        repo.scm_context.quiet = True  # no "git add dvc.lock" hint after every stage
        try:
            ran = repo.reproduce(name, single_item=True)
        except ReproductionError as error:
            raise _stage_failure(name, error, error_file) from error
        finally:
            os.environ.pop("GRAFT_ERROR_FILE", None)
    return StageOutcome(name=name, ran=bool(ran), seconds=time.perf_counter() - started)


def pending_stages(root: str | Path) -> list[str]:
    """What `dvc repro` would do now: stages and tracked data whose inputs changed since the last run."""
    from dvc.repo import Repo

    with _in_folder(Path(root).resolve()), Repo(".") as repo:
        return sorted(name for name in repo.status() if name.split(":")[-1] not in ALWAYS_RUN)


class ProjectBusy(GraftError):
    pass


@contextmanager
def project_lock(root: str | Path, wait_seconds: float, holder: str) -> Iterator[None]:
    """One retraining run at a time per project folder: DVC's stages, its lock file and the outputs are shared.

    flock is released by the kernel when the holder dies, so a killed run never leaves a stale lock."""
    path = Path(root) / ".graft.lock"
    deadline = time.monotonic() + wait_seconds
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    raise ProjectBusy(
                        f"another retraining run is using {Path(root).resolve()} ({handle.read().strip() or 'unknown'}); "
                        f"waited {wait_seconds:.0f}s. Try again when it ends, or raise schedule.lock_wait_seconds."
                    ) from None
                time.sleep(0.5)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{holder}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def collect_summary(root: str | Path, outcomes: list[StageOutcome] | None = None) -> dict:
    """The run at a glance, read from the stages' declared outputs."""
    root = Path(root)
    target = read_json(root / Layout.target_report)
    selection = read_json(root / Layout.selection_report)
    source = read_json(root / Layout.selected_source)
    evaluation = read_json(root / Layout.evaluate_metrics)
    parity = read_json(root / Layout.export_metrics)
    transfer_meta = read_json(root / Layout.transfer_model.with_suffix(".json"))
    registration_path = root / Layout.registration
    registration = read_json(registration_path) if registration_path.exists() else {}
    scores = {c["name"]: c[selection["score"]] for c in selection["candidates"]}
    ranking = ", ".join(f"{name} {scores[name]:.3f}" for name in selection["ranking"])
    return {
        "target data": f"{target['dataset']} @ {target['data_version']} "
                       f"(train {target['counts']['train']}, test {target['counts']['test']}, quarantined {target['quarantined']})",
        "source": f"{source['name']} ({source['kind']}: {source['architecture']}, {source['weights'] or source['file']}, "
                  f"{source['image_size']} px)" + _pretrained_line(root, source),
        "selection": f"{selection['mode']} by {selection['score']}: {ranking}",
        "strategy": transfer_meta["strategy"],
        "transfer test acc": f"{evaluation['transfer']['accuracy']:.4f} (macro-F1 {evaluation['transfer']['macro_f1']:.4f})",
        "scratch test acc": f"{evaluation['scratch']['accuracy']:.4f} (macro-F1 {evaluation['scratch']['macro_f1']:.4f}), same architecture",
        "transfer gain": f"{100 * evaluation['transfer_gain']:+.2f} points",
        "ONNX parity": f"max |diff| {parity['max_abs_diff']:.1e}, top-1 agreement {parity['argmax_agreement']:.4f}",
        "gates": _gate_line(root),
        "model version": _version_line(registration),
        "stages": ", ".join(f"{o.name} {'ran' if o.ran else 'skipped'} {o.seconds:.0f}s" for o in outcomes) if outcomes else "",
    }


def _pretrained_line(root: Path, source: dict) -> str:
    if source["kind"] != "pipeline":
        return ""
    metrics = read_json(root / Layout.pretrain_metrics(source["name"]))
    return f", source test acc {metrics['test_accuracy']:.4f}"


def _gate_line(root: Path) -> str:
    path = root / Layout.gate_report
    if not path.exists():
        return "not run"
    report = read_json(path)
    failed = [g["name"] for g in report["gates"] if g["verdict"] == "failed"]
    return ("all passed" if report["passed"] else f"FAILED: {', '.join(failed)}") + f" (serving check on {report['provider']})"


def _version_line(registration: dict) -> str:
    if not registration:
        return "not registered"
    aliases = [alias for alias, held in (("challenger", registration.get("challenger")), ("champion", registration.get("promoted"))) if held]
    return f"{registration['model_name']} v{registration['version']}" + (f" ({', '.join(aliases)})" if aliases else " (no alias: gates failed)")


def format_table(summary: dict, markdown: bool = False) -> str:
    rows = [(k, v) for k, v in summary.items() if v]
    if markdown:
        return "\n".join(["| item | value |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    width = max(len(k) for k, _ in rows)
    rule = "-" * (width + 2 + max(len(str(v)) for _, v in rows))
    return "\n".join([rule, *(f"{k.ljust(width)}  {v}" for k, v in rows), rule])


def track_raw_data(paths: list[Path], root: str | Path = ".") -> list[Path]:
    """`dvc add` raw data folders, so their content hash is the data version DVC pins in git."""
    from dvc.repo import Repo

    with _in_folder(Path(root).resolve()), Repo(".") as repo:
        repo.add([str(Path(p)) for p in paths])
    return list(paths)
