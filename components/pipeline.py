"""Run the DVC stages of a project folder one at a time, and summarise what the pipeline produced.

DVC decides whether a stage must run (its deps, params or outs changed) and records what it did in
dvc.lock, so a run through Prefect and a plain `dvc repro` share one cache and one history.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from components.artifacts import read_json
from components.stages import STAGES, Layout

STAGE_ORDER: tuple[str, ...] = tuple(STAGES)


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


def reproduce_stage(root: str | Path, name: str) -> StageOutcome:
    """Run one stage if DVC finds it out of date; its upstream stages must already be up to date."""
    from dvc.repo import Repo  # imported here: dvc is heavy and only the runner needs it

    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}")
    started = time.perf_counter()
    with _in_folder(Path(root).resolve()), Repo(".") as repo:
        repo.scm_context.quiet = True  # no "git add dvc.lock" hint after every stage
        ran = repo.reproduce(name, single_item=True)
    return StageOutcome(name=name, ran=bool(ran), seconds=time.perf_counter() - started)


def collect_summary(root: str | Path, outcomes: list[StageOutcome] | None = None) -> dict:
    """The run at a glance, read from the stages' declared outputs."""
    root = Path(root)
    target = read_json(root / Layout.target_report)
    source = read_json(root / Layout.source_report)
    evaluation = read_json(root / Layout.evaluate_metrics)
    parity = read_json(root / Layout.export_metrics)
    pretrain = read_json(root / Layout.pretrain_metrics)
    transfer_meta = read_json(root / Layout.transfer_model.with_suffix(".json"))
    registration_path = root / Layout.registration
    registration = read_json(registration_path) if registration_path.exists() else {}
    return {
        "target data": f"{target['dataset']} @ {target['data_version']} "
                       f"(train {target['counts']['train']}, test {target['counts']['test']}, quarantined {target['quarantined']})",
        "source": f"{source['dataset']} @ {source['data_version']}, source test acc {pretrain['test_accuracy']:.4f}",
        "strategy": transfer_meta["strategy"],
        "transfer test acc": f"{evaluation['transfer']['accuracy']:.4f} (macro-F1 {evaluation['transfer']['macro_f1']:.4f})",
        "scratch test acc": f"{evaluation['scratch']['accuracy']:.4f} (macro-F1 {evaluation['scratch']['macro_f1']:.4f})",
        "transfer gain": f"{100 * evaluation['transfer_gain']:+.2f} points",
        "ONNX parity": f"max |diff| {parity['max_abs_diff']:.1e}, top-1 agreement {parity['argmax_agreement']:.4f}",
        "model version": f"{registration['model_name']} v{registration['version']}" if registration else "not registered",
        "stages": ", ".join(f"{o.name} {'ran' if o.ran else 'skipped'} {o.seconds:.0f}s" for o in outcomes) if outcomes else "",
    }


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
