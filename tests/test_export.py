"""ONNX export: checker, metadata contract, dynamic batch, parity in real ONNX Runtime sessions."""
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from components.config import parse_params
from components.data import Splits
from components.export import (
    check_parity,
    convert_fp16,
    cpu_session,
    export_onnx,
    quantize_int8,
    read_metadata,
)
from components.layout import Layout
from components.network import build
from components.stages.export import export_variants
from components.predict import Normalizer
from deploy.tags import CLASSES_KEY, CONTRACT_KEY
from tests.conftest import tiny_params, tiny_spec


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


def _logits(path, x):
    return cpu_session(path).run(None, {"pixels": x})[0]


def test_int8_and_fp16_variants_keep_the_contract_and_compute_what_fp32_computes(exported, tmp_path):
    model, path = exported
    rng = np.random.default_rng(3)
    contract = model.spec.contract
    calibration = contract.normalize(rng.integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    x = contract.normalize(rng.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8))
    int8 = quantize_int8(path, tmp_path / "variants" / "model.int8.onnx", calibration, "percentile", 99.99)
    fp16 = convert_fp16(path, tmp_path / "variants" / "model.fp16.onnx")
    reference = _logits(path, x)
    for variant in (int8, fp16):
        assert read_metadata(variant)[CONTRACT_KEY] == read_metadata(path)[CONTRACT_KEY]
        assert read_metadata(variant)[CLASSES_KEY] == read_metadata(path)[CLASSES_KEY]
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, "weights and activations are quantized"
    weights = [t for t in onnx.load(str(int8)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "the weights are stored as int8"
    fp16_logits, int8_logits = _logits(fp16, x), _logits(int8, x)
    assert fp16_logits.dtype == np.float32 and int8_logits.shape == reference.shape
    np.testing.assert_allclose(fp16_logits, reference, atol=5e-3 * np.abs(reference).max())
    assert np.linalg.norm(int8_logits - reference) < 0.1 * np.linalg.norm(reference)


def test_a_variant_beyond_the_accuracy_bound_is_neither_written_nor_published(exported, tmp_path, monkeypatch):
    """Labels are the FP32 model's own answers (FP32 scores 1.0) and INT8 ranges come from black images, which
    clip every real activation: INT8 loses accuracy, is not written and says why; FP16 loses nothing and is kept."""
    model, path = exported
    monkeypatch.chdir(tmp_path)
    Layout.onnx_model.parent.mkdir(parents=True)
    shutil.copy(path, Layout.onnx_model)
    rng = np.random.default_rng(5)
    x_test = rng.integers(0, 256, (200, 1, 28, 28), dtype=np.uint8)
    y_test = _logits(path, model.spec.contract.normalize(x_test)).argmax(1)
    black = np.zeros((40, 1, 28, 28), np.uint8)
    no_rows = np.zeros(0, np.int64)
    splits = Splits(black, no_rows, black[:0], no_rows, x_test, y_test, tuple("abcde"), no_rows, no_rows, no_rows, "v")
    params = parse_params(tiny_params(**{"export.max_accuracy_drop": 0.0}))
    scores = export_variants(params, model.spec.contract, splits)
    assert scores["fp32"]["accuracy"] == 1.0 and scores["int8"]["accuracy_drop"] > 0
    assert not (tmp_path / "models/variants/model.int8.onnx").exists() and not scores["int8"]["published"]
    assert "more than export.max_accuracy_drop 0" in scores["int8"]["why_not"]
    assert scores["fp16"]["published"] == (scores["fp16"]["accuracy_drop"] <= 0)
    assert (tmp_path / "models/variants/model.fp16.onnx").exists() == scores["fp16"]["published"]
