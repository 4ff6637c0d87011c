"""Data-parallel training: a training stage in two processes under torchrun (gloo on the CPU) gives what one
process gives, in the same format, within seed noise; bad process counts are refused by name."""
import csv
import json

import pytest
import torch
import yaml

from components.config import ParamsError, parse_params
from tests.conftest import copy_workspace, graft_cli, tiny_params


def _history(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_pretraining_in_two_processes_matches_one_process(candidate_template, tmp_path):
    template, _ = candidate_template  # pretrain@fashion-mnist ran there in one process
    root = copy_workspace(template, tmp_path / "ws")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compute"]["processes"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = graft_cli(root, f"sqlite:///{root / 'mlflow.db'}", "stage", "pretrain@fashion-mnist")
    assert "torchrun --standalone --nproc_per_node=2" in done.stderr
    assert "data-parallel training: 2 processes (gloo on the CPU)" in done.stderr
    one = json.loads((template / "metrics" / "pretrain-fashion-mnist.json").read_text())
    two = json.loads((root / "metrics" / "pretrain-fashion-mnist.json").read_text())
    assert two.keys() == one.keys() and two["steps"] == one["steps"]
    # Same batches, same augmentation, averaged gradients: only BatchNorm's per-process statistics and the order
    # of float sums differ, so the result is the one-process result within noise (18 steps of a tiny source).
    assert abs(two["test_accuracy"] - one["test_accuracy"]) < 0.1, (one, two)
    rows_one, rows_two = _history(template / "plots" / "pretrain-fashion-mnist.csv"), _history(root / "plots" / "pretrain-fashion-mnist.csv")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] and rows_two[0].keys() == rows_one[0].keys()
    assert abs(float(rows_two[-1]["train_loss"]) - float(rows_one[-1]["train_loss"])) < 0.25
    checkpoint_one = torch.load(template / "models" / "sources" / "fashion-mnist.pt", weights_only=True)
    checkpoint_two = torch.load(root / "models" / "sources" / "fashion-mnist.pt", weights_only=True)
    assert checkpoint_two.keys() == checkpoint_one.keys()
    assert not list((root / ".graft" / "resume").glob("*")), "the writer removes its resume point when done"


@pytest.mark.parametrize("change, named", [
    ({"compute.processes": 3}, "pretrain.batch_size: 64 does not split evenly across compute.processes: 3"),
    ({"compute.processes": 2, "finetune.joint": {"weight": 1.0}}, "set compute.processes: 1"),
    ({"compute.processes": 0}, "compute.processes"),
])
def test_process_counts_that_cannot_work_are_refused_by_name(change, named):
    with pytest.raises(ParamsError, match=named.replace(".", r"\.")):
        parse_params(tiny_params(**change))
