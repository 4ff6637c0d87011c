"""Judging and publishing end to end, on a real MLflow store: reject, challenger, promote, rollback, history;
registration idempotent by content; a registry that lacks the candidate gets it.

A worse model is made worse by construction, never by hoping a tiny training run turns out badly on this CPU:
its head is negated, so it answers the class its network finds least likely (right almost nowhere, and wrong
wherever the unmodified model is right)."""
import sqlite3
import subprocess
import sys
import time
from datetime import datetime

import pytest
import torch
import yaml
from mlflow import MlflowClient

from components.settings import load_settings
from components.judge import judge
from components.layout import Layout
from components.network import load_checkpoint, save_checkpoint
from components.register import publish
from components.registry import (
    CHALLENGER,
    CHAMPION,
    AliasMove,
    RegistryError,
    alias_version,
    canary_share,
    champion_lineage,
    format_traffic,
    history,
    move_alias,
    promote,
    read_history,
    rollback,
    sqlite_change_key,
    traffic_timeline,
)
from deploy.tags import TRAFFIC_AT_TAG
from tests.conftest import copy_workspace, dvc_repro, stages_ran


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


def _answer_the_least_likely_class(root) -> None:
    """The fine-tuned model with its head negated, recorded by DVC as the finetune stage's output; evaluate and
    export rerun on it. Every test image the unmodified model gets right, this one gets wrong."""
    model, meta = load_checkpoint(root / Layout.transfer_model)
    with torch.no_grad():
        model.head.weight.neg_()
        model.head.bias.neg_()
    save_checkpoint(model, root / Layout.transfer_model, {k: v for k, v in meta.items() if k != "spec"})
    subprocess.run([sys.executable, "-m", "dvc", "commit", "-q", "-f", "finetune"], cwd=root, check=True)
    dvc_repro(root)


def _versions(client) -> list[str]:
    return sorted((str(v.version) for v in client.search_model_versions("name = 'graft-classifier'")), key=int)


def _judge_and_publish(root) -> tuple[dict, dict]:
    """What `graft publish` (and the flow after the stages) does, in-process."""
    params = load_settings(root / "params.yaml")
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
    client = _client(gated)
    champion = alias_version(client, "graft-classifier", CHAMPION)
    # Transfer vs scratch is not what this test is about: only the comparison with the champion may fail.
    _set_params(gated, **{"gates.min_effect": 0.0, "gates.transfer": "off"})
    _answer_the_least_likely_class(gated)
    report, registration = _judge_and_publish(gated)
    verdicts = {g["name"]: g["verdict"] for g in report["gates"]}
    assert verdicts["no_regression"] == "failed" and report["champion_version"] == champion
    assert report["candidate_vs_champion"]["p_value"] < 0.05, "declared worse only because it is significantly worse"
    assert [n for n, v in verdicts.items() if v == "failed"] == ["no_regression"]
    rejected = registration["version"]
    assert rejected not in (champion, None) and not registration["challenger"]
    assert client.get_model_version("graft-classifier", rejected).tags["graft.gates"] == "failed"
    assert alias_version(client, "graft-classifier", CHAMPION) == champion
    assert alias_version(client, "graft-classifier", CHALLENGER) == champion
    with pytest.raises(RegistryError, match=f"refusing to promote graft-classifier v{rejected}: failed gates: no_regression"):
        promote(client, "graft-classifier", rejected)

    # Nothing changed since: a second run repeats the verdict, as a rejection, without starting Prefect.
    rerun = subprocess.run([sys.executable, "-m", "graft", "run"], cwd=gated, capture_output=True, text=True)
    assert rerun.returncode == 3, rerun.stdout + rerun.stderr
    assert f"judged already and rejected: graft-classifier v{rejected} failed no_regression (" in rerun.stderr
    assert "graft run --force" in rerun.stderr and "Traceback" not in rerun.stderr


