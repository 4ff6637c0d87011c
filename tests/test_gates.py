"""Each gate's arithmetic and report, and the serving check on a real exported model and its variants."""
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from components.settings import GateParams
from deploy.settings import ServingSettings
from components.data import Splits
from components.export import Int8Recipe, build_variant, export_onnx
from components.gates import (
    EVALUATED,
    FAILED,
    PASSED,
    SKIPPED,
    GateReport,
    PairedComparison,
    UnpairedComparison,
    judge_served,
    parity_gates,
    quality_gates,
    regression_gate,
    served_predictions,
    skew_gate,
    transfer_gate,
)
from components.network import build
from deploy.contract import Contract
from deploy.cpu import UNFUSED_QDQ
from deploy.digest import sha256_file
from deploy.model import (
    PROVIDER_NAMES,
    ProviderError,
    gpu_provider_blockers,
    load_model,
    plan_providers,
)
from deploy.source import FileSource
from deploy.variants import AUTO, FP16, FP32, INT8, choose_variant, variant_path
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


def test_fisher_exact_p_value_of_two_models_on_different_requests():
    """Closed forms: 0/5 against 5/5 right has p = 2/C(10,5) (the two extreme tables of the margins); equal
    records have p = 1."""
    extreme = UnpairedComparison(0, 5, 5, 5, 0.95)
    assert extreme.p_value == pytest.approx(2 / math.comb(10, 5)) and extreme.significant
    assert extreme.difference == -1.0 and "Fisher p=" in extreme.text("canary", "champion")
    assert UnpairedComparison(7, 10, 7, 10, 0.95).p_value == pytest.approx(1.0)
    assert regression_gate(UnpairedComparison(3, 10, 9, 10, 0.95), GateParams()).verdict == FAILED  # p = 0.0198


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
    """A tiny model's FP32 file with its INT8 and FP16 variants beside it, as the export stage writes them."""
    model = build(tiny_spec(tuple("abcdefghij")), 0)
    path = export_onnx(model, tmp_path_factory.mktemp("gates") / "model.onnx", 20)
    calibration = model.spec.contract.normalize(np.random.default_rng(1).integers(0, 256, (40, 1, 28, 28), dtype=np.uint8))
    for variant in (INT8, FP16):
        variant_path(path, variant).parent.mkdir(exist_ok=True)
        build_variant(variant, path, variant_path(path, variant), calibration, Int8Recipe(calibration="minmax"), 99.99)
    return path


