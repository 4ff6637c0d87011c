"""Evaluation gates: everything that can break production, each with its value, bound and verdict.

1. quality floor   2. transfer pays (else: negative transfer)   3. no regression against the champion
4. calibration (the served probabilities' expected calibration error on the test split)   5. export parity
6. no train/serve skew (the test split's image files through the server's own decoding and normalisation, read from
the model's metadata, score what was measured before export)   7. serving check (the file loaded as the server
loads it, latency and size budgets)

6 and 7 judge what is served: every export variant the server may choose (FP32, and INT8 and FP16 as exported),
each fetched through the server's own source (deploy/source.py) and loaded by its own load_model, under gate names
that carry the variant (`contract.int8.skew`, `serving.int8.latency_ms_batch1`); `serving.variant` names the one
`graft serve` would pick on this machine, and fails when it would refuse to serve (a variant asked for and not
published).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from components.settings import GateParams
from deploy.settings import ServingSettings
from components.data import Splits
from components.errors import CandidateRejected
from components.evaluate import score
from deploy.digest import sha256_file
from deploy.model import (
    InputError,
    LoadedModel,
    ModelLoadError,
    decode_image,
    engine_cache,
    load_model,
    planned_provider,
)
from deploy.source import FileSource, RegistrySource, SourceError
from deploy.variants import FP32, VARIANTS, VariantError, choose_variant

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class Gate:
    name: str
    verdict: str
    value: float | None
    bound: str
    detail: str = ""


QUALITY_FIX = ("more labelled images (data.target.labels_per_class: null trains on all of them), a stronger source or "
               "recipe, or a floor that fits this data")


@dataclass
class GateReport:
    gates: list[Gate]
    provider: str = ""  # the provider running the variant `graft serve` would serve here
    champion_version: str | None = None
    extra: dict = field(default_factory=dict)
    served_variant: str = ""  # the variant `graft serve` would serve on this machine ("" when it would refuse)
    variants: dict[str, dict] = field(default_factory=dict)  # each variant judged: its file, sha256, provider, ...

    @property
    def passed(self) -> bool:
        return all(g.verdict != FAILED for g in self.gates)

    @property
    def failures(self) -> list[Gate]:
        return [g for g in self.gates if g.verdict == FAILED]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "provider": self.provider, "champion_version": self.champion_version,
                "served_variant": self.served_variant, "variants": self.variants,
                "gates": [asdict(g) for g in self.gates], **self.extra}

    @classmethod
    def from_dict(cls, raw: dict) -> GateReport:
        known = {"passed", "provider", "champion_version", "gates", "served_variant", "variants"}
        return cls([Gate(**g) for g in raw["gates"]], raw.get("provider", ""), raw.get("champion_version"),
                   {k: v for k, v in raw.items() if k not in known}, raw.get("served_variant", ""),
                   raw.get("variants", {}))

    def markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        rows = [f"## Gate report: {verdict}", "", "| gate | verdict | value | bound | detail |", "| --- | --- | --- | --- | --- |"]
        for g in self.gates:
            value = "" if g.value is None else f"{g.value:.6g}"
            rows.append(f"| {g.name} | {g.verdict} | {value} | {g.bound} | {g.detail} |")
        if self.variants:
            rows += ["", "| variant | file | sha256 | runs on | served test accuracy | `graft serve` here |",
                     "| --- | --- | --- | --- | --- | --- |"]
            for name, seen in self.variants.items():
                accuracy = seen.get("served_accuracy")
                rows.append(f"| {name} | {seen.get('file', '')} | {seen.get('sha256', '')[:16]} | "
                            f"{seen.get('provider') or 'did not load'} | {'' if accuracy is None else f'{accuracy:.4f}'} | "
                            f"{'**serves this**' if name == self.served_variant else ''} |")
        served = self.extra.get("served_variant_note") or self.served_variant or "n/a"
        rows += ["", f"Serving check ran on: {self.provider or 'n/a'}; `graft serve` here would serve: {served}; "
                     f"champion compared: {self.champion_version or 'none'}"]
        return "\n".join(rows)

    def enforce(self) -> None:
        """A rejected candidate ends the run (exit status 3 on the command line) with every failed gate named."""
        if not self.passed:
            fix = f". What helps: {QUALITY_FIX}" if any(g.name.startswith("quality.") for g in self.failures) else ""
            raise CandidateRejected(f"candidate rejected by {len(self.failures)} gate(s): {self.failure_text()}{fix}")

    def failure_text(self) -> str:
        return "; ".join(f"{g.name}: {g.detail or f'{g.value} vs {g.bound}'}" for g in self.failures)


def at_least(name: str, value: float, bound: float, detail_failed: str = "") -> Gate:
    passed = value >= bound
    return Gate(name, PASSED if passed else FAILED, value, f">= {bound:g}", "" if passed else detail_failed)


def at_most(name: str, value: float, bound: float, detail_failed: str = "") -> Gate:
    passed = value <= bound
    return Gate(name, PASSED if passed else FAILED, value, f"<= {bound:g}", "" if passed else detail_failed)


def quality_gates(evaluation: dict, gates: GateParams) -> list[Gate]:
    transfer = evaluation["transfer"]
    return [
        at_least("quality.accuracy", transfer["accuracy"], gates.min_accuracy,
                  f"test accuracy {transfer['accuracy']:.4f} is below the quality floor gates.min_accuracy {gates.min_accuracy:g}"),
        at_least("quality.macro_f1", transfer["macro_f1"], gates.min_macro_f1,
                  f"test macro-F1 {transfer['macro_f1']:.4f} is below the quality floor gates.min_macro_f1 {gates.min_macro_f1:g}"),
    ]


def calibration_gate(evaluation: dict, gates: GateParams) -> Gate:
    """The expected calibration error of the probabilities the exported file answers (its temperature folded in)."""
    calibration = evaluation["calibration"]
    if gates.max_ece is None:
        return Gate("calibration.ece", SKIPPED, calibration["ece"], "", "gates.max_ece is null: not gated")
    return at_most("calibration.ece", calibration["ece"], gates.max_ece,
                   f"the probabilities' expected calibration error on the test split, {calibration['ece']:.4f} "
                   f"(T = {calibration['temperature']:.3g}), is above gates.max_ece {gates.max_ece:g}; what helps: "
                   f"calibration.method: temperature, more validation images to fit it on (data.target.val_size), "
                   f"or a bound that fits this test split's size")


@dataclass(frozen=True)
class PairedComparison:
    """Two models scored on the same test examples. Only the examples where they disagree carry information:
    `only_a` right by model a alone, `only_b` by model b alone. The p-value is McNemar's exact test (a
    binomial test on the discordant pairs); the interval is a seeded bootstrap of the accuracy difference,
    drawn as multinomial counts over (only a right, only b right, the rest): the same distribution as
    resampling the examples, in O(resamples)."""

    examples: int
    only_a: int
    only_b: int
    confidence: float
    difference: float = 0.0   # accuracy(a) - accuracy(b)
    ci_low: float = 0.0
    ci_high: float = 0.0
    p_value: float = 1.0

    @classmethod
    def of(cls, correct_a: np.ndarray, correct_b: np.ndarray, confidence: float) -> PairedComparison:
        correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
        if correct_a.shape != correct_b.shape:
            raise ValueError(f"paired comparison needs the same examples: {correct_a.shape} vs {correct_b.shape}")
        return cls.from_counts(len(correct_a), int((correct_a & ~correct_b).sum()), int((correct_b & ~correct_a).sum()), confidence)

    @classmethod
    def from_counts(cls, examples: int, only_a: int, only_b: int, confidence: float, resamples: int = 20000) -> PairedComparison:
        n = max(examples, 1)
        shares = np.array([only_a, only_b, examples - only_a - only_b], float) / n
        draws = np.random.default_rng(0).multinomial(examples, shares, size=resamples) if examples else np.zeros((1, 3))
        differences = (draws[:, 0] - draws[:, 1]) / n
        tail = (1 - confidence) / 2
        low, high = np.quantile(differences, [tail, 1 - tail])
        return cls(examples, only_a, only_b, confidence, (only_a - only_b) / n, float(low), float(high),
                   _mcnemar_exact(only_a, only_b))

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - self.confidence

    def text(self, a: str, b: str) -> str:
        return (f"{a} minus {b}: {100 * self.difference:+.2f} points, {100 * self.confidence:g}% CI "
                f"[{100 * self.ci_low:+.2f}, {100 * self.ci_high:+.2f}], McNemar p={self.p_value:.3g} "
                f"({self.only_a} vs {self.only_b} of {self.examples} examples right by one model only)")


@dataclass(frozen=True)
class UnpairedComparison:
    """Two models scored on different examples (a canary's answers and the champion's, each on its own requests):
    accuracy a minus accuracy b, with Fisher's exact two-sided p-value. Reads like PairedComparison for worse_gate."""

    right_a: int
    examples_a: int
    right_b: int
    examples_b: int
    confidence: float

    @property
    def difference(self) -> float:
        return self.right_a / max(self.examples_a, 1) - self.right_b / max(self.examples_b, 1)

    @property
    def p_value(self) -> float:
        return _fisher_exact(self.right_a, self.examples_a, self.right_b, self.examples_b)

    @property
    def significant(self) -> bool:
        return self.p_value < 1 - self.confidence

    def text(self, a: str, b: str) -> str:
        return (f"{a} {self.right_a}/{self.examples_a} right, {b} {self.right_b}/{self.examples_b}: "
                f"{100 * self.difference:+.2f} points, Fisher p={self.p_value:.3g}")


