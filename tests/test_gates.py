"""Each gate's arithmetic and report, and the serving check on a real exported model."""
import numpy as np
import pytest
from PIL import Image

from components.config import GateParams, ServingParams
from components.data import Splits
from components.export import export_onnx
from components.gates import (
    FAILED,
    PASSED,
    SKIPPED,
    GateReport,
    parity_gates,
    quality_gates,
    regression_gate,
    served_accuracy,
    serving_gates,
    skew_gate,
    transfer_gate,
)
from components.model import build
from deploy.contract import Contract
from deploy.model import ProviderError, load_model
from tests.conftest import tiny_spec

EVALUATION = {"transfer": {"accuracy": 0.80, "macro_f1": 0.78}, "scratch": {"accuracy": 0.83, "macro_f1": 0.82}}


def test_quality_floor():
    passed, failed = quality_gates(EVALUATION, GateParams(min_accuracy=0.8, min_macro_f1=0.79))
    assert (passed.verdict, passed.bound) == (PASSED, ">= 0.8")
    assert failed.verdict == FAILED and failed.value == 0.78 and "quality floor" in failed.detail


def test_transfer_gate_names_negative_transfer():
    gate = transfer_gate(EVALUATION, GateParams(min_transfer_gain=0.0))
    assert gate.verdict == FAILED and gate.value == pytest.approx(-0.03)
    assert gate.detail.startswith("negative transfer") and "-3.00 points" in gate.detail
    assert transfer_gate(EVALUATION, GateParams(min_transfer_gain=-0.05)).verdict == PASSED


@pytest.mark.parametrize("mode,tolerance,candidate,verdict", [
    ("absolute", 0.01, 0.795, PASSED), ("absolute", 0.01, 0.789, FAILED),
    ("relative", 0.10, 0.721, PASSED), ("relative", 0.10, 0.719, FAILED),
])
def test_no_regression_absolute_and_relative(mode, tolerance, candidate, verdict):
    gate = regression_gate(candidate, 0.80, GateParams(max_regression=tolerance, regression_mode=mode))
    assert gate.verdict == verdict


def test_no_regression_is_skipped_without_champion_and_says_so():
    gate = regression_gate(0.5, None, GateParams())
    assert gate.verdict == SKIPPED and "no champion yet" in gate.detail


def test_parity_gates():
    good = parity_gates({"argmax_agreement": 1.0, "max_abs_diff": 1e-3, "worst_tolerance_ratio": 0.4, "atol": 1e-4, "rtol": 1e-4})
    bad = parity_gates({"argmax_agreement": 0.999, "max_abs_diff": 1e-3, "worst_tolerance_ratio": 5.0, "atol": 1e-4, "rtol": 1e-4})
    assert [g.verdict for g in good] == [PASSED, PASSED] and [g.verdict for g in bad] == [FAILED, FAILED]


def test_report_round_trip_and_markdown():
    gates = [*quality_gates(EVALUATION, GateParams(min_accuracy=0.9)), transfer_gate(EVALUATION, GateParams())]
    report = GateReport(gates, provider="CPUExecutionProvider", champion_version="3")
    again = GateReport.from_dict(report.to_dict())
    assert again.gates == report.gates and not again.passed
    assert "## Gate report: FAILED" in report.markdown() and "| transfer.gain | failed |" in report.markdown()
    assert "quality.accuracy" in report.failure_text() and "negative transfer" in report.failure_text()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    model = build(tiny_spec(tuple("abcdefghij")), 0)
    return export_onnx(model, tmp_path_factory.mktemp("gates") / "model.onnx", 20)


def test_serving_check_reports_the_provider_that_ran(onnx_file):
    x = np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    y = np.arange(40) % 10
    gates, provider, extra = serving_gates(onnx_file, x, y, GateParams(large_batch=32), ServingParams())
    assert provider == "CPUExecutionProvider"  # asked for TensorRT, CUDA, CPU on a machine without a GPU
    assert extra["requested_providers"][:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert {g.name for g in gates} == {"serving.answers", "serving.latency_ms_batch1", "serving.latency_ms_batch32", "serving.model_mb"}
    assert all(g.verdict == PASSED for g in gates)
    tight = serving_gates(onnx_file, x, y, GateParams(large_batch=32, max_model_mb=0.01, max_latency_ms_batch1=1e-6), ServingParams())[0]
    assert {g.name for g in tight if g.verdict == FAILED} == {"serving.model_mb", "serving.latency_ms_batch1"}


def test_serving_check_in_strict_mode_refuses_cpu(onnx_file):
    x = np.zeros((4, 1, 28, 28), np.uint8)
    gates, provider, _ = serving_gates(onnx_file, x, np.zeros(4, int), GateParams(large_batch=4), ServingParams(strict=True))
    assert [(g.name, g.verdict) for g in gates] == [("serving.load", FAILED)] and provider == ""
    assert "runs this model on ['CPUExecutionProvider']" in gates[0].detail
    with pytest.raises(ProviderError):
        load_model(onnx_file, providers=["cuda", "cpu"], strict=True)
    assert load_model(onnx_file, providers=["cpu"], strict=True).provider == "CPUExecutionProvider"


def test_skew_gate_compares_the_served_path_with_evaluate():
    assert skew_gate(0.80, 0.80, GateParams(max_skew=0.002)).verdict == PASSED
    skewed = skew_gate(0.62, 0.80, GateParams(max_skew=0.002))
    assert skewed.verdict == FAILED and skewed.value == pytest.approx(0.18) and skewed.detail.startswith("train/serve skew")
    assert skew_gate(None, 0.80, GateParams()).verdict == SKIPPED


def test_served_accuracy_decodes_the_test_files_under_the_models_own_contract(onnx_file, tmp_path):
    """Ten image files and the arrays prepare would make of them: the same accuracy; a model whose contract
    says another normalisation (what a train/serve skew looks like) scores differently on the same files."""
    rng = np.random.default_rng(0)
    files, arrays = [], []
    for i in range(10):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(path)
        files.append(str(path))
        arrays.append(Contract("L", 28, 28, (0.5,), (0.5,)).pixels(Image.open(path)))
    labels = np.arange(10)
    splits = Splits(*(np.stack(arrays), labels) * 3, tuple("abcdefghij"), *(np.array(files),) * 3, "v")
    model = load_model(onnx_file, providers=["cpu"])
    logits = model.run(model.contract.normalize(np.stack(arrays)))
    assert served_accuracy(model, splits) == pytest.approx(float((logits.argmax(1) == labels).mean()))
    splits_without_files = Splits(*(np.stack(arrays), labels) * 3, tuple("abcdefghij"), *(np.array(["x#1"] * 10),) * 3, "v")
    assert served_accuracy(model, splits_without_files) == served_accuracy(model, splits), "IDX data: the arrays"
    wrong = Splits(*(np.zeros((10, 3, 28, 28), np.uint8), labels) * 3, tuple("abcdefghij"), *(np.array(["x#1"] * 10),) * 3, "v")
    assert served_accuracy(model, wrong) is None, "no files and arrays of another shape: not comparable"