def test_good_candidate_becomes_challenger_then_champion_on_promote_then_rolls_back(gated):
    _set_params(gated, **{"finetune.lr": 0.003, "finetune.steps": 16, "gates.min_effect": 1.0, "gates.transfer": "not_worse"})
    done = dvc_repro(gated)
    assert stages_ran(done.stdout) == ["resolve_sources", "select_source", "baseline", "finetune", "calibrate", "evaluate",
                                       "export"]
    client = _client(gated)
    champion = alias_version(client, "graft-classifier", CHAMPION)
    good = _judge_and_publish(gated)[1]["version"]
    assert good == _versions(client)[-1], "a new version"
    assert alias_version(client, "graft-classifier", CHALLENGER) == good
    assert alias_version(client, "graft-classifier", CHAMPION) == champion, "auto_promote is off"

    cli = [sys.executable, "-m", "graft"]
    promoted = subprocess.run([*cli, "promote", "--reason", "better on animals"], cwd=gated, capture_output=True, text=True)
    assert promoted.returncode == 0, promoted.stderr
    assert alias_version(client, "graft-classifier", CHAMPION) == good

    rolled = subprocess.run([*cli, "rollback", "--reason", "bad in production"], cwd=gated, capture_output=True, text=True)
    assert rolled.returncode == 0, rolled.stderr
    assert alias_version(client, "graft-classifier", CHAMPION) == champion

    again = subprocess.run([*cli, "rollback"], cwd=gated, capture_output=True, text=True)
    assert again.returncode == 2 and "no previous champion to roll back to" in again.stderr
    unknown = subprocess.run([*cli, "promote", "--version", "77"], cwd=gated, capture_output=True, text=True)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert f"graft-classifier has no version '77'; registered versions: {', '.join(_versions(client))}" in unknown.stderr

    moves = [(m.alias, m.version, m.previous, m.action) for m in history(client, "graft-classifier")]
    assert moves[-3:] == [
        ("challenger", good, champion, "challenger"),
        ("champion", good, champion, "promote"),
        ("champion", champion, good, "rollback"),
    ]
    assert moves[:2] == [("challenger", champion, None, "challenger"), ("champion", champion, None, "promote")]
    assert all(m.status == "completed" for m in history(client, "graft-classifier"))
    assert [m.reason for m in history(client, "graft-classifier")][-2:] == ["better on animals", "bad in production"]
    printed = subprocess.run([*cli, "history"], cwd=gated, capture_output=True, text=True, check=True).stdout
    assert printed.index("better on animals") < printed.index("bad in production")

    # The challenger on a canary share: bad shares refused in a line, a good one recorded, shown, and rolled back.
    for bad, message in (("150", "is not a percent from 0 to 100"), ("ten", "is not a percent from 0 to 100")):
        refused = subprocess.run([*cli, "canary", "set", bad], cwd=gated, capture_output=True, text=True)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
    made = time.time()
    printed = subprocess.run([*cli, "canary", "set", "20", "--reason", "a fifth"], cwd=gated, check=True,
                             capture_output=True, text=True).stdout
    scheduled = float(client.get_registered_model("graft-classifier").tags[TRAFFIC_AT_TAG])
    assert made + 1.0 <= scheduled <= time.time() + 1.0, "serving.switch_lead_seconds (1 s in tests) ahead"
    effective = printed.split("every server following the registry switches at ")[1].split(" UTC")[0]
    assert abs(datetime.fromisoformat(effective).timestamp() - scheduled) < 1e-3, "the moment the servers read"
    assert [m.effective for m in history(client, "graft-classifier") if m.share == 20] == [effective]
    status = subprocess.run([*cli, "canary", "status"], cwd=gated, capture_output=True, text=True, check=True).stdout
    assert f"champion v{champion} answers 80% of live traffic, the canary challenger v{good} 20%" in status
    assert canary_share(client, "graft-classifier") == 20
    rolled = subprocess.run([*cli, "rollback"], cwd=gated, capture_output=True, text=True, check=True)
    assert "20% -> 0%" in rolled.stdout and alias_version(client, "graft-classifier", CHAMPION) == champion
    shares = [(m.action, m.previous_share, m.share) for m in history(client, "graft-classifier") if m.share is not None]
    assert shares == [("canary", 0, 20), ("rollback", 20, 0)]
    move_alias(client, "graft-classifier", CHALLENGER, champion, "challenger", "test: the champion again")
    itself = subprocess.run([*cli, "canary", "set", "5"], cwd=gated, capture_output=True, text=True)
    assert itself.returncode == 2 and f"is v{champion}, the champion itself: there is nothing to canary" in itself.stderr