def _fisher_exact(right_a: int, examples_a: int, right_b: int, examples_b: int) -> float:
    """Two-sided Fisher exact test of "a and b are right equally often": every table with these margins at most as
    likely as the observed one."""
    total, right = examples_a + examples_b, right_a + right_b

    def log_probability(k: int) -> float:  # k of the right answers among a's: hypergeometric
        return (_log_choose(right, k) + _log_choose(total - right, examples_a - k) - _log_choose(total, examples_a))

    observed = log_probability(right_a)
    low, high = max(0, examples_a - (total - right)), min(right, examples_a)
    return min(1.0, sum(math.exp(log_probability(k)) for k in range(low, high + 1)
                        if log_probability(k) <= observed + 1e-9))


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar: under "equally good", the discordant pairs split like fair coin flips."""
    discordant, smaller = only_a + only_b, min(only_a, only_b)
    if discordant == 0:
        return 1.0
    log_half = discordant * math.log(0.5)
    tail = sum(math.exp(math.lgamma(discordant + 1) - math.lgamma(i + 1) - math.lgamma(discordant - i + 1) + log_half)
               for i in range(smaller + 1))
    return min(1.0, 2 * tail)


def worse_gate(name: str, comparison: PairedComparison | UnpairedComparison, gates: GateParams, a: str, b: str, verdict_name: str) -> Gate:
    """Fail only when a is worse than b significantly and by at least the minimum effect: noise never fails."""
    worse = comparison.significant and comparison.difference <= -gates.min_effect
    bound = f"not significantly below -{gates.min_effect:g} at {100 * gates.confidence:g}%"
    if worse:
        return Gate(name, FAILED, comparison.difference, bound, f"{verdict_name}: {comparison.text(a, b)}")
    why = "not significant" if not comparison.significant else f"smaller than the minimum effect {gates.min_effect:g}"
    return Gate(name, PASSED, comparison.difference, bound, f"{why}: {comparison.text(a, b)}" if comparison.difference < 0 else comparison.text(a, b))


def transfer_gate(comparison: PairedComparison, gates: GateParams) -> Gate:
    """Transfer vs scratch on the same test examples. `not_worse`: fail only on significant negative transfer;
    `better`: pass only when transfer is significantly better by at least the minimum effect."""
    if gates.transfer == "off":
        return Gate("transfer.gain", SKIPPED, comparison.difference, "", "gates.transfer is off")
    if gates.transfer == "not_worse":
        return worse_gate("transfer.gain", comparison, gates, "transfer", "scratch", "negative transfer")
    pays = comparison.significant and comparison.difference >= gates.min_effect
    bound = f"significantly above +{gates.min_effect:g} at {100 * gates.confidence:g}%"
    detail = comparison.text("transfer", "scratch")
    return Gate("transfer.gain", PASSED if pays else FAILED, comparison.difference, bound,
                detail if pays else f"transfer does not pay: {detail}")


def regression_gate(comparison: PairedComparison | None, gates: GateParams) -> Gate:
    if comparison is None:
        return Gate("no_regression", SKIPPED, None, "", "no champion yet: nothing to compare with")
    return worse_gate("no_regression", comparison, gates, "candidate", "champion", "worse than the champion")


def parity_gates(parity: dict) -> list[Gate]:
    return [
        at_least("parity.top1_agreement", parity["argmax_agreement"], 1.0,
                  "ONNX Runtime and PyTorch disagree on the top-1 class of some test examples"),
        at_most("parity.logits", parity["worst_tolerance_ratio"], 1.0,
                 f"logits differ beyond atol {parity['atol']:g} + rtol {parity['rtol']:g} * |logit| (max |diff| {parity['max_abs_diff']:.2e})"),
    ]


def decoded_test_split(contract, splits: Splits, root: Path = Path(".")) -> np.ndarray | None:
    """The test split as the server receives it: every image file decoded under `contract` by the server's own code.
    For IDX data (no image files) the prepared arrays, when they have the contract's shape; else None."""
    files = [root / str(origin) for origin in splits.origin_test]
    if all(f.is_file() for f in files):
        try:
            return np.stack([decode_image(f.read_bytes(), contract) for f in files])
        except InputError as error:
            raise ValueError(f"a test image no longer decodes ({error}); prepare the target again") from None
    if contract.shape == splits.x_test.shape[1:]:
        return splits.x_test
    return None


