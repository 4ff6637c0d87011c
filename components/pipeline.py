"""Run the DVC stages of a project folder one at a time, and summarise what the pipeline produced.

DVC decides whether a stage must run (its deps, params or outs changed) and records what it did in
dvc.lock, so a run through Prefect and a plain `dvc repro` share one cache and one history.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from components import runlog
from components.artifacts import read_json
from components.errors import (
    ERROR_FILE_VARIABLE,
    CandidateRejected,
    GraftError,
    RegistryUnavailable,
)
from components.layout import Layout

# Runs every time (it checks the weights files outside the project); what depends on it reruns only when its
# output changed, so it never counts as "something changed".
ALWAYS_RUN = ("resolve_sources",)


@dataclass(frozen=True)
class StageOutcome:
    name: str
    ran: bool
    seconds: float


# DVC's per-command hints about git and remotes: noise in a run that commits nothing itself.
_DVC_HINTS = ("To track the changes with git", "git add", "Use `dvc push`", "To enable auto staging",
              "dvc config core.autostage")


def _dvc_env(error_file: Path | None = None) -> dict[str, str]:
    """This interpreter's scripts first on PATH (so `graft stage NAME` is this Graft), and the file a stage that
    refuses its input writes the reason to."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    if error_file is not None:
        env[ERROR_FILE_VARIABLE] = str(error_file)
    return env


def _dvc(root: Path, *args: str, error_file: Path | None = None) -> tuple[int, str]:
    """DVC's own command line in the project folder, as a user runs it (DVC resolves stage names, its lock and
    its run cache against the working folder, which this process leaves alone). Its output goes to the command's
    log file as it comes, without DVC's hints (components/runlog.py), and is returned; the stages' progress bars
    (their stderr) reach the terminal."""
    process = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=_dvc_env(error_file), text=True,
                               stdout=subprocess.PIPE)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if not line.lstrip().startswith(_DVC_HINTS) and line.strip():
            runlog.write(line)
    return process.wait(), "".join(lines)


def reproduce_stage(root: str | Path, name: str, with_upstream: bool = False) -> StageOutcome:
    """Run one stage (a name from stage_runner.stage_order) if DVC finds it out of date; its upstream stages must
    already be up to date, unless `with_upstream` (then DVC brings those up to date first)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        error_file = Path(tmp) / "error.txt"
        scope = () if with_upstream else ("--single-item",)
        status, output = _dvc(Path(root).resolve(), "repro", *scope, name, error_file=error_file)
        if status != 0:
            if error_file.exists() and (reason := error_file.read_text().strip()):
                raise StageRefused(f"stage {name}: {reason}")
            raise RuntimeError(f"stage {name} failed (dvc repro exited {status}); its own output is above")
    return StageOutcome(name=name, ran=f"Running stage '{name}'" in output, seconds=time.perf_counter() - started)


def dvc_status(root: str | Path) -> dict:
    """`dvc status --json`: stages and tracked data whose inputs, outputs or cache changed since the last run."""
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=Path(root).resolve(), env=_dvc_env(),
                          text=True, stdout=subprocess.PIPE)
    if done.returncode != 0:
        raise RuntimeError(f"dvc status failed in {root} (exit {done.returncode}); its message is above")
    return json.loads(done.stdout or "{}")


def pending_stages(status: dict, data_paths: list[str]) -> list[str]:
    """What changed that the pipeline reads, from `dvc_status`'s answer: its stages, and the tracked data folders
    in `data_paths`. A `.dvc` file of data no stage reads (a previous target, left tracked) changes nothing."""
    read = {os.path.normpath(path) for path in data_paths}

    def read_by_pipeline(name: str) -> bool:
        return not name.endswith(".dvc") or os.path.normpath(name.removesuffix(".dvc")) in read

    return sorted(name for name in status if name not in ALWAYS_RUN and read_by_pipeline(name))


class ProjectBusy(GraftError):
    pass


@dataclass(frozen=True)
class AlreadyJudged:
    """The registry in use holds this very candidate (same data, params, code and source weights), judged with
    today's gates: a run would only repeat that verdict."""

    model_name: str
    version: str
    failed_gates: tuple[str, ...]  # with each gate's value and bound; empty: it passed every gate

    def message(self) -> str:
        unchanged = "data, params, code and source weights are unchanged since"
        if not self.failed_gates:
            return (f"nothing to do: {unchanged} the run that registered this candidate as {self.model_name} "
                    f"v{self.version}, which passed every gate")
        return (f"this candidate was judged already and rejected: {self.model_name} v{self.version} failed "
                f"{'; '.join(self.failed_gates)} ({unchanged} then). Change the data or the params that make the "
                "model (finetune, sources, data), or run `graft run --force` to judge it again (e.g. after the "
                "champion moved)")

    def enforce(self) -> None:
        """A rejected candidate ends the run as its first judging did (exit status 3), not as "done"."""
        if self.failed_gates:
            raise CandidateRejected(self.message())


