"""promote, rollback and the champion gate fetch a version the way the server does (deploy/source.py RegistrySource:
the artifact store's bytes checked against the sha256 registered for each file), on a real MLflow store: a version
whose stored file was changed after registration is refused in one line, and the alias does not move."""
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from mlflow import MlflowClient

from components.judge import judge
from components.register import publish
from components.registry import CHALLENGER, CHAMPION, alias_version, history
from components.settings import load_settings
from deploy.digest import sha256_file
from deploy.variants import INT8, relative_path, sha_tag
from tests.conftest import copy_workspace, graft_cli

MODEL = "graft-classifier"


def _stored(client: MlflowClient, version: str, file: str = "model.onnx") -> Path:
    """Where the embedded store keeps a version's file: under the project's mlartifacts folder."""
    path = Path(unquote(urlparse(client.get_model_version_download_uri(MODEL, version)).path)) / file
    assert "mlartifacts" in path.parts and path.is_file(), path
    return path


@contextmanager
def _tampered(path: Path):
    """One byte of the stored file overwritten (what a bad copy, a restore from the wrong backup or an attacker
    leaves), put back afterwards."""
    original = path.read_bytes()
    middle = len(original) // 2
    path.write_bytes(original[:middle] + bytes([original[middle] ^ 0xFF]) + original[middle + 1:])
    try:
        yield
    finally:
        path.write_bytes(original)


def _refused(done, action: str, version: str, file: str) -> None:
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    first, *rest = done.stderr.strip().splitlines()
    assert first.startswith(f"graft: error: refusing to {action} {MODEL} v{version}: its stored {file} no longer "
                            f"matches the sha256 registered for it (sha256 "), first
    assert "it was changed or replaced after registration" in first
    assert [line for line in rest if not line.startswith("  (full trace: ")] == [], "one line, then where the trace is"


@pytest.fixture(scope="module")
def registry(candidate_template, tmp_path_factory):
    """v1 the champion (the first model to pass), v2 the challenger: a second version of the same candidate files,
    registered as another candidate by an export setting that is not rerun (cheaper than a second training)."""
    root = copy_workspace(candidate_template[0], tmp_path_factory.mktemp("verified") / "ws")
    url = f"sqlite:///{root / 'mlflow.db'}"
    graft_cli(root, url, "publish")
    params = load_settings(root / "params.yaml")
    other = params.model_copy(update={"export": params.export.model_copy(
        update={"calibration_percentile": params.export.calibration_percentile - 0.001})})
    assert publish(root, other, judge(root, params))["version"] == "2"
    client = MlflowClient(tracking_uri=url)
    assert (alias_version(client, MODEL, CHAMPION), alias_version(client, MODEL, CHALLENGER)) == ("1", "2")
    return root, url, client


def test_promote_refuses_a_version_whose_stored_file_changed_and_the_champion_stays(registry):
    root, url, client = registry
    moves = len(history(client, MODEL))
    with _tampered(_stored(client, "2")):
        _refused(graft_cli(root, url, "promote", check=False), "promote", "2", "model.onnx")
    with _tampered(_stored(client, "2", relative_path(INT8))):  # a variant the server may serve is checked too
        _refused(graft_cli(root, url, "promote", check=False), "promote", "2", "variants/model.int8.onnx")
    assert alias_version(client, MODEL, CHAMPION) == "1", "the alias did not move"
    assert len(history(client, MODEL)) == moves, "not even a `started` record"

    graft_cli(root, url, "promote", "--reason", "the file is intact again")  # the same version, its bytes restored
    assert alias_version(client, MODEL, CHAMPION) == "2"
    assert sha256_file(_stored(client, "2")) == client.get_model_version(MODEL, "2").tags[sha_tag("fp32")]


def test_rollback_refuses_a_target_whose_stored_file_changed(registry):
    root, url, client = registry
    assert alias_version(client, MODEL, CHAMPION) == "2"
    with _tampered(_stored(client, "1")):
        _refused(graft_cli(root, url, "rollback", check=False), "roll back to", "1", "model.onnx")
    assert alias_version(client, MODEL, CHAMPION) == "2"


def test_the_champion_gate_fails_on_a_champion_whose_stored_file_changed(registry):
    """Nothing the server would refuse is compared with: the regression gate fails and says why."""
    root, _, client = registry
    with _tampered(_stored(client, "2")):
        report = judge(root, load_settings(root / "params.yaml"))
    gate = next(g for g in report.gates if g.name == "no_regression")
    assert gate.verdict == "failed" and report.champion_version == "2"
    assert gate.detail.startswith(f"champion v2 cannot be compared: {MODEL} v2 at sqlite:///"), gate.detail
    assert "the artifact store's model.onnx has sha256" in gate.detail and "graft rollback" in gate.detail
