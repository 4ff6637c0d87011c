"""Each gate's arithmetic and report, and the serving check on a real exported model."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.settings import GateParams
from deploy.settings import ServingSettings
from components.data import Splits
from components.export import export_onnx
from components.gates import (
    FAILED,
    PASSED,
    SKIPPED,
    GateReport,
    PairedComparison,
    parity_gates,
    quality_gates,
    regression_gate,
    served_predictions,
    serving_gates,
    skew_gate,
    transfer_gate,
)
from components.model import build
from deploy.contract import Contract
from deploy.model import (
    PROVIDER_NAMES,
    ProviderError,
    gpu_provider_blockers,
    load_model,
    plan_providers,
)
from tests.conftest import tiny_spec

EVALUATION = {"transfer": {"accuracy": 0.80, "macro_f1": 0.78}, "scratch": {"accuracy": 0.83, "macro_f1": 0.82}}


def test_quality_floor():
    passed, failed = quality_gates(EVALUATION, GateParams(min_accuracy=0.8, min_macro_f1=0.79))
    assert (passed.verdict, passed.bound) == (PASSED, ">= 0.8")
    assert failed.verdict == FAILED and failed.value == 0.78 and "quality floor" in failed.detail


def _paired(n: int, only_transfer: int, only_scratch: int, confidence: float = 0.95) -> PairedComparison:
    """n test examples; the two models agree on all but these."""
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:only_transfer] = True
    b[only_transfer : only_transfer + only_scratch] = True
    a[n - n // 2 :] = b[n - n // 2 :] = True  # half the examples both get right
    return PairedComparison.of(a, b, confidence)


def test_mcnemar_exact_p_value_and_interval():
    one_sided = _paired(400, 10, 0)
    assert one_sided.p_value == pytest.approx(2 * 0.5**10)
    assert one_sided.difference == pytest.approx(10 / 400) and one_sided.ci_low > 0 and one_sided.significant
    even = _paired(400, 7, 7)
    assert even.p_value == 1.0 and even.ci_low < 0 < even.ci_high and not even.significant
    assert _paired(400, 7, 7) == even, "the bootstrap is seeded: the same data give the same interval"


def test_a_two_image_loss_is_noise_not_negative_transfer():
    """The held-out case from the issue: -0.5 points on 400 test images (3 vs 5 discordant) is not significant."""
    gate = transfer_gate(_paired(400, 3, 5), GateParams(min_effect=0.0))
    assert gate.verdict == PASSED and gate.value == pytest.approx(-0.005)
    assert gate.detail.startswith("not significant") and "McNemar p=" in gate.detail and "95% CI" in gate.detail


def test_a_large_significant_loss_is_negative_transfer_by_name():
    gate = transfer_gate(_paired(400, 5, 40), GateParams())
    assert gate.verdict == FAILED and gate.value == pytest.approx(-35 / 400)
    assert gate.detail.startswith("negative transfer: transfer minus scratch: -8.75 points")
    small = transfer_gate(_paired(4000, 0, 30), GateParams(min_effect=0.01))
    assert small.verdict == PASSED and "smaller than the minimum effect" in small.detail, "significant but below min_effect"


def test_transfer_better_requires_a_significant_gain():
    assert transfer_gate(_paired(400, 40, 5), GateParams(transfer="better")).verdict == PASSED
    zero = transfer_gate(_paired(400, 4, 4), GateParams(transfer="better"))
    assert zero.verdict == FAILED and zero.detail.startswith("transfer does not pay")
    assert transfer_gate(_paired(400, 0, 40), GateParams(transfer="off")).verdict == SKIPPED


def test_no_regression_is_a_paired_test_against_the_champion():
    assert regression_gate(_paired(400, 3, 5), GateParams(min_effect=0.0)).verdict == PASSED
    worse = regression_gate(_paired(400, 2, 30), GateParams())
    assert worse.verdict == FAILED and worse.detail.startswith("worse than the champion: candidate minus champion")


def test_no_regression_is_skipped_without_champion_and_says_so():
    gate = regression_gate(None, GateParams())
    assert gate.verdict == SKIPPED and "no champion yet" in gate.detail


def test_parity_gates():
    good = parity_gates({"argmax_agreement": 1.0, "max_abs_diff": 1e-3, "worst_tolerance_ratio": 0.4, "atol": 1e-4, "rtol": 1e-4})
    bad = parity_gates({"argmax_agreement": 0.999, "max_abs_diff": 1e-3, "worst_tolerance_ratio": 5.0, "atol": 1e-4, "rtol": 1e-4})
    assert [g.verdict for g in good] == [PASSED, PASSED] and [g.verdict for g in bad] == [FAILED, FAILED]


def test_report_round_trip_and_markdown():
    gates = [*quality_gates(EVALUATION, GateParams(min_accuracy=0.9)), transfer_gate(_paired(400, 5, 40), GateParams())]
    report = GateReport(gates, provider="CPUExecutionProvider", champion_version="3")
    again = GateReport.from_dict(report.to_dict())
    assert again.gates == report.gates and not again.passed
    assert "## Gate report: FAILED" in report.markdown() and "| transfer.gain | failed |" in report.markdown()
    assert "quality.accuracy" in report.failure_text() and "negative transfer" in report.failure_text()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    model = build(tiny_spec(tuple("abcdefghij")), 0)
    return export_onnx(model, tmp_path_factory.mktemp("gates") / "model.onnx", 20)


def test_serving_check_reports_the_provider_that_ran_and_runs_the_configured_batch(onnx_file):
    x = np.random.default_rng(0).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8)
    y = np.arange(40) % 10
    gates, provider, extra = serving_gates(onnx_file, x, y, GateParams(large_batch=100), ServingSettings())
    assert provider == "CPUExecutionProvider"  # asked for TensorRT, CUDA, CPU on a machine without a GPU
    assert extra["requested_providers"][:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert {g.name for g in gates} == {"serving.answers", "serving.latency_ms_batch1", "serving.latency_ms_batch100", "serving.model_mb"}, \
        "a split of 40 still checks the configured batch of 100 (examples repeated)"
    assert all(g.verdict == PASSED for g in gates)
    tight = serving_gates(onnx_file, x, y, GateParams(large_batch=32, max_model_mb=0.01, max_latency_ms_batch1=1e-6), ServingSettings())[0]
    assert {g.name for g in tight if g.verdict == FAILED} == {"serving.model_mb", "serving.latency_ms_batch1"}


def test_serving_check_in_strict_mode_refuses_cpu(onnx_file):
    x = np.zeros((4, 1, 28, 28), np.uint8)
    gates, provider, _ = serving_gates(onnx_file, x, np.zeros(4, int), GateParams(large_batch=4), ServingSettings(strict=True))
    assert [(g.name, g.verdict) for g in gates] == [("serving.load", FAILED)] and provider == ""
    assert "in strict mode, but no GPU provider can load here (tensorrt: " in gates[0].detail
    with pytest.raises(ProviderError, match=r"no GPU provider can load here \(cuda: \S+ is missing\)"):
        load_model(onnx_file, providers=["cuda", "cpu"], strict=True)
    assert load_model(onnx_file, providers=["cpu"], strict=True).provider == "CPUExecutionProvider"


def test_auto_asks_only_for_providers_that_load_here_quietly_and_says_why(onnx_file, capfd):
    """On a machine without the GPU libraries ONNX Runtime printed a screen of red errors for every session that
    asked for TensorRT or CUDA; now a provider that cannot load is not asked for, and one line says why."""
    blockers = gpu_provider_blockers()
    plan = plan_providers(["auto"], Path("/tmp"))
    assert plan.requested == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert plan.runnable == [PROVIDER_NAMES[n] for n in ("tensorrt", "cuda", "cpu") if n not in blockers]
    capfd.readouterr()
    model = load_model(onnx_file, providers=["auto"])
    printed = capfd.readouterr()
    assert "onnxruntime" not in printed.out + printed.err and "EP Error" not in printed.out + printed.err, printed
    assert model.provider_note.startswith(f"ONNX Runtime runs on {model.provider}")
    for name, reason in blockers.items():  # on this CPU machine: the library each GPU provider misses
        assert f"{name}: {reason}" in model.provider_note


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
    assert (served_predictions(model, splits) == logits.argmax(1)).all()
    splits_without_files = Splits(*(np.stack(arrays), labels) * 3, tuple("abcdefghij"), *(np.array(["x#1"] * 10),) * 3, "v")
    assert (served_predictions(model, splits_without_files) == served_predictions(model, splits)).all(), "IDX data: the arrays"
    wrong = Splits(*(np.zeros((10, 3, 28, 28), np.uint8), labels) * 3, tuple("abcdefghij"), *(np.array(["x#1"] * 10),) * 3, "v")
    assert served_predictions(model, wrong) is None, "no files and arrays of another shape: not comparable"