def test_history_is_answered_from_its_cache_until_the_store_changes(gated):
    """`graft history` on the embedded store: a second read answers from .graft/cache without importing MLflow, with
    the same moves; a move made since is seen at once; a damaged cache is read past; Graft's own writes keep it."""
    client, name = _client(gated), "graft-classifier"
    read = [sys.executable, "-c", "import sys; from components.registry import read_history; "
            "print(len(read_history('params.yaml')), 'mlflow' in sys.modules)"]

    def moves_and_mlflow() -> tuple[int, bool]:
        count, imported = subprocess.run(read, cwd=gated, capture_output=True, text=True, check=True).stdout.split()
        return int(count), imported == "True"

    known = len(history(client, name))
    assert moves_and_mlflow() == (known, True), "the first read asks the store"
    assert moves_and_mlflow() == (known, False), "the second is answered from the cache, without MLflow"
    assert read_history(gated / "params.yaml") == history(client, name)
    move_alias(client, name, CHALLENGER, alias_version(client, name, CHAMPION), "challenger", "test: seen at once")
    assert moves_and_mlflow() == (known + 1, True), "a write to the store changes its key"
    (gated / Layout.history_cache).write_text("{damaged")
    assert moves_and_mlflow() == (known + 1, True)
    assert read_history(gated / "params.yaml")[-1].reason == "test: seen at once"

    # A write made by Graft (a canary share, its rollback) keeps the cache: the next read needs no MLflow.
    champion = alias_version(client, name, CHAMPION)
    move_alias(client, name, CHALLENGER, _versions(client)[-1], "challenger", "test: a canary again")
    cli = [sys.executable, "-m", "graft"]
    for command in (["canary", "set", "10"], ["rollback"]):
        subprocess.run([*cli, *command], cwd=gated, capture_output=True, check=True)
        assert moves_and_mlflow() == (len(history(client, name)), False), f"after graft {' '.join(command)}"
    assert read_history(gated / "params.yaml") == history(client, name)
    move_alias(client, name, CHALLENGER, champion, "challenger", "test: the champion again")


def test_a_sqlite_store_changes_its_key_on_every_write_and_a_wal_store_has_none(tmp_path):
    store = tmp_path / "store.db"
    with sqlite3.connect(store) as db:
        db.execute("create table moves (at text)")
    key = sqlite_change_key(f"sqlite:///{store}")
    assert key is not None and key == sqlite_change_key(f"sqlite:///{store}")
    with sqlite3.connect(store) as db:
        db.execute("insert into moves values ('now')")
    assert sqlite_change_key(f"sqlite:///{store}") not in (None, key)
    with sqlite3.connect(store) as db:
        db.execute("pragma journal_mode=wal")
    assert sqlite_change_key(f"sqlite:///{store}") is None, "WAL writes leave the main file's counter"
    assert sqlite_change_key(f"sqlite:///{tmp_path / 'missing.db'}") is None
    assert sqlite_change_key("http://127.0.0.1:5000") is None


def test_lineage_walks_back_through_rollbacks():
    def move(version, action):
        return AliasMove("champion", version, None, action, "me", "", "", "completed", "t")

    moves = [move("1", "promote"), move("2", "promote"), move("3", "promote"), move("2", "rollback"), move("1", "rollback")]
    assert champion_lineage(moves) == ["1"]
    assert champion_lineage(moves[:4]) == ["1", "2"]


def test_the_traffic_timeline_follows_champion_moves_and_canary_shares():
    def move(alias, version, action, at, share=None, effective=None):
        return AliasMove(alias, version, None, action, "me", "", "", "completed", at, share=share,
                         previous_share=None if share is None else 0, effective=effective)

    moves = [move("challenger", "1", "challenger", "t1"), move("champion", "1", "promote", "t2"),
             move("challenger", "2", "challenger", "t3"), move("challenger", "2", "canary", "t4", 10),
             move("challenger", "2", "canary", "t5", 50, effective="t5 + lead"), move("champion", "2", "promote", "t6"),
             move("challenger", "2", "canary", "t7", 0)]
    assert [(span.since, span.shares) for span in traffic_timeline(moves)] == [
        ("t2", {"1": 100}), ("t4", {"1": 90, "2": 10}), ("t5 + lead", {"1": 50, "2": 50}), ("t6", {"2": 100})]
    assert "v1 90%, v2 10%" in format_traffic(traffic_timeline(moves))


def test_negative_transfer_is_rejected_by_name(candidate_template, tmp_path):
    """Transfer that answers the least likely class is significantly worse than the scratch model, by construction."""
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    _set_params(root, **{"gates.min_effect": 0.01})
    _answer_the_least_likely_class(root)
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
