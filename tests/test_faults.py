"""Faults injected for real: SIGKILL part-way through each step of `graft run`, an MLflow server that is not
there when a run starts and stops while a candidate is being published. After each, the next run completes,
reuses every finished stage, and nothing half-written is read back, registered or served."""
import asyncio
import codecs
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

from components.dvc_runner import dvc_status, pending_stages
from components.run_plan import plan_run
from components.settings import load_settings
from components.tracked_data import DataLost, check_tracked_data, md5_of, version_changed_data
from deploy.model import load_model
from tests.conftest import (
    copy_workspace,
    free_port,
    start_mlflow_server,
    stop_process_group,
    tiny_params,
    wait_healthy,
    wait_until,
)

MODEL = "graft-classifier"


class GraftRun:
    """`graft run` in its own process group, its output collected as it comes."""

    def __init__(self, root: Path, env: dict) -> None:
        self.root, self.output, self.started = root, "", time.time()
        self.process = subprocess.Popen([sys.executable, "-m", "graft", "run"], cwd=root, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        # os.read returns what has arrived: a quiet terminal's last line is seen when it is written, not 256 bytes later.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a chunk may end inside a character
        for chunk in iter(lambda: os.read(self.process.stdout.fileno(), 4096), b""):
            self.output += decoder.decode(chunk)

    def kill_when(self, condition: Callable[[], bool], what: str, seconds: float = 600) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            assert self.process.poll() is None, f"the run ended before {what}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {seconds}s"
            time.sleep(0.02)
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.reader.join(timeout=10)

    def finish(self) -> str:
        self.process.wait(timeout=900)
        self.reader.join(timeout=10)
        assert self.process.returncode == 0, self.output[-4000:]
        return self.output


def _stage_process_running(name: str) -> Callable[[], bool]:
    """True while `graft stage NAME` runs (DVC starts it through a shell)."""
    def running() -> bool:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if f"stage\0{name}\0" in cmdline.read_text():
                    return True
            except OSError:
                continue
        return False
    return running


def _written_since(path: Path, since: float) -> bool:
    return path.exists() and path.stat().st_mtime >= since


def _registry_is_whole(uri: str, tmp: Path) -> list[str]:
    """Every version's files are there and load as the server loads them; no candidate is registered twice."""
    client = MlflowClient(tracking_uri=uri)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    for version in versions:
        folder = download_artifacts(artifact_uri=client.get_model_version_download_uri(MODEL, version.version),
                                    dst_path=str(tmp / f"v{version.version}"), tracking_uri=uri)
        load_model(Path(folder) / "model.onnx", providers=["cpu"])
    keys = [v.tags.get("graft.candidate") for v in versions]
    assert all(keys) and len(set(keys)) == len(keys), f"a version without its candidate tag, or one candidate twice: {keys}"
    return sorted(str(v.version) for v in versions)


def _task_runs_since(task: str, since: datetime) -> list:
    """The `task` task runs started after `since`, read from the Prefect server the run reports to."""
    async def read():
        async with get_client() as client:
            return await client.read_task_runs(task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(any_=[task]), start_time=TaskRunFilterStartTime(after_=since)))
    return asyncio.run(read())


def _awaiting_retry(task: str, since: datetime) -> Callable[[], bool]:
    """True once a `task` task run started after `since` has failed an attempt and waits for its retry."""
    def retrying() -> bool:
        return any(run.state_name in ("AwaitingRetry", "Retrying") or run.run_count > 1
                   for run in _task_runs_since(task, since))
    return retrying


