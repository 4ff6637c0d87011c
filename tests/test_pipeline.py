"""DVC in a real temporary repo: stages run once, skip when nothing changed, rerun only what a change touches."""
import json

import yaml
from mlflow import MlflowClient

from components.pipeline import STAGE_ORDER
from tests.conftest import dvc_repro, stages_ran


def test_first_repro_runs_every_stage_in_order(repro_workspace):
    root, ran, metrics = repro_workspace
    assert ran == list(STAGE_ORDER)
    assert metrics["export"]["passed"] and metrics["export"]["argmax_agreement"] == 1.0
    for output in ("models/model.onnx", "plots/confusion_transfer.png", "plots/curves.png", "outputs/registration.json"):
        assert (root / output).stat().st_size > 0, output


def test_second_repro_does_nothing(repro_workspace):
    root, _, _ = repro_workspace
    done = dvc_repro(root)
    assert stages_ran(done.stdout) == []
    assert "Data and pipelines are up to date" in done.stdout


def test_registered_version_carries_lineage_and_metrics(repro_workspace):
    root, _, metrics = repro_workspace
    registration = json.loads((root / "outputs" / "registration.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version(registration["model_name"], registration["version"])
    assert version.tags["graft.strategy"] == "finetune"
    assert version.tags["graft.data_version"] == json.loads((root / "reports/prepare-target.json").read_text())["data_version"]
    assert float(version.tags["metric.test.accuracy"]) == metrics["evaluate"]["transfer"]["accuracy"]
    run = client.get_run(registration["run_id"])
    assert run.data.params["finetune.strategy"] == "finetune"
    curve = client.get_metric_history(run.info.run_id, "transfer.val_accuracy")
    assert [m.step for m in curve] == [4, 8, 12]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/confusion_transfer.png", "plots/curves.png"} <= artifacts
    source = client.get_run(registration["source_run_id"])
    assert source.data.tags["graft.source_sha256"] == version.tags["graft.source_sha256"]


def test_changing_a_finetune_param_reruns_only_finetune_onwards(repro_workspace):
    root, _, before = repro_workspace
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["finetune"]["strategy"] = "lp_ft"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = dvc_repro(root)
    assert stages_ran(done.stdout) == ["finetune", "evaluate", "export", "gate", "register"]
    after = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert after["scratch"] == before["evaluate"]["scratch"], "the scratch baseline was not retrained"
    registration = json.loads((root / "outputs" / "registration.json").read_text())
    assert registration["version"] == "2"
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    first = client.get_model_version(registration["model_name"], "1")
    assert first.tags["graft.source_run_id"] == registration["source_run_id"], "one source run serves every fine-tune"
