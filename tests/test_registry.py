"""Judging and publishing end to end, on a real MLflow store: reject, challenger, promote, rollback, history;
registration idempotent by content; a registry that lacks the candidate gets it."""
import gzip
import subprocess
import sys

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from components.config import load_params
from components.judge import judge
from components.register import publish
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
from tests.conftest import copy_workspace, dvc_repro, read_idx, stages_ran, tiny_params


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


def _judge_and_publish(root) -> tuple[dict, dict]:
    """What `graft publish` (and the flow after the stages) does, in-process."""
    params = load_params(root / "params.yaml")
    report = judge(root, params)
    return report.to_dict(), publish(root, params, report)


@pytest.fixture(scope="module")
def gated(candidate_template, tmp_path_factory):
    return copy_workspace(candidate_template[0], tmp_path_factory.mktemp("gated") / "ws")


def test_first_model_passing_its_gates_becomes_champion_and_publishing_again_registers_nothing(gated):
    _, registration = _judge_and_publish(gated)
    client = _client(gated)
    assert registration["version"] == "1" and registration["promoted"] and registration["new"]
    assert alias_version(client, "graft-classifier", CHAMPION) == "1"
    assert alias_version(client, "graft-classifier", CHALLENGER) == "1"
    tags = client.get_model_version("graft-classifier", "1").tags
    assert tags["graft.gates"] == "passed" and tags["gate.no_regression.verdict"] == "skipped"
    assert tags["graft.serving_provider"] == "CPUExecutionProvider"
    assert tags["graft.candidate"] and tags["graft.run_id"] == registration["run_id"], "tagged in the registering call"

    _, again = _judge_and_publish(gated)
    assert (again["version"], again["new"], again["promoted"]) == ("1", False, True), "found by content, not duplicated"
    assert [str(v.version) for v in client.search_model_versions("name = 'graft-classifier'")] == ["1"]


def test_a_registry_that_lacks_the_candidate_gets_it(gated, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    report, registration = _judge_and_publish(gated)
    assert (registration["version"], registration["new"]) == ("1", True)
    assert report["champion_version"] is None, "judged against that registry's (absent) champion"
    other = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")
    assert alias_version(other, "graft-classifier", CHAMPION) == "1"


def test_candidate_worse_than_champion_is_rejected_and_champion_stays(gated):
    _set_params(gated, **{"finetune.lr": 1e-7, "gates.min_effect": 0.0})  # a head that barely moves: worse
    dvc_repro(gated)
    report, registration = _judge_and_publish(gated)
    verdicts = {g["name"]: g["verdict"] for g in report["gates"]}
    assert verdicts["no_regression"] == "failed" and report["champion_version"] == "1"
    assert report["candidate_vs_champion"]["p_value"] < 0.05, "declared worse only because it is significantly worse"
    assert [n for n, v in verdicts.items() if v == "failed"] == ["no_regression"]
    client = _client(gated)
    assert registration["version"] == "2" and not registration["challenger"]
    assert client.get_model_version("graft-classifier", "2").tags["graft.gates"] == "failed"
    assert alias_version(client, "graft-classifier", CHAMPION) == "1"
    assert alias_version(client, "graft-classifier", CHALLENGER) == "1"
    with pytest.raises(RegistryError, match="refusing to promote graft-classifier v2: failed gates: no_regression"):
        promote(client, "graft-classifier", "2")


def test_good_candidate_becomes_challenger_then_champion_on_promote_then_rolls_back(gated):
    _set_params(gated, **{"finetune.lr": 0.003, "finetune.steps": 16, "gates.min_effect": 1.0})
    done = dvc_repro(gated)
    assert stages_ran(done.stdout) == ["resolve_sources", "baseline", "finetune", "evaluate", "export"]
    client = _client(gated)
    assert _judge_and_publish(gated)[1]["version"] == "3"
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
    unknown = subprocess.run([*cli, "promote", "--version", "7"], cwd=gated, capture_output=True, text=True)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "graft-classifier has no version '7'; registered versions: 1, 2, 3" in unknown.stderr

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
    """A source pretrained on shuffled labels: its features are worse than none, significantly."""
    params = tiny_params(**{
        "finetune.strategy": "linear_probe", "finetune.steps": 60, "gates.min_effect": 0.01,
        "data.target.labels_per_class": 10, "data.target.val_size": 20, "data.target.test_size": 150,
    })
    root = workspace_factory("shuffled", params)
    labels = root / "data/raw/fashion-mnist/train-labels-idx1-ubyte.gz"
    shuffled = np.random.default_rng(0).permutation(read_idx(labels))
    header = gzip.decompress(labels.read_bytes())[:8]
    labels.write_bytes(gzip.compress(header + shuffled.astype(np.uint8).tobytes(), mtime=0))
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data/raw/fashion-mnist"], cwd=root, check=True)
    dvc_repro(root)
    report, _ = _judge_and_publish(root)
    failed = [g for g in report["gates"] if g["verdict"] == "failed"]
    assert [g["name"] for g in failed] == ["transfer.gain"]
    assert failed[0]["detail"].startswith("negative transfer") and report["transfer_vs_scratch"]["p_value"] < 0.05
    client = _client(root)
    assert alias_version(client, "graft-classifier", CHALLENGER) is None
    assert alias_version(client, "graft-classifier", CHAMPION) is None
    with pytest.raises(RegistryError, match="no 'challenger' version to promote"):
        promote(client, "graft-classifier")
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(client, "graft-classifier")