def test_unfused_int8_answers_what_the_file_specifies(onnx_file):
    """The session entries a CPU without 8-bit dot products gets (deploy/cpu.py) compute the INT8 file's own
    arithmetic: the same logits as ONNX Runtime running its QDQ nodes one by one, with no graph optimisation."""
    def logits(entries: dict, level) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        for key, value in entries.items():
            options.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(variant_path(onnx_file, INT8)), options, providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"pixels": x})[0]

    x = np.random.default_rng(2).normal(size=(16, 1, 28, 28)).astype(np.float32)
    as_written = logits({}, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(logits(UNFUSED_QDQ, ort.GraphOptimizationLevel.ORT_ENABLE_ALL), as_written, atol=1e-4)


def _idx_splits(n: int = 40) -> Splits:
    """Test images without files (IDX data): the arrays go to the model, normalised under its contract."""
    x = np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    return Splits(*(x, np.arange(n) % 10) * 3, tuple("abcdefghij"), *(np.array(["x#1"] * n),) * 3, "v")


def _accuracy(path: Path, splits: Splits) -> float:
    model = load_model(path, providers=["cpu"])
    return float((model.run(model.contract.normalize(splits.x_test)).argmax(1) == splits.y_test).mean())


def test_every_variant_is_judged_as_served_and_the_report_names_the_one_served_here(onnx_file):
    """FP32, INT8 and FP16 each fetched through the server's own source and loaded by its load_model; each has its
    own skew, answers, latency and size gates; the report says which one `graft serve` would serve on this CPU."""
    splits = _idx_splits()
    references = {FP32: (_accuracy(onnx_file, splits), EVALUATED),
                  INT8: (_accuracy(variant_path(onnx_file, INT8), splits), "the export stage")}  # FP16: FP32's
    served = judge_served(FileSource(onnx_file), "file", splits, references, GateParams(large_batch=100, max_skew=1.0),
                          ServingSettings(), onnx_file.parent)
    per_variant = ["contract.{}.skew", "serving.{}.answers", "serving.{}.latency_ms_batch1", "serving.{}.latency_ms_batch100",
                   "serving.{}.model_mb"]
    assert [g.name for g in served.gates] == [*(n.format(v) for v in (FP32, INT8, FP16) for n in per_variant),
                                              "serving.variant"], "a split of 40 still checks the configured batch of 100"
    assert all(g.verdict == PASSED for g in served.gates), served.gates
    # auto on a machine without a GPU: INT8 where this CPU has 8-bit dot products, else FP32 (tests/test_variants.py)
    here, why = choose_variant(AUTO, "CPUExecutionProvider", [FP32, INT8, FP16])
    assert (served.variant, served.provider) == (here, "CPUExecutionProvider")
    assert served.gates[-1].detail == f"`graft serve` here serves {here} ({why})"
    assert served.extra["requested_providers"][:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    files = {FP32: "model.onnx", INT8: "variants/model.int8.onnx", FP16: "variants/model.fp16.onnx"}
    for variant, file in files.items():
        seen = served.variants[variant]
        assert (seen["file"], seen["provider"]) == (file, "CPUExecutionProvider")
        assert seen["sha256"] == sha256_file(onnx_file.parent / file) and seen["bytes"] == (onnx_file.parent / file).stat().st_size
        assert served.gates[[g.name for g in served.gates].index(f"serving.{variant}.model_mb")].value == seen["bytes"] / 1e6
    assert served.variants[INT8]["served_accuracy"] == references[INT8][0], "the arrays: no skew"
    assert served.variants[FP16]["reference"] == EVALUATED, "no measurement of its own: FP32's"

    report = GateReport(served.gates, served.provider, None, served.extra, served.variant, served.variants)
    again = GateReport.from_dict(report.to_dict())
    assert (again.gates, again.served_variant, again.variants) == (report.gates, here, served.variants)
    markdown = report.markdown()
    assert f"`graft serve` here would serve: {here} ({why}); champion compared: none" in markdown
    assert f"| int8 | variants/model.int8.onnx | {served.variants[INT8]['sha256'][:16]} | CPUExecutionProvider |" in markdown
    assert "| contract.fp16.skew | passed |" in markdown and "| serving.int8.latency_ms_batch1 | passed |" in markdown

    measured = {**references, INT8: (0.0, "the export stage"), FP16: (_accuracy(variant_path(onnx_file, FP16), splits), "")}
    tight = judge_served(FileSource(onnx_file), "file", splits, measured,
                         GateParams(large_batch=32, max_model_mb=0.01, max_latency_ms_batch1=1e-6, max_skew=0.002),
                         ServingSettings(), onnx_file.parent)
    failed = {g.name: g for g in tight.gates if g.verdict == FAILED}
    assert set(failed) == {*(f"serving.{v}.{gate}" for v in (FP32, INT8, FP16) for gate in ("model_mb", "latency_ms_batch1")),
                           *(("contract.int8.skew",) if references[INT8][0] > 0.002 else ())}
    assert failed["serving.fp16.latency_ms_batch1"].detail == "batch 1 too slow: fp16 on CPUExecutionProvider"


def test_the_variant_asked_for_is_served_and_one_not_published_is_refused(onnx_file, tmp_path):
    splits = _idx_splits(10)
    references = {FP32: (0.0, EVALUATED)}
    gates = GateParams(large_batch=8, max_skew=1.0)
    asked = judge_served(FileSource(onnx_file), "file", splits, references, gates, ServingSettings(variant="fp16"))
    assert asked.variant == FP16 and asked.gates[-1].detail == "`graft serve` here serves fp16 (asked for)"
    alone = shutil.copy(onnx_file, tmp_path / "model.onnx")  # exported without variants (or none kept its accuracy)
    only_fp32 = judge_served(FileSource(alone), "file", splits, references, gates, ServingSettings(variant="fp16"))
    assert [g.name for g in only_fp32.gates][:2] == ["contract.fp32.skew", "serving.fp32.answers"]
    assert not any(".int8." in g.name or ".fp16." in g.name for g in only_fp32.gates), "only what was exported"
    refused = only_fp32.gates[-1]
    assert (refused.name, refused.verdict, only_fp32.variant) == ("serving.variant", FAILED, "")
    assert refused.detail.startswith("`graft serve` would refuse it: the model has no fp16 variant (it has fp32)")
    assert judge_served(FileSource(alone), "file", splits, references, gates, ServingSettings()).variant == FP32


def test_serving_check_in_strict_mode_refuses_cpu_and_a_broken_variant_fails_to_load(onnx_file, tmp_path):
    splits = _idx_splits(4)
    gates, references = GateParams(large_batch=4), {FP32: (0.0, EVALUATED)}
    served = judge_served(FileSource(onnx_file), "file", splits, references, gates, ServingSettings(strict=True))
    assert [(g.name, g.verdict) for g in served.gates] == [
        ("serving.fp32.load", FAILED), ("serving.int8.load", FAILED), ("serving.fp16.load", FAILED), ("serving.variant", PASSED)]
    assert served.provider == "" and served.variants[INT8] == {"provider": "", "load_error": served.gates[1].detail}
    assert "in strict mode, but no GPU provider can load here (tensorrt: " in served.gates[0].detail
    with pytest.raises(ProviderError, match=r"no GPU provider can load here \(cuda: \S+ is missing\)"):
        load_model(onnx_file, providers=["cuda", "cpu"], strict=True)
    assert load_model(onnx_file, providers=["cpu"], strict=True).provider == "CPUExecutionProvider"

    folder = tmp_path / "broken"
    shutil.copytree(onnx_file.parent, folder)
    (folder / "variants" / "model.fp16.onnx").write_bytes(b"not an onnx file")
    broken = judge_served(FileSource(folder / "model.onnx"), "file", splits, references, GateParams(large_batch=4, max_skew=1.0),
                          ServingSettings(), folder)
    failed = [g for g in broken.gates if g.verdict == FAILED]
    assert [g.name for g in failed] == ["serving.fp16.load"] and "ONNX Runtime cannot load it" in failed[0].detail
    here, _ = choose_variant(AUTO, "CPUExecutionProvider", [FP32, INT8, FP16])  # INT8 or FP32, by this CPU
    assert broken.variant == here and broken.variants[FP16]["provider"] == ""
    report = GateReport(broken.gates, broken.provider, None, broken.extra, broken.variant, broken.variants)
    assert "| fp16 |  |  | did not load |  |  |" in report.markdown()


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
    assert skewed.name == "contract.fp32.skew"
    assert skewed.verdict == FAILED and skewed.value == pytest.approx(0.18) and skewed.detail.startswith("train/serve skew")
    assert skew_gate(None, 0.80, GateParams()).verdict == SKIPPED
    int8 = skew_gate(0.70, 0.80, GateParams(max_skew=0.002), INT8, "the export stage")
    assert int8.name == "contract.int8.skew" and "score 0.7000 on int8, the export stage measured 0.8000" in int8.detail


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