@pytest.mark.slow  # the whole pipeline from an empty project, through seven `graft run`s
def test_sigkill_at_every_step_then_the_next_run_finishes_what_is_left(workspace_factory, candidate_template, prefect_server,
                                                                       tmp_path):
    """One project, killed during prepare, pretraining (after its first resume point), fine-tuning, export,
    judging and publishing in turn; each restart reuses what the killed runs finished. The end result equals
    the uninterrupted run of the same params (candidate_template) to the last digit."""
    # FP32 only: export and each judging are shorter; the metrics compared below do not depend on it.
    params = tiny_params(**{"pretrain.checkpoint_every_steps": 5, "export.variants": []})
    root = workspace_factory("killed", params)
    env = {**prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    resume_point = root / ".graft/resume/pretrain-fashion-mnist.pt"
    kills = [
        ("prepare_target", _stage_process_running("prepare_target")),
        ("pretraining, after its first resume point", resume_point.exists),
        ("fine-tuning", lambda: "finetune:" in run.output),
        ("export", _stage_process_running("export")),
        ("judging", lambda: "stage export ran" in run.output or "stage export up to date" in run.output),
        ("publishing", lambda: _written_since(root / "reports/gates.json", run.started)),
    ]
    outputs = []
    for what, condition in kills:
        run = GraftRun(root, env)
        run.kill_when(condition, what)
        outputs.append(run.output)
        if (root / "mlflow.db").exists():
            _registry_is_whole(f"sqlite:///{root / 'mlflow.db'}", tmp_path / what.split()[0])
    final = GraftRun(root, env).finish()

    assert re.search(r"pretrain fashion-mnist: resuming from step \d+ of \d+", "".join(outputs[2:])), "resumed, not restarted"
    assert "stage prepare_target up to date" in final and "stage finetune up to date" in final, "finished stages reused"
    # The terminal holds what a person acts on; DVC's, Prefect's and MLflow's own lines are in the run's log file.
    noise = ("Running stage", "docs.prefect.io", "core.autostage", "Successfully registered model", "failed to initialize",
             "Creating initial", "Finished in state")
    assert not [line for line in final.splitlines() if any(n in line for n in noise)], final[-3000:]
    log = Path(re.search(r"full log: (\S+)", final)[1])
    assert "Running stage 'resolve_sources'" in (root / log).read_text()
    assert not resume_point.exists(), "the resume point is removed once pretraining's outputs are written"
    template, _ = candidate_template
    for metrics in ("metrics/pretrain-fashion-mnist.json", "metrics/evaluate.json"):
        assert json.loads((root / metrics).read_text()) == json.loads((template / metrics).read_text()), metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert _registry_is_whole(f"sqlite:///{root / 'mlflow.db'}", tmp_path / "end") == ["1"], "one candidate, one version"
    assert client.get_model_version_by_alias(MODEL, "champion").version in ("1", 1)
    done = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == {"resolve_sources": ["always changed"]}


@pytest.mark.slow  # an MLflow server of its own: absent at the start, killed while publishing, started again
def test_mlflow_server_absent_at_the_start_then_stopped_while_publishing_the_run_retries_until_it_is_back(
        candidate_template, prefect_server, tmp_path):
    """Nothing listens where the registry should be when the run starts: the plan's registry look-up is retried
    until it answers. The registry then goes away while the candidate is being published: publishing is retried
    until it is back. The run finishes with exactly one complete version. A server of its own, not the shared
    one: this test starts it late and kills it; each start waits on what the run has met, never a fixed time."""
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    # Backoff 2, 4, 8, ... s: room for a server that takes a while to start on a busy machine.
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(**{"schedule.retries": 6, "schedule.retry_delay_seconds": 2}),
                                                     sort_keys=False))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**prefect_server, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    since = datetime.now(timezone.utc)
    run, server = GraftRun(root, env), None
    try:
        # The stages are done, so the plan asks the registry whether it holds this candidate: a closed port.
        wait_until(_awaiting_retry("plan", since), 180, "no registry look-up awaiting its retry", interval=0.5,
                   process=run.process)
        server, _ = start_mlflow_server(tmp_path / "mlflow", port)
        wait_until((root / "reports/gates.json").exists, 300, "no judged candidate (publishing starts now)", interval=0.02,
                   process=run.process)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        # Back only once publishing has met the stopped server and waits for its retry.
        wait_until(_awaiting_retry("publish", since), 120, "no failed publishing attempt awaiting its retry", interval=0.5,
                   process=run.process)
        server, _ = start_mlflow_server(tmp_path / "mlflow", port, wait=False)
        assert wait_healthy(f"{url}/health", 120)
        output = run.finish()
        client = MlflowClient(tracking_uri=url)
        assert _registry_is_whole(url, tmp_path / "end") == ["1"], output[-3000:]
        registration = json.loads((root / "outputs/registration.json").read_text())
        assert registration["version"] == "1" and registration["tracking_uri"] == url
        assert np.isfinite(float(client.get_model_version(MODEL, "1").tags["metric.test.accuracy"]))
        assert [run.run_count > 1 for run in _task_runs_since("plan", since)] == [True], "the look-up was retried"
        assert [run.run_count > 1 for run in _task_runs_since("publish", since)] == [True], "publishing was retried"
    finally:
        if server is not None:
            stop_process_group(server)


def _dvc(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          check=True).stdout


def _corrupt_cache_copy(root: Path, image: Path) -> Path:
    """Overwrite the DVC cache object holding `image`'s bytes (as a failing disk would); return its path."""
    md5 = md5_of(image)
    cache_object = root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    cache_object.chmod(0o644)
    cache_object.write_bytes(b"\x00" * 64)
    return cache_object


