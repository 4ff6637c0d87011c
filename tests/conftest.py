"""Shared fixtures: small slices of the real data and a tiny, fast params.yaml; one finished pipeline workspace,
one Prefect server and one MLflow server for each pytest-xdist worker (for the whole run under `-n 0`).

The slices come from the real embedded default (`graft fetch-data` must have run: scripts/setup.sh does it).

Tiers: `pytest -m "not slow"` is the everyday run (minutes); plain `pytest` runs everything (CI). A test is `slow`
when it is marked so, or when it uses a fixture in SLOW_FIXTURES (it starts a server or needs the pipeline run).
Session fixtures are shared, never changed: a test that changes a workspace works on its own copy (copy_workspace),
and the session's finished workspaces are checked at the end of the run for changes (unchanged_at_teardown).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from graft.env import apply_defaults

apply_defaults()
# Servers started by tests (`python -m deploy.server`) open no gRPC port unless a test gives one (--grpc-port): two
# servers at once would both want the default.
os.environ["GRAFT_GRPC_PORT"] = "0"
# pytest-xdist (pyproject.toml's addopts): the suite waits on servers and subprocesses about half its time, so it
# runs as one worker per core; each trains on its own share of the cores, not all of them (set before torch loads).
USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, USABLE_CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

PROJECT = Path(__file__).resolve().parents[1]
RAW = PROJECT / "data" / "raw"


def _require_raw() -> None:
    if not (RAW / "fashion-mnist").is_dir() or not (RAW / "animal-mnist").is_dir():
        pytest.exit("data/raw is missing: run `bash scripts/setup.sh` (it runs `graft fetch-data`) first", returncode=2)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


def read_idx(path: Path) -> np.ndarray:
    from components.data import _read_idx

    return _read_idx(path)


def make_small_source(dest: Path, train: int = 1200, test: int = 300) -> Path:
    """The first images of the real Fashion-MNIST IDX files, as IDX files again."""
    _require_raw()
    dest.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        for kind in ("images", "labels"):
            name = f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
            _write_idx(dest / name, read_idx(RAW / "fashion-mnist" / name)[:count])
    shutil.copy(RAW / "fashion-mnist" / "classes.txt", dest / "classes.txt")
    return dest


def make_small_target(dest: Path, per_class: int = 30, classes: int = 10) -> Path:
    """The first images of each real Animal-MNIST class folder."""
    _require_raw()
    for class_dir in sorted((RAW / "animal-mnist").iterdir())[:classes]:
        (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, dest / class_dir.name / image.name)
    return dest


def tiny_spec(classes, channels: int = 1, size: int = 28, widths=(8, 16, 32), mean=None, std=None):
    """Graft's own small ResNet, tiny: what tests export, gate and serve when the model's quality does not matter."""
    from components.network import ModelSpec
    from deploy.contract import COLOR_MODES, Contract

    contract = Contract(COLOR_MODES[channels], size, size, tuple(mean or (0.5,) * channels), tuple(std or (0.5,) * channels))
    return ModelSpec.own_resnet(tuple(classes), contract, tuple(widths))


def tiny_params(**overrides) -> dict:
    """params.yaml for tests: the real schema, small sizes, a few seconds a stage."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["sources"]["pipeline"]["fashion-mnist"]["data"].update(val_size=100)
    params["sources"]["pretrained"]["efficientnet-lite0"].update(image_size=32)
    params["data"]["target"].update(val_size=40, test_size=60, labels_per_class=5)
    # Both candidates are scored; the fast own ResNet is fine-tuned (tests/test_pipeline.py covers `auto`).
    params["selection"].update(mode="report", use="fashion-mnist")
    params["pretrain"].update(epochs=1, batch_size=64)
    params["finetune"].update(steps=12, batch_size=16, lp_steps=4, eval_every_steps=4)
    # A model trained for seconds is noise: the gates start wide open (no accuracy gap is big enough to count
    # as worse), tests that gate narrow them.
    params["gates"].update(min_accuracy=0.0, min_macro_f1=0.0, min_effect=1.0, large_batch=32, max_ece=1.0)
    # 60 test images: one changed answer is 1.7 points. Every variant is published, so the registry and server
    # paths of each are exercised; tests of the accuracy bound set it themselves.
    params["export"].update(max_accuracy_drop=1.0)
    # Test servers poll every 0.3 s: traffic changes the tests make take effect a second later, not eight.
    params["serving"].update(poll_seconds=0.3, switch_lead_seconds=1.0)
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return params