def already_judged(root: str | Path, params) -> AlreadyJudged | None:
    """The registry's version of this candidate and the gates it failed, when it holds one judged with today's gates."""
    from mlflow import MlflowClient

    from components.registry import failed_gates, published_version, registry_call, tracking_uri

    version = published_version(root, params)
    if version is None:
        return None
    name = params.registry.model_name
    with registry_call("reading the candidate's verdict", tracking_uri(params.registry, root)):
        tags = MlflowClient().get_model_version(name, version).tags  # published_version pointed MLflow at the store
    return AlreadyJudged(name, version, tuple(
        f"{gate} ({tags.get(f'gate.{gate}.value', '')} vs {tags.get(f'gate.{gate}.bound', '')})" for gate in failed_gates(tags)))


def nothing_to_do(root: str | Path, params) -> AlreadyJudged | None:
    """Whether a run has nothing to do: data, params, code and source weights unchanged since the last run, and
    the registry in use holds that candidate judged with today's gates. None when there is work (or it cannot be
    told at once: another run holds the project, the registry does not answer); the flow then decides.

    What the flow checks first, without the flow: `graft run` answers an unchanged project in seconds instead
    of starting Prefect to learn that. The registry is asked while DVC looks at the weights (other core)."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        with project_lock(root, 0, "graft run, checking for changes"), ThreadPoolExecutor(1) as pool:
            registry = pool.submit(already_judged, root, params)
            for name in ALWAYS_RUN:
                reproduce_stage(root, name)
            changed = pending_stages(dvc_status(root), list(params.raw_data_paths().values()))
            judged = registry.result()
    except (ProjectBusy, RegistryUnavailable):
        return None
    return None if changed else judged


class StageRefused(GraftError):
    """A stage refused its input (bad data, an incompatible source, failed parity); the reason is the stage's own."""


class NoRunYet(GraftError):
    pass