def test_a_corrupted_dvc_cache_file_is_named_and_restored_from_the_remote(candidate_template, prefect_server, tmp_path):
    """A target image's cache object is corrupted and the project's copy is gone: `graft run` refuses, naming the
    file and `dvc pull` from the configured local-folder remote; that command brings back the very bytes."""
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    _dvc(root, "remote", "add", "-d", "backup", str(tmp_path / "remote"))
    _dvc(root, "push", "-q", "data/raw/animal-mnist.dvc")
    image = sorted((root / "data/raw/animal-mnist").rglob("*.png"))[0]
    original = image.read_bytes()
    _corrupt_cache_copy(root, image)
    image.unlink()
    env = {**prefect_server, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "graft", "run"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    message = done.stderr[done.stderr.rindex("graft: "):]
    shown = image.relative_to(root).as_posix()
    assert f"data/raw/animal-mnist (data.target.path) are neither in the project nor intact in the DVC cache: {shown}" in message
    assert "the DVC remote 'backup': `dvc pull data/raw/animal-mnist.dvc`" in message
    assert not (root / "outputs").exists(), "nothing is judged or published from data that is not whole"

    _dvc(root, "pull", "-q", "data/raw/animal-mnist.dvc")
    assert image.read_bytes() == original
    assert json.loads(_dvc(root, "status", "--json")) == {"resolve_sources": ["always changed"]}


def _pending_data(status: dict) -> list[str]:
    """The tracked data folders DVC finds changed (a fresh project's stages, never run, are pending too)."""
    return [name for name in pending_stages(status, ["data/raw/animal-mnist"]) if name.endswith(".dvc")]


def test_images_changed_in_a_tracked_folder_are_versioned_before_any_stage_trains_on_them(workspace_factory):
    """A user drops an image into the target folder and runs again: the run versions the folder (`dvc add`, as a
    whole `dvc repro` does with a changed data source), so the model is trained on data DVC can give back."""
    root = workspace_factory("changed-data")
    pinned = root / "data/raw/animal-mnist.dvc"
    before = pinned.read_text()
    image = sorted((root / "data/raw/animal-mnist").rglob("*.png"))[0]
    added = image.with_name(f"added-{image.name}")
    added.write_bytes(image.read_bytes()[:-1] + bytes([image.read_bytes()[-1] ^ 1]))  # other bytes: a new file
    status = dvc_status(root)
    assert _pending_data(status) == ["data/raw/animal-mnist.dvc"], status
    assert version_changed_data(root, status, ["data/raw/fashion-mnist"]) == [], "data no stage reads is left alone"
    assert pinned.read_text() == before

    planned = plan_run(root, load_settings(root / "params.yaml"), force=True)
    assert planned.versioned == ("data/raw/animal-mnist",) and "prepare_target" in planned.pending
    assert planned.notes() == ["versioned data/raw/animal-mnist again: its files changed since data/raw/animal-mnist.dvc "
                               "pinned them (dvc add); commit data/raw/animal-mnist.dvc with git to keep this data version"]
    assert pinned.read_text() != before and _pending_data(dvc_status(root)) == []
    contents = added.read_bytes()
    added.unlink()
    _dvc(root, "checkout", "-q", "data/raw/animal-mnist.dvc")
    assert added.read_bytes() == contents, "DVC's cache holds the version the run trained on"


def test_a_corrupted_dvc_cache_file_with_an_intact_project_copy_is_repaired_from_it(workspace_factory):
    """The cache object is rewritten from the project's copy (checked against the pinned hash), after which DVC
    finds the data up to date; with the copy gone too and no remote, the message says what to do instead."""
    root = workspace_factory("corrupted-cache")  # its data tracked by DVC: no stage needs to have run
    image = sorted((root / "data/raw/animal-mnist").rglob("*.png"))[-1]
    cache_object = _corrupt_cache_copy(root, image)
    status = dvc_status(root)
    assert _pending_data(status) == ["data/raw/animal-mnist.dvc"], status
    note = check_tracked_data(root, status)
    assert note.startswith(f"repaired the DVC cache from the project's own copy: {image.relative_to(root).as_posix()}"), note
    assert md5_of(cache_object) == md5_of(image)
    assert _pending_data(dvc_status(root)) == []

    _corrupt_cache_copy(root, image)
    image.unlink()
    with pytest.raises(DataLost, match=r"no DVC remote is configured .* `dvc pull data/raw/animal-mnist.dvc`"):
        check_tracked_data(root, dvc_status(root))
