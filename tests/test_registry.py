"""Gates and promotion end to end, on a real MLflow store: reject, challenger, promote, rollback, history."""
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from components.registry import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    alias_version,
    champion_lineage,
    history,
    promote,
    rollback,
)
from tests.conftest import dvc_repro, read_idx, stages_ran, tiny_params


def _set_params(root, **overrides):
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _client(root) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def _registration(root) -> dict:
    return json.loads((root / "outputs" / "registration.json").read_text())


def _gates(root) -> dict:
    return json.loads((root / "reports" / "gates.json").read_text())


@pytest.fixture(scope="module")
def gated(workspace_factory):
    root = workspace_factory("gated")
    dvc_repro(root)
    return root


def test_first_model_passing_its_gates_becomes_champion(gated):
    client, registration = _client(gated), _registration(gated)
    assert registration["version"] == "1" and registration["promoted"]
    assert alias_version(client, "graft-classifier", CHAMPION) == "1"
    assert alias_version(client, "graft-classifier", CHALLENGER) == "1"
    tags = client.get_model_version("graft-classifier", "1").tags
    assert tags["graft.gates"] == "passed" and tags["gate.no_regression.verdict"] == "skipped"
    assert tags["graft.serving_provider"] == "CPUExecutionProvider"


def test_candidate_worse_than_champion_is_rejected_and_champion_stays(gated):
    _set_params(gated, **{"finetune.lr": 1e-7, "gates.max_regression": 0.0})  # a head that barely moves: worse
    dvc_repro(gated)
    report, registration = _gates(gated), _registration(gated)
    verdicts = {g["name"]: g["verdict"] for g in report["gates"]}
    assert verdicts["no_regression"] == "failed" and report["champion_version"] == "1"
    assert [n for n, v in verdicts.items() if v == "failed"] == ["no_regression"]
    client = _client(gated)
    assert registration["version"] == "2" and not registration["challenger"]
    assert client.get_model_version("graft-classifier", "2").tags["graft.gates"] == "failed"
    assert alias_version(client, "graft-classifier", CHAMPION) == "1"
    assert alias_version(client, "graft-classifier", CHALLENGER) == "1"
    with pytest.raises(RegistryError, match="refusing to promote graft-classifier v2: failed gates: no_regression"):
        promote(client, "graft-classifier", "2")


def test_good_candidate_becomes_challenger_then_champion_on_promote_then_rolls_back(gated):
    _set_params(gated, **{"finetune.lr": 0.003, "finetune.steps": 16, "gates.max_regression": 1.0})
    done = dvc_repro(gated)
    assert stages_ran(done.stdout) == ["resolve_sources", "baseline", "finetune", "evaluate", "export", "gate", "register"]
    client = _client(gated)
    assert _registration(gated)["version"] == "3"
    assert alias_version(client, "graft-classifier", CHALLENGER) == "3"
    assert alias_version(client, "graft-classifier", CHAMPION) == "1", "auto_promote is off"

    cli = [sys.executable, "-m", "graft"]
    promoted = subprocess.run([*cli, "promote", "--reason", "better on animals"], cwd=gated, capture_output=True, text=True)
    assert promoted.returncode == 0, promoted.stderr
    assert alias_version(client, "graft-classifier", CHAMPION) == "3"

    rolled = subprocess.run([*cli, "rollback", "--reason", "bad in production"], cwd=gated, capture_output=True, text=True)
    assert rolled.returncode == 0, rolled.stderr
    assert alias_version(client, "graft-classifier", CHAMPION) == "1"

    again = subprocess.run([*cli, "rollback"], cwd=gated, capture_output=True, text=True)
    assert again.returncode == 2 and "no previous champion to roll back to" in again.stderr

    moves = history(client, "graft-classifier")
    assert [(m.alias, m.version, m.previous, m.action) for m in moves] == [
        ("challenger", "1", None, "challenger"),
        ("champion", "1", None, "promote"),
        ("challenger", "3", "1", "challenger"),
        ("champion", "3", "1", "promote"),
        ("champion", "1", "3", "rollback"),
    ]
    assert all(m.status == "completed" for m in moves)
    assert [m.reason for m in moves][-2:] == ["better on animals", "bad in production"]
    printed = subprocess.run([*cli, "history"], cwd=gated, capture_output=True, text=True, check=True).stdout
    assert printed.index("better on animals") < printed.index("bad in production")


def test_lineage_walks_back_through_rollbacks():
    from components.registry import AliasMove

    def move(version, action):
        return AliasMove("champion", version, None, action, "me", "", "", "completed", "t")

    moves = [move("1", "promote"), move("2", "promote"), move("3", "promote"), move("2", "rollback"), move("1", "rollback")]
    assert champion_lineage(moves) == ["1"]
    assert champion_lineage(moves[:4]) == ["1", "2"]


def test_negative_transfer_is_rejected_by_name(workspace_factory):
    """A source pretrained on shuffled labels: its features are worse than none."""
    params = tiny_params(**{
        "finetune.strategy": "linear_probe", "finetune.steps": 60, "gates.min_transfer_gain": 0.0,
        "data.target.labels_per_class": 10, "data.target.val_size": 20,
    })
    root = workspace_factory("shuffled", params)
    labels = root / "data/raw/fashion-mnist/train-labels-idx1-ubyte.gz"
    shuffled = np.random.default_rng(0).permutation(read_idx(labels))
    header = gzip.decompress(labels.read_bytes())[:8]
    labels.write_bytes(gzip.compress(header + shuffled.astype(np.uint8).tobytes(), mtime=0))
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/fashion-mnist"], cwd=root, check=True)
    dvc_repro(root)
    report = _gates(root)
    failed = [g for g in report["gates"] if g["verdict"] == "failed"]
    assert [g["name"] for g in failed] == ["transfer.gain"]
    assert failed[0]["detail"].startswith("negative transfer")
    client = _client(root)
    assert alias_version(client, "graft-classifier", CHALLENGER) is None
    assert alias_version(client, "graft-classifier", CHAMPION) is None
    with pytest.raises(RegistryError, match="no 'challenger' version to promote"):
        promote(client, "graft-classifier")
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(client, "graft-classifier")
