"""DVC in a real temporary repo: stages run once, skip when nothing changed, rerun only what a change touches;
every source kind; the source chosen, its lineage, and the stages it takes.

repro_workspace and candidate_template (tests/conftest.py) are read, never changed: a test that reruns DVC or
publishes works on its own copy."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from components.data import load_splits
from components.dvc_runner import dvc_status, pending_stages
from components.export import read_metadata
from components.settings import parse_settings
from components.stage_runner import stage_order
from deploy.digest import sha256_file
from deploy.model import decode_image, load_model, softmax
from deploy.tags import CONTRACT_KEY
from deploy.variants import sha_tag
from tests.conftest import copy_workspace, dvc_repro, graft_cli, stages_ran, tiny_params, unchanged_at_teardown


def _params(root) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def _json(root, path) -> dict:
    return json.loads((root / path).read_text())


def test_first_repro_runs_every_stage_in_order(repro_workspace):
    root, ran, metrics = repro_workspace
    assert sorted(ran) == sorted(stage_order(parse_settings(_params(root))))
    position = {stage: i for i, stage in enumerate(ran)}
    for before, after in [("prepare_source@fashion-mnist", "pretrain@fashion-mnist"), ("pretrain@fashion-mnist", "select_source"),
                          ("prepare_target", "select_source"), ("select_source", "baseline"), ("select_source", "finetune"),
                          ("finetune", "calibrate"), ("calibrate", "evaluate"), ("baseline", "evaluate"),
                          ("calibrate", "export")]:
        assert position[before] < position[after], (before, after, ran)
    assert metrics["export"]["passed"] and metrics["export"]["argmax_agreement"] == 1.0
    for output in ("models/model.onnx", "plots/confusion_transfer.png", "plots/curves.png", "plots/source-selection.png",
                   "plots/reliability.png", "plots/mistakes.png", "plots/correct.png", "outputs/registration.json"):
        assert (root / output).stat().st_size > 0, output
    # The temperature fitted on the val split is in the exported file, and its contract says so.
    temperature = _json(root, "models/calibration.json")["temperature"]
    assert json.loads(read_metadata(root / "models/model.onnx")[CONTRACT_KEY])["temperature"] == temperature
    assert metrics["evaluate"]["calibration"]["temperature"] == temperature


def test_both_candidates_are_scored_and_the_chosen_one_is_fine_tuned(repro_workspace):
    root, _, _ = repro_workspace
    selection = _json(root, "reports/source-selection.json")
    assert {c["name"] for c in selection["candidates"]} == {"fashion-mnist", "efficientnet-lite0"}
    assert all(np.isfinite([c["logme"], c["leep"], c["nce"]]).all() for c in selection["candidates"])
    assert selection["mode"] == "report" and selection["chosen"] == "fashion-mnist"
    assert _json(root, "models/transfer.json")["source"]["name"] == "fashion-mnist"
    gates = {g["name"]: g for g in _json(root, "reports/gates.json")["gates"]}
    assert gates["contract.fp32.skew"]["verdict"] == "passed" and gates["contract.fp32.skew"]["value"] == 0.0
    skew = [g for name, g in gates.items() if name.startswith("contract.") and name.endswith(".skew")]
    assert len(skew) == 3 and all(g["verdict"] == "passed" for g in skew), skew  # fp32, int8, fp16
    ece = _json(root, "metrics/evaluate.json")["calibration"]["ece"]
    assert (gates["calibration.ece"]["value"], gates["calibration.ece"]["bound"]) == (ece, "<= 1")


def test_second_repro_does_nothing(candidate_template, tmp_path):
    root = copy_workspace(candidate_template[0], tmp_path / "ws")
    done = dvc_repro(root)
    assert stages_ran(done.stdout) == ["resolve_sources"], "only the stage that looks at the weights files runs"
    assert "didn't change, skipping" in done.stdout


def test_registered_version_carries_lineage_and_metrics(repro_workspace):
    root, _, metrics = repro_workspace
    registration = _json(root, "outputs/registration.json")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version(registration["model_name"], registration["version"])
    assert version.tags["graft.strategy"] == "finetune"
    assert version.tags["graft.data_version"] == _json(root, "reports/prepare-target.json")["data_version"]
    assert version.tags["graft.source.kind"] == "pipeline" and version.tags["graft.source.architecture"] == "graft_resnet"
    assert version.tags["graft.source.dataset"] == "fashion-mnist"
    assert float(version.tags["metric.test.accuracy"]) == pytest.approx(metrics["evaluate"]["transfer"]["accuracy"], abs=1e-6)
    assert "selection.efficientnet-lite0.logme" in client.get_run(registration["run_id"]).data.metrics
    run = client.get_run(registration["run_id"])
    assert run.data.params["finetune.strategy"] == "finetune"
    curve = client.get_metric_history(run.info.run_id, "transfer.val_accuracy")
    assert [m.step for m in curve] == [4, 8, 12]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/confusion_transfer.png", "plots/curves.png", "plots/source-selection.png", "plots/reliability.png",
            "plots/mistakes.png", "plots/correct.png"} <= artifacts
    calibration = metrics["evaluate"]["calibration"]
    assert run.data.metrics["calibration.ece"] == pytest.approx(calibration["ece"])
    assert run.data.metrics["calibration.temperature"] == _json(root, "models/calibration.json")["temperature"]
    source = client.get_run(registration["source_run_id"])
    assert source.data.tags["graft.source.sha256"] == version.tags["graft.source.sha256"]


def test_every_published_variant_is_registered_beside_fp32_with_its_hash_and_numbers(repro_workspace, tmp_path):
    root, _, metrics = repro_workspace
    variants = metrics["export"]["variants"]
    assert set(variants) == {"fp32", "int8", "fp16"} and all(v["published"] for v in variants.values())
    registration = _json(root, "outputs/registration.json")
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    version = client.get_model_version(registration["model_name"], registration["version"])
    folder = Path(download_artifacts(artifact_uri=client.get_model_version_download_uri(registration["model_name"],
                                                                                        registration["version"]),
                                     dst_path=str(tmp_path), tracking_uri=f"sqlite:///{root / 'mlflow.db'}"))
    for variant in ("int8", "fp16"):
        stored = folder / "variants" / f"model.{variant}.onnx"
        assert version.tags[sha_tag(variant)] == sha256_file(stored) == sha256_file(root / "models/variants" / stored.name)
        assert float(version.tags[f"graft.variant.{variant}.accuracy"]) == pytest.approx(variants[variant]["accuracy"], abs=1e-6)
    run = client.get_run(registration["run_id"])
    assert run.data.metrics["onnx.int8.accuracy"] == pytest.approx(variants["int8"]["accuracy"])


def _publish(root) -> dict:
    graft_cli(root, f"sqlite:///{root / 'mlflow.db'}", "publish")
    return _json(root, "outputs/registration.json")


def test_changing_a_finetune_param_retrains_only_the_transfer_and_changing_it_back_registers_nothing(repro_workspace,
                                                                                                    tmp_path):
    root = copy_workspace(repro_workspace[0], tmp_path / "ws", registry=True)  # v1 published, in a registry of its own
    before = repro_workspace[2]
    params = _params(root)
    params["finetune"]["strategy"] = "lp_ft"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = dvc_repro(root)
    # select_source reads the recipe (a race between candidates fine-tunes with it): it reruns, finds the same
    # source and writes the same files, so the scratch baseline is not retrained.
    assert stages_ran(done.stdout) == ["resolve_sources", "select_source", "finetune", "calibrate", "evaluate", "export"]
    after = _json(root, "metrics/evaluate.json")
    assert after["scratch"] == before["evaluate"]["scratch"], "the scratch baseline was not retrained"
    registration = _publish(root)
    assert (registration["version"], registration["new"]) == ("2", True)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    first = client.get_model_version(registration["model_name"], "1")
    assert first.tags["graft.source_run_id"] == registration["source_run_id"], "one source run serves every fine-tune"

    params["finetune"]["strategy"] = "finetune"  # back: DVC's run cache restores the first candidate's files
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_repro(root)
    again = _publish(root)
    assert (again["version"], again["new"]) == ("1", False), "the registry already holds this candidate: found, not duplicated"
    assert len(client.search_model_versions("name = 'graft-classifier'")) == 2


def test_the_joint_objective_domain_adaptation_and_fixmatch_are_params_and_unlabelled_images_a_dvc_input(candidate_template, tmp_path):
    template, _ = candidate_template
    root = copy_workspace(template, tmp_path / "ws")
    unlabeled = root / "data" / "raw" / "new-camera" / "day-1"  # subfolders are just folders: no classes
    unlabeled.mkdir(parents=True)
    images = sorted((root / "data" / "raw" / "animal-mnist").rglob("*.png"))[::3]
    for i, image in enumerate(images):
        shutil.copy(image, unlabeled / f"{i:04d}.png")
    (unlabeled / "notes.txt").write_text("not an image")
    subprocess.run([sys.executable, "-m", "graft", "data", "add", "data/raw/new-camera", "--as", "unlabeled"], cwd=root,
                   check=True, capture_output=True)  # versioned where it is, named data.unlabeled.new-camera
    params = _params(root)
    assert params["data"]["unlabeled"] == {"new-camera": {"path": "data/raw/new-camera"}}
    params["finetune"]["joint"].update(weight=0.5, schedule="linear", instance_weights="domain", source_examples=500)
    params["finetune"]["adaptation"].update(method="dann")
    # One self-training round whose teacher is sure enough of every image: each unlabelled image that is not a
    # labelled one already (nor a val or test image) becomes a label.
    params["finetune"]["semi_supervised"].update(method="fixmatch", batch_size=8,
                                                 self_training={"rounds": 1, "confidence": 1e-6})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = dvc_repro(root, "finetune")  # where the objective is; the stages after it only follow it (below)
    assert stages_ran(done.stdout) == ["resolve_sources", "prepare_unlabeled@new-camera", "select_source", "finetune"]
    assert pending_stages(dvc_status(root), list(parse_settings(params).raw_data_paths().values())) == ["calibrate", "evaluate", "export"]
    report = _json(root, "reports/prepare-unlabeled-new-camera.json")
    assert report["images"] == len(images) and [q["reason"] for q in report["quarantine"]] == ["not an image file"]
    source_term, dann_term, fixmatch_term = _json(root, "models/transfer.json")["objective"]
    assert [t["term"] for t in (source_term, dann_term, fixmatch_term)] == ["source", "dann", "fixmatch"]
    assert source_term["instance_weights"] == "domain"
    assert source_term["weights"]["examples"] == 500 and 1 < source_term["weights"]["effective_sample_size"] < 500
    # The copies of val and test images among the unlabelled ones are left out of both terms, by content.
    splits = load_splits(root / "data" / "prepared" / "selected.npz")
    held_out = {Path(o).parts[-2:] for o in (*splits.origin_val, *splits.origin_test)}
    copies = sum(image.parts[-2:] in held_out for image in images)
    assert copies > 0
    for term in (dann_term, fixmatch_term):
        assert (term["unlabeled_examples"], term["dropped_as_val_or_test"]) == (len(images) - copies, copies)
    # Each term's pool is read once, for the teacher, the pseudo-labels and the student: one line a term says so.
    said = (done.stdout + done.stderr).count("are also val or test images; left out")
    assert said == 2, f"{said} lines about the images left out, for two terms"
    labelled = {Path(o).parts[-2:] for o in splits.origin_train}
    (round_one,) = _json(root, "models/transfer.json")["self_training"]
    assert (round_one["round"], round_one["pool"]) == (1, len(images) - copies)
    assert round_one["pseudo_labelled"] == len(images) - copies - sum(image.parts[-2:] in labelled for image in images)
    assert sum(round_one["per_class"].values()) == round_one["pseudo_labelled"]
    header = (root / "plots" / "transfer_history.csv").read_text().splitlines()[0].split(",")
    assert {"source_loss", "source_accuracy", "domain_accuracy", "fixmatch_loss", "fixmatch_mask"} <= set(header)


@pytest.fixture(scope="module")
def pretrained_only(workspace_factory):
    """No pipeline source: real ImageNet EfficientNet-Lite0 and a torchvision network from a local weights file."""
    torch.manual_seed(0)
    # FP32 only: the INT8 and FP16 variants of a network are repro_workspace's to test, not what sources change.
    params = tiny_params(**{"selection.mode": "auto", "selection.use": None, "selection.race.when": "always",
                            "selection.race.first_steps": 4, "export.variants": []})
    params["sources"]["pipeline"] = {}
    params["sources"]["pretrained"]["local-mobilenet"] = {"architecture": "mobilenet_v3_small",
                                                         "weights_file": "weights/mobilenet.pth", "image_size": 32}
    root = workspace_factory("pretrained-only", params)
    (root / "weights").mkdir()
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=5).state_dict(), root / "weights" / "mobilenet.pth")
    done = dvc_repro(root)
    graft_cli(root, f"sqlite:///{root / 'mlflow.db'}", "publish")
    with unchanged_at_teardown(root):  # read only: a test that changes it changes a copy
        yield root, stages_ran(done.stdout)


@pytest.mark.slow  # a second pipeline, on pretrained sources
def test_a_pretrained_source_has_no_pretraining_and_auto_mode_races_the_candidates(pretrained_only):
    root, ran = pretrained_only
    assert ran == ["resolve_sources", "prepare_target", "select_source", "baseline", "finetune", "calibrate", "evaluate",
                   "export"]
    selection = _json(root, "reports/source-selection.json")
    race = selection["race"]
    assert [(rung["steps"], sorted(rung["accuracy"])) for rung in race["rungs"]] == [(4, ["efficientnet-lite0", "local-mobilenet"])]
    assert all(0 <= accuracy <= 1 for accuracy in race["rungs"][0]["accuracy"].values())
    best, accuracy = race["winner"], race["rungs"][0]["accuracy"]  # the report's keys are sorted by name
    assert accuracy[best] == max(accuracy.values()), "the better validation accuracy wins (a tie: the better score)"
    assert selection["chosen"] == best == _json(root, "models/selected/source.json")["name"]
    assert selection["decided_by"].startswith("a fine-tuning race on the validation split, because selection.race.when: always")
    assert "Decided by: a fine-tuning race" in (root / "reports/source-selection.md").read_text()
    version = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").get_model_version("graft-classifier", "1")
    identity = _json(root, "models/sources.json")[best]
    assert (version.tags["graft.source.name"], version.tags["graft.source.sha256"]) == (best, identity["sha256"])
    assert version.tags["graft.source.kind"] == "pretrained" and "graft.source_run_id" not in version.tags
    contract = _json(root, "models/selected/architecture.json")["contract"]
    assert (contract["color_mode"], contract["height"]) == ("L", 32), "a gray target on an RGB source, at the source's size"
    assert _json(root, "models/selected/architecture.json")["channel_adapter"] == "replicate"


@pytest.mark.slow  # a second pipeline, on pretrained sources
def test_a_changed_weights_file_is_a_new_source(pretrained_only, tmp_path):
    root = copy_workspace(pretrained_only[0], tmp_path / "ws")  # the weights file and DVC's cache come along
    before = _json(root, "models/sources.json")["local-mobilenet"]["sha256"]
    assert stages_ran(dvc_repro(root).stdout) == ["resolve_sources"], "unchanged weights: nothing reruns"
    # Up to the fine-tuning, the stage that reads the source's weights (and the baseline, which the race's winner,
    # if not this source, changes): evaluate and export only follow them.
    params = _params(root)
    params["selection"].update(mode="report", use="local-mobilenet")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_repro(root, "finetune", "baseline")

    torch.manual_seed(1)
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=5).state_dict(), root / "weights" / "mobilenet.pth")
    assert stages_ran(dvc_repro(root, "finetune").stdout) == ["resolve_sources", "select_source", "finetune"]
    data = list(parse_settings(params).raw_data_paths().values())
    assert pending_stages(dvc_status(root), data) == ["calibrate", "evaluate", "export"], "and after it, what reads its outputs"
    identity = _json(root, "models/selected/source.json")
    assert identity["name"] == "local-mobilenet" and identity["sha256"] != before
    assert _json(root, "models/transfer.json")["source"]["sha256"] == identity["sha256"]


def test_an_rgb_target_on_a_gray_source_is_adapted_and_served_as_rgb(candidate_template, tmp_path, monkeypatch):
    """The stage functions in-process, as `graft stage NAME` calls them: an RGB target, a gray pipeline source (the
    template's, pretrained once: its stages' params are unchanged, so they are not run again)."""
    from components.judge import judge
    from components.stage_runner import run_stage
    from deploy.model import load_model

    params = tiny_params(**{"data.channels": 3})
    params["sources"]["pretrained"] = {}
    root = copy_workspace(candidate_template[0], tmp_path / "rgb")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    for name in stage_order(parse_settings(params)):
        if not name.startswith(("prepare_source@", "pretrain@")):
            run_stage(name)
    report = judge(root, parse_settings(params))
    spec = _json(root, "models/selected/architecture.json")
    assert (spec["contract"]["color_mode"], spec["source_channels"], spec["channel_adapter"]) == ("RGB", 1, "replicate")
    assert load_model(root / "models/model.onnx", providers=["cpu"]).contract.shape == (3, 28, 28)
    gates = {g.name: g for g in report.gates}
    assert gates["contract.fp32.skew"].verdict == "passed", "RGB files decoded by the server score what evaluate measured"


def test_the_model_card_states_the_runs_recorded_numbers(repro_workspace):
    root, _, metrics = repro_workspace
    registration = _json(root, "outputs/registration.json")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    card = graft_cli(root, uri, "card", registration["version"]).stdout
    assert card == (root / "reports/model-card.md").read_text(), "the registry's card is the one publish wrote"
    recorded = MlflowClient(tracking_uri=uri).get_run(registration["run_id"]).data.metrics
    assert f"# Model card: graft-classifier v{registration['version']}" in card
    assert f"| accuracy | {100 * recorded['test.accuracy']:.2f}% | " in card
    assert f"| macro-F1 | {recorded['test.macro_f1']:.4f} | " in card
    assert f"T = {recorded['calibration.temperature']:.4g}, {_json(root, 'models/calibration.json')['fit']}" in card
    assert (f"| expected calibration error (15 bins) | {recorded['calibration.ece_before']:.4f} | "
            f"{recorded['calibration.ece']:.4f} |") in card
    for gate in _json(root, "reports/gates.json")["gates"]:
        assert f"| {gate['name']} | {gate['verdict']} | " in card
    target = _json(root, "reports/prepare-target.json")
    assert f"test {target['counts']['test']} images" in card and target["data_version"] in card
    assert _params(root)["model_card"]["intended_use"] in card


def test_a_version_without_a_card_is_refused_with_the_way_to_write_one(repro_workspace, tmp_path):
    root = copy_workspace(repro_workspace[0], tmp_path / "ws", registry=True)
    registration = _json(root, "outputs/registration.json")
    for card in root.glob("mlartifacts/**/card/model-card.md"):
        card.unlink()
    done = graft_cli(root, f"sqlite:///{root / 'mlflow.db'}", "card", registration["version"], check=False)
    assert done.returncode == 2 and "has no model card" in done.stderr and "graft publish" in done.stderr
    assert "Traceback" not in done.stderr
    unknown = graft_cli(root, f"sqlite:///{root / 'mlflow.db'}", "card", "99", check=False)
    assert unknown.returncode == 2 and "has no version '99'" in unknown.stderr


def test_graft_explain_answers_what_the_served_file_answers_and_draws_the_map(repro_workspace, tmp_path):
    root = copy_workspace(repro_workspace[0], tmp_path / "ws", registry=True)
    registration = _json(root, "outputs/registration.json")
    image = root / load_splits(root / "data/prepared/selected.npz").origin_test[0]
    out = tmp_path / "explained.png"
    done = graft_cli(root, f"sqlite:///{root / 'mlflow.db'}", "explain", str(image), "--version", registration["version"],
                     "--out", str(out))
    lines = done.stdout.splitlines()
    printed = dict(line.split() for line in lines[2 : 2 + len(_json(root, "reports/prepare-target.json")["classes"])])
    answered = lines[0].split(" answers ")[1].split(" for ")[0]
    # The ONNX file the server serves, on the same file through the server's decoding: the same calibrated answer.
    served = load_model(root / "models/model.onnx", providers=["cpu"])
    probabilities = softmax(served.run(served.contract.normalize(decode_image(image.read_bytes(), served.contract)[None])))[0]
    assert answered == served.classes[int(probabilities.argmax())]
    for label, probability in zip(served.classes, probabilities):
        assert float(printed[label]) == pytest.approx(float(probability), abs=2e-4)
    assert out.stat().st_size > 0 and str(out) in lines[-1]


def test_graft_explain_refuses_a_version_without_a_checkpoint_and_an_unreadable_image(repro_workspace, tmp_path):
    root = copy_workspace(repro_workspace[0], tmp_path / "ws", registry=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    done = graft_cli(root, uri, "explain", str(bad), check=False)  # the champion: v1, published by the fixture
    assert done.returncode == 2 and "not-an-image.png" in done.stderr and "not an image file" in done.stderr
    for checkpoint in root.glob("mlartifacts/**/models/transfer.pt"):
        checkpoint.unlink()
    image = root / load_splits(root / "data/prepared/selected.npz").origin_test[0]
    done = graft_cli(root, uri, "explain", str(image), check=False)
    assert done.returncode == 2 and "has no PyTorch checkpoint" in done.stderr and "Traceback" not in done.stderr