def prepared_small_target(tmp: Path, **overrides):
    """tiny_params (with `overrides`) and the real target slice prepared at 28 px: what training tests train on."""
    from components.config import parse_params
    from components.data import load_splits, prepare

    params = parse_params(tiny_params(**{"data.target.path": str(make_small_target(tmp / "raw")), **overrides}))
    prepare(params.data.target, params.data, 1, [28], params.seed, tmp / "t.npz", tmp / "t.json")
    return params, load_splits(tmp / "t.npz")


def make_workspace(root: Path, params: dict | None = None) -> Path:
    """A project folder as a user has it: dvc.yaml, params.yaml, DVC-tracked raw data, the code it names."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT / "dvc.yaml", root / "dvc.yaml")
    for code in ("components", "deploy", "flows"):  # dvc.yaml lists code as deps; deployments run flows/
        (root / code).symlink_to(PROJECT / code)
    (root / "params.yaml").write_text(yaml.safe_dump(params or tiny_params(), sort_keys=False))
    make_small_source(root / "data" / "raw" / "fashion-mnist")
    make_small_target(root / "data" / "raw" / "animal-mnist")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/fashion-mnist", "data/raw/animal-mnist"], cwd=root, check=True)
    return root


# Using any of these makes a test `slow`: each starts a server or needs the whole pipeline run once. (A fresh
# project from workspace_factory takes a few seconds: a test that runs its pipeline is marked slow itself.)
SLOW_FIXTURES = frozenset({"candidate_template", "repro_workspace", "mlflow_server", "prefect_server"})


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per CPU the run may use (xdist would count physical cores: 1 where two vCPUs are one
    core's two threads), at most 4: each worker builds the session's servers and finished workspace once."""
    return min(4, USABLE_CORES)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def wait_until(condition, seconds: float, failure, interval: float = 0.05, process: subprocess.Popen | None = None):
    """Poll `condition` until it returns something true (returned), failing with `failure` (a message, or a function
    that says what was seen) after `seconds` or once `process` has ended: a wait on the event itself, never a guess
    of how long it takes."""
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        message = failure() if callable(failure) else failure
        assert process is None or process.poll() is None, f"the process ended first: {message}"
        assert time.monotonic() < deadline, f"{message} (waited {seconds:g} s)"
        time.sleep(interval)
    return found


