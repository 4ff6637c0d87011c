"""export: the fine-tuned model with its temperature folded in (models/calibration.json) as ONNX, checked for parity
with PyTorch, and its INT8 / FP16 variants, each scored; each file stores its own drift reference
(components/export.py add_drift_reference)."""
from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components import data as data_mod
from components.artifacts import read_json, write_json
from components.calibrate import with_temperature
from components.config import Int8SearchParams, Params
from components.export import (
    Int8Recipe,
    ParityFailed,
    add_drift_reference,
    check_parity,
    convert_fp16,
    export_onnx,
    score_onnx,
    search_int8,
    within_drop,
)
from components.layout import Layout
from components.network import GraftNet, load_checkpoint
from components.predict import for_inference
from deploy.contract import Contract
from deploy.tags import DATA_VERSION_KEY, SOURCE_KEY, STRATEGY_KEY
from deploy.variants import FP32, INT8, variant_path


def calibrated_model() -> tuple[GraftNet, dict]:
    """The fine-tuned model with its temperature folded in, and its checkpoint's metadata: what export writes."""
    trained, meta = load_checkpoint(Layout.transfer_model)
    return with_temperature(trained, float(read_json(Layout.calibration)["temperature"])), meta


def calibration_images(splits: data_mod.Splits, contract: Contract, limit: int, seed: int) -> np.ndarray:
    """What INT8 ranges are calibrated on, normalised: up to `limit` target images, train then val, never test."""
    return contract.normalize(in_distribution_images([(splits.x_train, splits.y_train), (splits.x_val, splits.y_val)],
                                                     limit, seed))


def in_distribution_images(parts: list[tuple[np.ndarray, np.ndarray]], limit: int, seed: int) -> np.ndarray:
    """Up to `limit` images of `parts` (images and their labels), in that order: a part that fits is taken whole, the
    one the limit falls in gives a class-stratified draw (data.stratified_take). Never its first images: a split is
    stored class by class, and the first N of it would be a few classes (a skewed drift reference alarms on every
    window of in-distribution traffic)."""
    rng, taken, left = np.random.default_rng(seed), [], limit
    for images, labels in parts:
        if left <= 0:
            break
        taken.append(images if len(images) <= left else images[data_mod.stratified_take(labels, left, rng)])
        left -= len(taken[-1])
    return np.concatenate(taken)


def quantization_inputs(params: Params) -> tuple[GraftNet, data_mod.Splits, np.ndarray]:
    """The calibrated model, the selected target's splits and the INT8 calibration images: what the export's INT8
    search starts from (benchmarks/adapter_fold.py and int8_kernels.py start there too)."""
    model, _ = calibrated_model()
    splits = data_mod.load_splits(Layout.selected_data)
    return model, splits, calibration_images(splits, model.spec.contract, params.export.calibration_images, params.seed)


def export(params: Params) -> dict:
    model, meta = calibrated_model()
    export_onnx(model, Layout.onnx_model, params.export.opset, {
        STRATEGY_KEY: meta["strategy"], DATA_VERSION_KEY: meta["data_version"],
        SOURCE_KEY: json.dumps(meta.get("source", {}), sort_keys=True),
    })
    splits = data_mod.load_splits(Layout.selected_data)
    reference = DriftImages.of(splits, params.export.drift_reference_images, params.seed)
    reference.add_to(Layout.onnx_model, model.spec.contract)
    parity = check_parity(for_inference(model, params.compute), Layout.onnx_model, splits.x_test,
                          params.export.parity_atol, params.export.parity_rtol)
    # Metrics only: the exporter's bytes are not reproducible (DVC's lock keeps the file's hash).
    result = {**asdict(parity), "passed": parity.passed, "onnx_bytes": Layout.onnx_model.stat().st_size,
              "drift_reference_images": len(reference.pixels)}
    if not parity.passed:
        write_json(Layout.export_metrics, result)
        raise ParityFailed(
            f"ONNX parity failed: max |diff| {parity.max_abs_diff:.2e} is {parity.worst_tolerance_ratio:.2f}x the allowed "
            f"atol {parity.atol:.0e} + rtol {parity.rtol:.0e} * |logit|, "
            f"top-1 agreement {parity.argmax_agreement:.4f} (need 1.0); the model is not registered"
        )
    result["variants"] = export_variants(params, model.spec.contract, splits, reference)
    write_json(Layout.export_metrics, result)
    return result


