"""Evaluation gates: everything that can break production, each with its value, bound and verdict.

1. quality floor   2. transfer pays (else: negative transfer)   3. no regression against the champion
4. export parity   5. no train/serve skew (the test split's image files through the server's own decoding and
normalisation, read from the model's metadata, score what the evaluate stage measured)   6. serving check (the
artifact loaded as the server loads it, latency and size budgets)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from components.config import GateParams, ServingParams
from components.data import Splits
from components.evaluate import score
from deploy.model import (
    InputError,
    LoadedModel,
    ModelLoadError,
    decode_image,
    load_model,
)

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class Gate:
    name: str
    verdict: str
    value: float | None
    bound: str
    detail: str = ""


@dataclass
class GateReport:
    gates: list[Gate]
    provider: str = ""
    champion_version: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.verdict != FAILED for g in self.gates)

    @property
    def failures(self) -> list[Gate]:
        return [g for g in self.gates if g.verdict == FAILED]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "provider": self.provider, "champion_version": self.champion_version,
                "gates": [asdict(g) for g in self.gates], **self.extra}

    @classmethod
    def from_dict(cls, raw: dict) -> GateReport:
        known = {"passed", "provider", "champion_version", "gates"}
        return cls([Gate(**g) for g in raw["gates"]], raw.get("provider", ""), raw.get("champion_version"),
                   {k: v for k, v in raw.items() if k not in known})

    def markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        rows = [f"## Gate report: {verdict}", "", "| gate | verdict | value | bound | detail |", "| --- | --- | --- | --- | --- |"]
        for g in self.gates:
            value = "" if g.value is None else f"{g.value:.6g}"
            rows.append(f"| {g.name} | {g.verdict} | {value} | {g.bound} | {g.detail} |")
        rows += ["", f"Serving check ran on: {self.provider or 'n/a'}; champion compared: {self.champion_version or 'none'}"]
        return "\n".join(rows)

    def failure_text(self) -> str:
        return "; ".join(f"{g.name}: {g.detail or f'{g.value} vs {g.bound}'}" for g in self.failures)


def _at_least(name: str, value: float, bound: float, detail_failed: str = "") -> Gate:
    passed = value >= bound
    return Gate(name, PASSED if passed else FAILED, value, f">= {bound:g}", "" if passed else detail_failed)


def _at_most(name: str, value: float, bound: float, detail_failed: str = "") -> Gate:
    passed = value <= bound
    return Gate(name, PASSED if passed else FAILED, value, f"<= {bound:g}", "" if passed else detail_failed)


def quality_gates(evaluation: dict, gates: GateParams) -> list[Gate]:
    transfer = evaluation["transfer"]
    return [
        _at_least("quality.accuracy", transfer["accuracy"], gates.min_accuracy, "test accuracy below the quality floor"),
        _at_least("quality.macro_f1", transfer["macro_f1"], gates.min_macro_f1, "test macro-F1 below the quality floor"),
    ]


def transfer_gate(evaluation: dict, gates: GateParams) -> Gate:
    gain = evaluation["transfer"]["accuracy"] - evaluation["scratch"]["accuracy"]
    detail = (f"negative transfer: the transferred model scores {100 * gain:+.2f} points against a from-scratch model "
              f"on the same target data (need >= {100 * gates.min_transfer_gain:+.2f})")
    return _at_least("transfer.gain", gain, gates.min_transfer_gain, detail)


def regression_gate(candidate_accuracy: float, champion_accuracy: float | None, gates: GateParams) -> Gate:
    if champion_accuracy is None:
        return Gate("no_regression", SKIPPED, None, "", "no champion yet: nothing to compare with")
    if gates.regression_mode == "absolute":
        bound = champion_accuracy - gates.max_regression
    else:
        bound = champion_accuracy * (1 - gates.max_regression)
    detail = f"worse than the champion ({champion_accuracy:.4f}) beyond the {gates.regression_mode} tolerance {gates.max_regression:g}"
    return _at_least("no_regression", candidate_accuracy, bound, detail)


def parity_gates(parity: dict) -> list[Gate]:
    return [
        _at_least("parity.top1_agreement", parity["argmax_agreement"], 1.0,
                  "ONNX Runtime and PyTorch disagree on the top-1 class of some test examples"),
        _at_most("parity.logits", parity["worst_tolerance_ratio"], 1.0,
                 f"logits differ beyond atol {parity['atol']:g} + rtol {parity['rtol']:g} * |logit| (max |diff| {parity['max_abs_diff']:.2e})"),
    ]


def served_accuracy(model: LoadedModel, splits: Splits, batch_size: int = 256) -> float | None:
    """Accuracy of an exported model on the test split's image files, each decoded and normalised by the
    server's own code under the contract in the model's metadata. None when the test split has no image files
    (IDX data) and the model cannot take the prepared arrays either."""
    files = [str(origin) for origin in splits.origin_test]
    if all(Path(f).is_file() for f in files):
        try:
            pixels = np.stack([decode_image(Path(f).read_bytes(), model.contract) for f in files])
        except InputError as error:
            raise ValueError(f"a test image no longer decodes ({error}); prepare the target again") from None
    elif model.contract.shape == splits.x_test.shape[1:]:
        pixels = splits.x_test
    else:
        return None
    logits = np.concatenate([model.run(model.contract.normalize(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)])
    return score(splits.y_test, logits.argmax(1), model.classes).accuracy


def skew_gate(served: float | None, evaluated: float, gates: GateParams) -> Gate:
    if served is None:
        return Gate("contract.skew", SKIPPED, None, "", "the test split has no image files to decode (IDX data)")
    gap = abs(served - evaluated)
    detail = (f"train/serve skew: the test images decoded and normalised as the server does score {served:.4f}, the "
              f"evaluate stage measured {evaluated:.4f}; the preprocessing contract is not what training used")
    return _at_most("contract.skew", gap, gates.max_skew, detail)


def _median_ms(run, batch: np.ndarray, repeats: int) -> float:
    run(batch)  # warm-up: the first call allocates
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(batch)
        timings.append((time.perf_counter() - started) * 1000)
    return float(np.median(timings))


def serving_gates(onnx_path: Path, x_test: np.ndarray, y_test: np.ndarray, gates: GateParams,
                  serving: ServingParams) -> tuple[list[Gate], str, dict]:
    """Load the artifact in a fresh session exactly as `graft serve` does and query it with test images."""
    try:
        model = load_model(onnx_path, providers=list(serving.providers), strict=serving.strict)
    except ModelLoadError as error:  # includes strict mode refusing a CPU fallback
        return [Gate("serving.load", FAILED, None, "loads", str(error))], "", {"requested_providers": list(serving.providers)}
    large = x_test[: gates.large_batch]
    logits = model.run(model.contract.normalize(large))
    answers_ok = logits.shape == (len(large), len(model.classes)) and bool(np.isfinite(logits).all())
    accuracy = score(y_test[: len(large)], logits.argmax(1), model.classes).accuracy
    single_ms = _median_ms(model.run, model.contract.normalize(x_test[:1]), repeats=30)
    large_ms = _median_ms(model.run, model.contract.normalize(large), repeats=5)
    size_mb = model.size_bytes / 1e6
    result = [
        Gate("serving.answers", PASSED if answers_ok else FAILED, float(answers_ok), "== 1",
             "" if answers_ok else f"the served model answered {logits.shape} or non-finite logits"),
        _at_most("serving.latency_ms_batch1", single_ms, gates.max_latency_ms_batch1, f"batch 1 too slow on {model.provider}"),
        _at_most(f"serving.latency_ms_batch{len(large)}", large_ms, gates.max_latency_ms_large_batch,
                 f"batch {len(large)} too slow on {model.provider}"),
        _at_most("serving.model_mb", size_mb, gates.max_model_mb, "model file over the size budget"),
    ]
    extra = {"serving_accuracy_on_large_batch": accuracy, "requested_providers": list(model.requested_providers),
             "active_providers": list(model.active_providers)}
    return result, model.provider, extra