def served_predictions(model: LoadedModel, splits: Splits, root: Path = Path("."), batch_size: int = 256,
                       decoded: dict | None = None) -> np.ndarray | None:
    """The exported model's class for each test example, every image file decoded and normalised by the
    server's own code under the contract in the model's metadata. None when the test split has no image files
    (IDX data) and the model cannot take the prepared arrays either. `decoded` keeps the decoded test split by
    contract, for the next model (a model's variants share one contract: the files are decoded once)."""
    decoded = {} if decoded is None else decoded
    if model.contract not in decoded:
        decoded[model.contract] = decoded_test_split(model.contract, splits, root)
    pixels = decoded[model.contract]
    if pixels is None:
        return None
    logits = np.concatenate([model.run(model.contract.normalize(pixels[i : i + batch_size])) for i in range(0, len(pixels), batch_size)])
    return logits.argmax(1)


EVALUATED = "the evaluate stage"  # what measured FP32's accuracy (PyTorch, on the prepared arrays)


def skew_gate(served: float | None, evaluated: float, gates: GateParams, variant: str = FP32,
              measured_by: str = EVALUATED) -> Gate:
    """`served`: the variant's accuracy on the test files through the server's decoding; `evaluated`: its accuracy
    on the prepared arrays (`measured_by`: the evaluate stage for FP32, the export stage for a variant, whose
    quantisation loss export.max_accuracy_drop bounds already): the gap is preprocessing, not the variant."""
    name = f"contract.{variant}.skew"
    if served is None:
        return Gate(name, SKIPPED, None, "", "the test split has no image files to decode (IDX data)")
    gap = abs(served - evaluated)
    detail = (f"train/serve skew: the test images decoded and normalised as the server does score {served:.4f} on "
              f"{variant}, {measured_by} measured {evaluated:.4f}; the preprocessing contract is not what training used")
    return at_most(name, gap, gates.max_skew, detail)