@contextmanager
def project_lock(root: str | Path, wait_seconds: float, holder: str) -> Iterator[None]:
    """One retraining run at a time per project folder: DVC's stages, its lock file and the outputs are shared.

    flock is released by the kernel when the holder dies, so a killed run never leaves a stale lock."""
    path = Path(root) / ".graft.lock"
    deadline = time.monotonic() + wait_seconds
    with open(path, "a+") as handle:
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                other = handle.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise ProjectBusy(
                        f"another retraining run is using {Path(root).resolve()} ({other}); "
                        f"waited {wait_seconds:.0f}s. Try again when it ends, or raise schedule.lock_wait_seconds."
                    ) from None
                if not said:  # a wait that says nothing looks like a hang
                    logging.getLogger("graft.lock").warning(
                        "waiting up to %.0fs (schedule.lock_wait_seconds) for another run of this project to end: %s",
                        wait_seconds, other)
                    said = True
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
    needed = (Layout.evaluate_metrics, Layout.target_report, Layout.selection_report, Layout.selected_source,
              Layout.export_metrics, Layout.transfer_model.with_suffix(".json"), Layout.per_class)
    if missing := [str(path) for path in needed if not (root / path).exists()]:
        # A clone has the committed metrics and reports but not DVC's outputs until a run or `dvc pull`.
        raise NoRunYet(f"no pipeline outputs in {root.resolve()} ({', '.join(missing)} missing): run `graft run` "
                       "(or `dvc repro`) first, or `dvc pull` them from the project's DVC remote")
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
        "source scores": f"{selection['score']}: {ranking}",
        "selection": f"{selection['chosen']}, {selection['decided_by']}",
        "strategy": transfer_meta["strategy"],
        "transfer test acc": f"{evaluation['transfer']['accuracy']:.4f} (macro-F1 {evaluation['transfer']['macro_f1']:.4f})",
        "scratch test acc": f"{evaluation['scratch']['accuracy']:.4f} (macro-F1 {evaluation['scratch']['macro_f1']:.4f}), same architecture",
        "transfer gain": f"{100 * evaluation['transfer_gain']:+.2f} points",
        "ONNX parity": f"max |diff| {parity['max_abs_diff']:.1e}, top-1 agreement {parity['argmax_agreement']:.4f}",
        "export variants": _variants_line(parity.get("variants", {})),
        "gates": _gate_line(root),
        "model version": _version_line(registration),
        "stages": ", ".join(f"{o.name} {'ran' if o.ran else 'skipped'} {o.seconds:.0f}s" for o in outcomes) if outcomes else "",
    }


def _pretrained_line(root: Path, source: dict) -> str:
    if source["kind"] != "pipeline":
        return ""
    metrics = read_json(root / Layout.pretrain_metrics(source["name"]))
    return f", source test acc {metrics['test_accuracy']:.4f}"


def _variants_line(variants: dict[str, dict]) -> str:
    """Each export variant's test accuracy and CPU batch-64 latency, and whether it was published."""
    return "; ".join(
        f"{name} {score['accuracy']:.4f}, {score['latency_ms_batch64']:.1f} ms/64 on CPU"
        + ("" if score["published"] else f" (not published: {100 * score['accuracy_drop']:.2f} points below fp32)")
        for name, score in variants.items())


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
    rule = "-" * (width + 2 + max(len(str(v)) for _, v in rows))
    return "\n".join([rule, *(f"{k.ljust(width)}  {v}" for k, v in rows), rule])


REMOTE_NAME = "graft"  # the DVC remote storage.dvc_remote becomes, in .dvc/config (committed: clones can pull)


class RemoteError(GraftError, RuntimeError):
    """The DVC remote could not be set or written."""


def push_to_remote(root: str | Path, url: str) -> str:
    """The data and every cached stage output to the DVC remote at `url`, made this project's default remote; DVC
    sends only what the remote lacks, so a second push of the same run sends nothing. Returns DVC's last line."""
    root = Path(root).resolve()
    if "://" not in url:  # a folder, relative to the project (DVC would read it relative to .dvc/)
        url = str((root / url).resolve())
    status, _ = _dvc(root, "remote", "add", "--force", "--default", REMOTE_NAME, url)
    if status != 0:
        raise RemoteError(f"storage.dvc_remote {url!r}: DVC refused it as a remote (exit {status}; its message is "
                          "above); use a folder, ssh://USER@HOST/PATH or s3://BUCKET/PATH")
    status, output = _dvc(root, "push")
    if status != 0:
        raise RemoteError(f"dvc push to {url} failed (exit {status}; its message is above); the model is published, "
                          "the files are not: make the remote reachable and writable, then run `dvc push`")
    return output.strip().splitlines()[-1] if output.strip() else "pushed"


def track_raw_data(paths: list[Path], root: str | Path = ".") -> list[Path]:
    """`dvc add` raw data folders, so their content hash is the data version DVC pins in git."""
    status, _ = _dvc(Path(root).resolve(), "add", "-q", *[str(p) for p in paths])
    if status != 0:
        raise RuntimeError(f"dvc add {' '.join(map(str, paths))} failed (exit {status}); its message is above")
    return list(paths)