@dataclass(frozen=True)
class DriftImages:
    """What every exported file's drift reference is computed on: in-distribution images, from the validation split
    first (the model did not fit them, as it did not fit what it will be served), then the training split; never
    the test split, which measures the drift test's false alarms. With the training labels' class shares."""

    pixels: np.ndarray
    prior: np.ndarray

    @classmethod
    def of(cls, splits: data_mod.Splits, limit: int, seed: int) -> DriftImages:
        counts = np.bincount(splits.y_train, minlength=len(splits.classes))
        images = in_distribution_images([(splits.x_val, splits.y_val), (splits.x_train, splits.y_train)], limit, seed)
        return cls(images, counts / counts.sum())

    def add_to(self, path: Path, contract: Contract) -> None:
        add_drift_reference(path, contract, self.pixels, self.prior)


def export_variants(params: Params, contract: Contract, splits: data_mod.Splits, reference: DriftImages) -> dict[str, dict]:
    """Every configured variant built from the FP32 file in a folder of its own, then all scored on the test split
    beside it (timed in turns), and moved into models/variants/ only when it loses at most export.max_accuracy_drop:
    a variant there is published, and one the bound refused (or a stage killed half way) never appears there."""
    settings = params.export
    calibration = calibration_images(splits, contract, settings.calibration_images, params.seed)
    if Layout.onnx_variants.exists():
        shutil.rmtree(Layout.onnx_variants)
    Layout.onnx_variants.mkdir(parents=True)
    published_paths = [variant_path(Layout.onnx_model, variant) for variant in settings.variants]
    recipes = {}
    with tempfile.TemporaryDirectory(dir=Layout.onnx_variants, prefix=".building-") as building:
        paths = [Path(building) / path.name for path in published_paths]
        for variant, path in zip(settings.variants, paths):
            if variant == INT8:
                _, recipes[variant] = search_int8(
                    Layout.onnx_model, path, calibration, int8_recipes(settings.int8_search),
                    settings.calibration_percentile, contract, splits.x_val, splits.y_val, settings.max_accuracy_drop,
                    settings.int8_search.same_speed_within)
            else:
                convert_fp16(Layout.onnx_model, path)
            reference.add_to(path, contract)  # before scoring: the size scored is the size published
        fp32, *measured = score_onnx([Layout.onnx_model, *paths], contract, splits.x_test, splits.y_test)
        scores = {FP32: {**asdict(fp32), "accuracy_drop": 0.0, "published": True}}
        for variant, path, published_path, score in zip(settings.variants, paths, published_paths, measured):
            drop = fp32.accuracy - score.accuracy
            published = within_drop(fp32.accuracy, score.accuracy, settings.max_accuracy_drop)
            scores[variant] = {**asdict(score), "accuracy_drop": drop, "published": published,
                               "speedup_batch64_cpu": fp32.latency_ms_batch64 / score.latency_ms_batch64,
                               **({"recipes": recipes[variant]} if variant in recipes else {})}
            if published:
                path.replace(published_path)
            else:
                scores[variant]["why_not"] = (f"{100 * drop:.2f} points below FP32 on the test split, more than "
                                              f"export.max_accuracy_drop {100 * settings.max_accuracy_drop:g}")
    return scores


def int8_recipes(search: Int8SearchParams) -> list[Int8Recipe]:
    """Every combination of export.int8_search's lists."""
    return [Int8Recipe(*recipe) for recipe in itertools.product(
        search.formats, search.per_channel, search.calibration, search.float_convs, search.float_classifier)]