def _timed(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, repeats: int) -> tuple[np.ndarray, float]:
    """The first answer (the warm-up call: it allocates) and the median milliseconds of `repeats` calls after it."""
    first = run(batch)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(batch)
        timings.append((time.perf_counter() - started) * 1000)
    return first, float(np.median(timings))


def load_served(path: Path, serving: ServingSettings) -> LoadedModel:
    """A model file loaded in a fresh session exactly as `graft serve` loads it (deploy/server.py)."""
    return load_model(path, providers=list(serving.providers), strict=serving.strict, threads=serving.threads)


def serving_gates(model: LoadedModel, x_test: np.ndarray, y_test: np.ndarray, gates: GateParams,
                  variant: str = FP32) -> tuple[list[Gate], dict]:
    """A loaded variant queried with test images at batch 1 and at the configured large batch (test examples
    repeated when the split is smaller): its answers, latency and file size; and what was seen."""
    repeat = np.resize(np.arange(len(x_test)), gates.large_batch)
    logits, large_ms = _timed(model.run, model.contract.normalize(x_test[repeat]), repeats=5)
    _, single_ms = _timed(model.run, model.contract.normalize(x_test[:1]), repeats=30)
    answers_ok = logits.shape == (len(repeat), len(model.classes)) and bool(np.isfinite(logits).all())
    accuracy = score(y_test[repeat], logits.argmax(1), model.classes).accuracy if answers_ok else None
    size_mb = model.size_bytes / 1e6
    on = f"{variant} on {model.provider}"
    result = [
        Gate(f"serving.{variant}.answers", PASSED if answers_ok else FAILED, float(answers_ok), "== 1",
             "" if answers_ok else f"{on} answered {logits.shape} or non-finite logits"),
        at_most(f"serving.{variant}.latency_ms_batch1", single_ms, gates.max_latency_ms_batch1, f"batch 1 too slow: {on}"),
        at_most(f"serving.{variant}.latency_ms_batch{len(repeat)}", large_ms, gates.max_latency_ms_large_batch,
                 f"batch {len(repeat)} too slow: {on}"),
        at_most(f"serving.{variant}.model_mb", size_mb, gates.max_model_mb, f"the {variant} file is over the size budget"),
    ]
    return result, {"serving_accuracy_on_large_batch": accuracy, "latency_ms_batch1": single_ms,
                    f"latency_ms_batch{len(repeat)}": large_ms}


