"""DVC's command line, run for Graft in a project folder: one stage at a time, the status, `dvc add`, the remote.

DVC decides whether a stage must run (its deps, params or outs changed) and records what it did in
dvc.lock, so a run through Prefect and a plain `dvc repro` share one cache and one history.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from components import runlog
from components.errors import ERROR_FILE_VARIABLE, GraftError

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


class StageRefused(GraftError):
    """A stage refused its input (bad data, an incompatible source, failed parity); the reason is the stage's own."""


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