def _fingerprint(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of a workspace (not git's, not the code symlinked from this checkout): its size and mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):  # does not follow the symlinked code folders
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                stat = path.stat()
                found[path.relative_to(root).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    return found


def unchanged_at_teardown(root: Path):
    """A context for a session fixture's yield: fails the run if a test wrote to the shared workspace (tests that
    change a workspace change their own copy)."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        before = _fingerprint(root)
        yield
        after = _fingerprint(root)
        changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
        if changed:
            pytest.fail(f"a test changed the shared workspace {root} (copy it with copy_workspace): {changed[:20]}")

    return guard()


@pytest.fixture(scope="session")
def workspace_factory(tmp_path_factory):
    def make(name: str, params: dict | None = None) -> Path:
        return make_workspace(tmp_path_factory.mktemp(name), params)

    return make


def dvc_repro(root: Path, *targets: str) -> subprocess.CompletedProcess:
    """`dvc repro [TARGETS]` exactly as a user types it, with this venv's scripts on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", *targets], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def stages_ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@.-]+)'", output)


@pytest.fixture(scope="session")
def candidate_template(workspace_factory):
    """A workspace after one full `dvc repro`: a candidate, neither judged nor published. Never changed: tests
    that need a finished pipeline copy it (copy_workspace), so one repro serves them all."""
    root = workspace_factory("template")
    done = dvc_repro(root)
    with unchanged_at_teardown(root):
        yield root, stages_ran(done.stdout)


def copy_workspace(template: Path, dest: Path, registry: bool = False) -> Path:
    """A copy of a workspace with its DVC cache and outputs: DVC finds it up to date. Without its registry, or with
    `registry` a copy of its own (the sqlite store, its artifacts and outputs/, every path in them moved to `dest`),
    so that a test may publish, promote or resume there without touching the original."""
    skip = (".graft.lock",) if registry else ("mlflow.db", "mlartifacts", "outputs", ".graft.lock")
    shutil.copytree(template, dest, symlinks=True, ignore=shutil.ignore_patterns(*skip))
    if registry:
        _move_paths(dest, str(Path(template).resolve()), str(Path(dest).resolve()))
    return dest


def _move_paths(root: Path, old: str, new: str) -> None:
    """The copied registry's absolute paths (artifact locations, tracking URIs) point into the copy."""
    import sqlite3

    if (root / "mlflow.db").exists():
        with sqlite3.connect(root / "mlflow.db") as db:
            tables = [name for (name,) in db.execute("select name from sqlite_master where type = 'table'")]
            for table in tables:
                for column in [row[1] for row in db.execute(f'pragma table_info("{table}")') if "CHAR" in row[2].upper()
                               or "TEXT" in row[2].upper()]:
                    db.execute(f'update "{table}" set "{column}" = replace("{column}", ?, ?) where instr("{column}", ?) > 0',
                               (old, new, old))
        db.close()
    for record in (root / "outputs").glob("*.json"):
        record.write_text(record.read_text().replace(old, new))


@pytest.fixture(scope="session")
def repro_workspace(candidate_template, tmp_path_factory):
    """`dvc repro` then `graft publish`, as a user of the DVC path runs them; the metrics as they were then. Read
    only: a test that reruns DVC or publishes again does it in its own copy (copy_workspace(..., registry=True)
    keeps the published version 1)."""
    template, ran = candidate_template
    root = copy_workspace(template, tmp_path_factory.mktemp("repro") / "ws")
    graft_cli(root, f"sqlite:///{root / 'mlflow.db'}", "publish")
    metrics = {name: json.loads((root / "metrics" / f"{name}.json").read_text()) for name in ("evaluate", "export")}
    metrics["pretrain"] = json.loads((root / "metrics" / "pretrain-fashion-mnist.json").read_text())
    with unchanged_at_teardown(root):
        yield root, ran, metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(root: Path, port: int, wait: bool = True) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and served artifacts, as a user starts it."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    if wait and not wait_healthy(f"{url}/health", 90):
        stop_process_group(server)
        pytest.fail("mlflow server did not become healthy in 90 s")
    return server, url


@contextlib.contextmanager
def onnx_server(onnx_file: Path, model: str, log_folder: Path, *options: str, env: dict | None = None,
                wrap: tuple[str, ...] = ()):
    """`python -m deploy.server` serving `onnx_file` as `model` on a free port with `options` (its cache beside the
    file), until the block ends; yields
    (base URL, log path, process). Its output goes to a file in `log_folder`, not a pipe: a pipe nobody reads fills
    and blocks the server. `wrap`: a command the server runs under (it ends with the server's own command line)."""
    port = free_port()
    log_path = log_folder / f"server-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*wrap, sys.executable, "-m", "deploy.server", "--onnx-file", str(onnx_file), "--model", model,
             "--port", str(port), "--cache-dir", str(onnx_file.parent), *options],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(f"{base}/v2/health/ready", 60, process):
            raise AssertionError(f"the server did not come up: {log_path.read_text()[-3000:]}")
        yield base, log_path, process
    finally:
        process.terminate()
        process.wait(timeout=20)


def wait_healthy(url: str, seconds: float, process: subprocess.Popen | None = None) -> bool:
    """Whether `url` answers 200 within `seconds` (not waiting on when the server's `process` has ended)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 30) -> None:
    """SIGTERM, then SIGKILL for a group still busy after `grace_seconds` (a worker waiting on its flow run's process)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The run's one MLflow server: tests that need a registry over HTTP share it, each file under its own registered
    model name (tests/test_server.py served-classifier, tests/test_registry_http.py graft-classifier). A test starts
    its own server only when it stops it, starts it late, or needs a second registry or another backend store."""
    server, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), free_port())
    yield url
    stop_process_group(server)


def graft_cli(root: Path, url: str, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`graft ARGS` in `root` against the registry at `url`; `env` (e.g. prefect_server's) instead of this process's."""
    env = {**(env or os.environ), "MLFLOW_TRACKING_URI": url,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "graft", *args], cwd=root, env=env, capture_output=True, text=True)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The run's one Prefect server: `prefect server start` on 127.0.0.1 in a temporary home; yields the environment
    that points at it, and points this process's flows at it too. Tests tell their runs apart by flow run id or by
    time, never by being alone on the server. (tests/test_postgres.py starts its own, on PostgreSQL: that is what
    it tests.)"""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    assert wait_healthy(f"{url}/health", 120), "prefect server did not start"
    with temporary_settings({PREFECT_API_URL: url}):
        yield env
    stop_process_group(server)