def served_choice(serving: ServingSettings, available: list[str], loaded: dict[str, LoadedModel]) -> tuple[str, str]:
    """The variant `graft serve` would serve here, and why, decided as the server decides (deploy/server.py): for the
    provider ONNX Runtime will try first, and again for the provider that really runs it when that one did not
    start. VariantError when the server would refuse (a variant asked for that the model does not have)."""
    planned = planned_provider(list(serving.providers), engine_cache(None))
    variant, why = choose_variant(serving.variant, planned, available)
    model = loaded.get(variant)
    if model is not None and model.provider != planned:
        variant, why = choose_variant(serving.variant, model.provider, available)
    return variant, why


@dataclass
class ServedVariants:
    """The served-model gates of every variant, and what `graft serve` would serve here."""

    gates: list[Gate]
    provider: str  # the provider running the variant `graft serve` would serve ("" when it did not load)
    variant: str  # that variant ("" when `graft serve` would refuse the model)
    variants: dict[str, dict]  # each variant: its file, sha256, provider, served accuracy, latencies (JSON)
    extra: dict
    predictions: dict[str, np.ndarray | None] = field(default_factory=dict)  # each loaded variant's test classes
    loaded: dict[str, LoadedModel] = field(default_factory=dict)


def judge_served(source: FileSource | RegistrySource, version: str, splits: Splits,
                 references: dict[str, tuple[float, str]], gates: GateParams, serving: ServingSettings,
                 root: Path = Path(".")) -> ServedVariants:
    """Every variant the source holds for `version` (FP32, and INT8 and FP16 as exported or published), each fetched
    (and, from a registry, checked against its sha256) and loaded as the server does, then gated: skew against
    `references[variant]` (accuracy, what measured it; FP32's when the variant has none), answers, latency, size."""
    available = [v for v in source.variants(version) if v in VARIANTS]
    result: list[Gate] = []
    facts: dict[str, dict] = {}
    predictions: dict[str, np.ndarray | None] = {}
    loaded: dict[str, LoadedModel] = {}
    decoded: dict = {}
    for variant in available:
        try:
            resolved = source.fetch(version, variant)
            model = load_served(resolved.onnx_path, serving)
        except (SourceError, ModelLoadError) as error:  # a changed file; strict serving refusing a CPU fallback
            result.append(Gate(f"serving.{variant}.load", FAILED, None, "loads", str(error)))
            facts[variant] = {"provider": "", "load_error": str(error)}
            continue
        loaded[variant] = model
        predicted = predictions[variant] = served_predictions(model, splits, root, decoded=decoded)
        served = None if predicted is None else float((predicted == splits.y_test).mean())
        reference, measured_by = references.get(variant, references[FP32])
        result.append(skew_gate(served, reference, gates, variant, measured_by))
        serving_result, seen = serving_gates(model, splits.x_test, splits.y_test, gates, variant)
        result += serving_result
        path = Path(resolved.onnx_path)
        facts[variant] = {"file": str(path.relative_to(root) if path.is_relative_to(root) else path),
                          "sha256": sha256_file(path), "bytes": model.size_bytes, "provider": model.provider,
                          "active_providers": list(model.active_providers), "provider_note": model.provider_note,
                          "served_accuracy": served, "reference_accuracy": reference, "reference": measured_by, **seen}
    try:
        chosen, why = served_choice(serving, available, loaded)
        note = f"{chosen} ({why})"
        result.append(Gate("serving.variant", PASSED, None, "a published variant", f"`graft serve` here serves {note}"))
    except VariantError as error:
        chosen, note = "", ""
        result.append(Gate("serving.variant", FAILED, None, "a published variant", f"`graft serve` would refuse it: {error}"))
    model = loaded.get(chosen)
    extra = {"requested_providers": list(model.requested_providers if model else serving.providers),
             "active_providers": list(model.active_providers) if model else [],
             "provider_note": model.provider_note if model else "", "served_variant_note": note}
    return ServedVariants(result, model.provider if model else "", chosen, facts, extra, predictions, loaded)
