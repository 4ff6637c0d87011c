"""ONNX export: checker, metadata contract, dynamic batch, parity in real ONNX Runtime sessions."""
import json

import numpy as np
import pytest
import torch

from components.export import check_parity, cpu_session, export_onnx, read_metadata
from components.model import build
from components.train import Normalizer
from deploy.contract import CLASSES_KEY, CONTRACT_KEY
from tests.conftest import tiny_spec


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = build(tiny_spec(tuple("abcde"), std=(0.25,)), 0)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx", 20, {"graft.strategy": "finetune"})
    return model, path


def test_metadata_carries_the_preprocessing_contract_and_classes(exported):
    model, path = exported
    metadata = read_metadata(path)
    contract = json.loads(metadata[CONTRACT_KEY])
    assert contract | {"scale": None} == contract | {
        "channels": 1, "color_mode": "L", "height": 28, "width": 28, "mean": [0.5], "std": [0.25], "layout": "NCHW",
        "resize": "bilinear", "scale": None,
    }
    assert contract["scale"] == pytest.approx(1 / 255)
    assert json.loads(metadata[CLASSES_KEY]) == list("abcde")
    assert metadata["graft.strategy"] == "finetune"


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_dynamic_batch_matches_pytorch(exported, batch):
    model, path = exported
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
    inputs = Normalizer.of(model.spec.contract)(torch.from_numpy(pixels))
    got = cpu_session(path).run(None, {"pixels": inputs.numpy()})[0]
    with torch.no_grad():
        expected = model(inputs).numpy()
    assert got.shape == (batch, 5)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_parity_check_passes_and_catches_a_diverged_model(exported):
    model, path = exported
    x = np.random.default_rng(0).integers(0, 256, (50, 1, 28, 28), dtype=np.uint8)
    parity = check_parity(model, path, x, atol=1e-4, rtol=1e-4)
    assert parity.passed and parity.examples == 50 and parity.max_abs_diff < 1e-4 and parity.worst_tolerance_ratio <= 1
    diverged = build(model.spec, 0)
    with torch.no_grad():
        diverged.head.weight.mul_(-1)
    broken = check_parity(diverged, path, x, atol=1e-4, rtol=1e-4)
    assert not broken.passed and broken.argmax_agreement < 1.0


def test_export_failure_leaves_no_file(tmp_path):
    model = build(tiny_spec(("a", "b"), widths=(8,)), 0)
    model.backbone[0] = torch.nn.Conv2d(3, 8, 3, padding=1)  # the network no longer takes what its contract says
    target = tmp_path / "model.onnx"
    with pytest.raises(Exception, match="channels"):
        export_onnx(model, target, opset=20)
    assert not target.exists() and not list(tmp_path.iterdir())
