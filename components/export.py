"""Export: ONNX with a dynamic batch axis, the preprocessing contract and class names in its metadata,
checked by the ONNX checker, and a parity check of ONNX Runtime against PyTorch on the test split.

The file has two outputs: the logits and the penultimate features (the contract names both). Each file, FP32 and
every variant, also stores a drift reference in its metadata (deploy/drift.py): the features, predicted classes
and confidences its own ONNX Runtime session computes on in-distribution images (INT8 and FP16 features differ
from FP32's), so the server can test whether what it is sent still looks like them.

Variants of the FP32 file (deploy/variants.py): INT8 by ONNX Runtime's static quantization (QDQ, per-channel
weights, activation ranges calibrated on target images that are not test images) and FP16 (weights and compute
in half precision, FP32 inputs and outputs). Each is scored on the test split like the FP32 file; one that loses
more than the bound is not written.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

from components.artifacts import atomic_path
from components.errors import GraftError
from components.network import GraftNet
from components.predict import Normalizer, predict_logits
from deploy.contract import Contract
from deploy.cpu import exact_int8_entries, has_int8_dot
from deploy.drift import DriftReference
from deploy.tags import CLASSES_KEY, CONTRACT_KEY, DRIFT_REFERENCE_KEY  # the server reads exactly what export writes
from deploy.variants import FP16, INT8

log = logging.getLogger("graft.export")


class ParityFailed(GraftError):
    """ONNX Runtime does not compute what PyTorch computes: the model is not published."""


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    worst_tolerance_ratio: float  # max |diff| / (atol + rtol * |expected|): at most 1 passes
    argmax_agreement: float
    examples: int
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return self.argmax_agreement == 1.0 and self.worst_tolerance_ratio <= 1.0


class LogitsAndFeatures(nn.Module):
    """What the exported graph computes: the model's logits and, beside them, the features its head reads."""

    def __init__(self, model: GraftNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return self.model.head(features), features


def export_onnx(model: GraftNet, path: Path, opset: int, metadata: dict[str, str] | None = None,
                fold_adapter: bool = True) -> Path:
    """Write a single-file ONNX model (outputs: logits, features) with the preprocessing contract and class names
    in its metadata; the checker's full check runs before the file takes its name. `fold_adapter`: the channel
    adapter merged into the first convolution where that is exact (fold_channel_adapter); False keeps the graph as
    PyTorch's exporter writes it (benchmarks/adapter_fold.py compares the two)."""
    model.eval()
    contract = model.spec.contract
    example = torch.zeros(2, *contract.shape)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        logging.getLogger("torch.onnx").setLevel(logging.WARNING)
        torch.onnx.export(
            LogitsAndFeatures(model).eval(), (example,), str(raw), input_names=[contract.input_name],
            output_names=[contract.output_name, contract.features_name], opset_version=opset, dynamo=True,
            external_data=False, dynamic_shapes={"x": {0: "batch"}},
        )
        proto = onnx.load(str(raw))
    if fold_adapter and fold_channel_adapter(proto.graph):
        log.info("the channel adapter is folded into the network's first convolution")
    props = {CONTRACT_KEY: contract.to_json(), CLASSES_KEY: json.dumps(list(model.spec.classes)), **(metadata or {})}
    onnx.helper.set_model_props(proto, props)
    return _save_checked(proto, path)


def fold_channel_adapter(graph: onnx.GraphProto) -> bool:
    """Merge the channel adapter (network.ChannelAdapter: a 1x1 convolution from the target's channels to the
    source's, first in the graph) into the convolution that reads it, where the two are exactly one convolution: the
    backbone's first layer then reads the target's channels itself. A gray target on a 3-channel source otherwise
    pays, at batch 64 on 64 px, for a convolution that copies the image three times and ONNX Runtime's reordering of
    its output: FP32 2-14% and INT8 about 15% of a batch's time (benchmarks/README.md "The channel adapter folded").
    Exact when the adapter adds no offset or the next convolution reads no padding (its zeros would otherwise stand
    for raw pixels that the adapter does not map to zero); otherwise the graph is left as it is. Returns whether it
    folded; the parity check then holds the folded file to PyTorch like any other."""
    adapter = graph.node[0] if graph.node else None
    if adapter is None or adapter.op_type != "Conv" or adapter.input[0] != graph.input[0].name:
        return False
    attributes = _attributes(adapter)
    readers = [node for node in graph.node if adapter.output[0] in node.input]
    if (attributes.get("kernel_shape") != [1, 1] or attributes.get("group", 1) != 1 or any(attributes.get("pads", []))
            or any(s != 1 for s in attributes.get("strides", [1])) or len(readers) != 1 or readers[0].op_type != "Conv"
            or adapter.output[0] in {o.name for o in graph.output}):
        return False
    first = readers[0]
    first_attributes = _attributes(first)
    initializers = {t.name: t for t in graph.initializer}
    if first_attributes.get("group", 1) != 1 or first.input[1] not in initializers or adapter.input[1] not in initializers:
        return False
    mix = numpy_helper.to_array(initializers[adapter.input[1]])[:, :, 0, 0]  # [source channels, target channels]
    offset = _conv_bias(adapter, initializers, mix.shape[0], mix.dtype)
    if offset.any() and (any(first_attributes.get("pads", [])) or first_attributes.get("auto_pad", b"NOTSET") != b"NOTSET"):
        return False
    weight = numpy_helper.to_array(initializers[first.input[1]])  # [out, source channels, kh, kw]
    bias = _conv_bias(first, initializers, weight.shape[0], weight.dtype)
    folded_weight = np.einsum("ocij,ct->otij", weight, mix).astype(weight.dtype)
    folded_bias = (bias + np.einsum("ocij,c->o", weight, offset)).astype(weight.dtype)
    names = (f"{first.input[1]}_folded_adapter", f"{first.input[1]}_folded_adapter_bias")
    graph.initializer.extend([numpy_helper.from_array(folded_weight, names[0]), numpy_helper.from_array(folded_bias, names[1])])
    del first.input[:]
    first.input.extend([adapter.input[0], *names])
    graph.node.remove(adapter)
    for info in [v for v in graph.value_info if v.name == adapter.output[0]]:
        graph.value_info.remove(info)
    still_read = {name for node in graph.node for name in node.input}
    unread = [t for t in graph.initializer if t.name not in still_read]
    for tensor in unread:
        graph.initializer.remove(tensor)
    return True


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv_bias(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], size: int, dtype) -> np.ndarray:
    """A Conv node's bias (its optional third input), zeros where it has none."""
    if len(node.input) > 2 and node.input[2]:
        return numpy_helper.to_array(initializers[node.input[2]])
    return np.zeros(size, dtype)


def cpu_session(path: Path, entries: dict[str, str] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session whose threads sleep between runs instead of spinning: the export holds several
    files' sessions open and times them in turns, and a session's spinning threads would take the cores from the
    next one's run (FP32 measured 77-90 ms in turns, not 23-27: benchmarks/README.md "INT8 recipes")."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Session config `entries`; by default an INT8 file is scored as it specifies, as the server runs it.
    for key, value in (exact_int8_entries() if entries is None else entries).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(model: GraftNet, onnx_path: Path, x: np.ndarray, atol: float, rtol: float, batch_size: int = 256) -> Parity:
    contract = model.spec.contract
    expected = predict_logits(model, x, Normalizer.of(contract)).numpy()
    session = cpu_session(onnx_path)
    got = np.concatenate([
        session.run([contract.output_name], {contract.input_name: contract.normalize(x[i : i + batch_size])})[0]
        for i in range(0, len(x), batch_size)
    ])
    difference = np.abs(got - expected)
    return Parity(
        max_abs_diff=float(difference.max()),
        worst_tolerance_ratio=float((difference / (atol + rtol * np.abs(expected))).max()),
        argmax_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
        examples=len(x),
        atol=atol,
        rtol=rtol,
    )


def read_metadata(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}


def drift_reference(path: Path, contract: Contract, pixels: np.ndarray, prior: np.ndarray,
                    batch_size: int = 256) -> DriftReference:
    """The file's own features, predicted classes and confidences on `pixels` (uint8 in-distribution images),
    with the training labels' class shares `prior`."""
    session = cpu_session(path)
    outputs = [session.run([contract.output_name, contract.features_name],
                           {contract.input_name: contract.normalize(pixels[i : i + batch_size])})
               for i in range(0, len(pixels), batch_size)]
    logits, features = (np.concatenate(column) for column in zip(*outputs))
    return DriftReference.of_outputs(features, torch.softmax(torch.from_numpy(logits), 1).numpy(), prior)


def add_drift_reference(path: Path, contract: Contract, pixels: np.ndarray, prior: np.ndarray) -> DriftReference:
    """Compute the file's drift reference and store it in its metadata (the file is replaced atomically)."""
    reference = drift_reference(path, contract, pixels, prior)
    proto = onnx.load(str(path))
    metadata = {prop.key: prop.value for prop in proto.metadata_props} | {DRIFT_REFERENCE_KEY: reference.encode()}
    onnx.helper.set_model_props(proto, metadata)
    _save_checked(proto, path)
    return reference


def interleaved_median_ms(runs: list[Callable[[np.ndarray], object]], batch: np.ndarray, repeats: int) -> list[float]:
    """Each run's median time on `batch`, in ms, timed in turns (one call of each, `repeats` times over): a change
    in the machine's speed while they are timed (another process, a frequency step) lands on every run alike,
    instead of on whichever was being timed then, so their ratios hold from one measurement to the next."""
    for run in runs:
        run(batch)  # warm-up: the first call allocates
    timings = [[] for _ in runs]
    for _ in range(repeats):
        for run, times in zip(runs, timings):
            started = time.perf_counter()
            run(batch)
            times.append((time.perf_counter() - started) * 1000)
    return [float(np.median(times)) for times in timings]


def _save_checked(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp_path:
        onnx.save(proto, str(tmp_path))
    return path


@dataclass(frozen=True)
class Int8Recipe:
    """One way to quantize to INT8 with ONNX Runtime: its format (qdq: QuantizeLinear/DequantizeLinear pairs the CPU
    provider fuses into integer kernels; qoperator: QLinearConv and kin written out), weights per output channel or
    per tensor, how activation ranges are read from the calibration images (percentile: the range holding that share
    of the values seen, robust to rare outliers; minmax; entropy), and the layers left in float: the first
    `float_convs` convolutions in graph order (the early layers, which see the least processed values, are the ones
    INT8 hurts most: benchmarks/README.md "INT8 recipes") and the classifier."""

    format: str = "qdq"
    per_channel: bool = True
    calibration: str = "percentile"
    float_convs: int = 1
    float_classifier: bool = True

    @property
    def name(self) -> str:
        kept = [f"first {self.float_convs} conv{'s' if self.float_convs > 1 else ''}"] if self.float_convs else []
        kept += ["classifier"] if self.float_classifier else []
        return (f"{self.format} {'per-channel' if self.per_channel else 'per-tensor'} {self.calibration} "
                f"float:{'+'.join(kept) or 'none'}")


def quantize_int8(fp32_path: Path, path: Path, calibration: np.ndarray, recipe: Int8Recipe, percentile: float,
                  batch_size: int = 20, ranges_cache: Path | None = None) -> Path:
    """Static INT8 quantization by `recipe`: activations asymmetric uint8 and weights int8 (the u8s8 kernels of VNNI
    and AMX), activation ranges from `calibration` (normalised images). Both outputs stay float32 graph outputs of the
    same names (tests/test_export.py checks it). `ranges_cache`: ONNX Runtime's calibration cache, read when the file
    exists and written otherwise: the activation ranges depend only on the FP32 file, the images and the calibration
    method, so recipes that differ in anything else share them (half of a recipe's time on the default model)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    contract_input = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    # Equal batches: the calibrator stacks each tensor's batches into one array.
    batch_size = min(batch_size, len(calibration))
    batches = [calibration[i : i + batch_size] for i in range(0, len(calibration) // batch_size * batch_size, batch_size)]

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._left = iter(batches)

        def get_next(self):
            batch = next(self._left, None)
            return None if batch is None else {contract_input: batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        in_float = [n.name for n in graph.node if n.op_type == "Conv"][: recipe.float_convs]
        in_float += [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")][-1:] if recipe.float_classifier else []
        quantize_static(str(prepared), str(quantized), Batches(),
                        quant_format={"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[recipe.format],
                        per_channel=recipe.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=in_float,
                        calibrate_method={"percentile": CalibrationMethod.Percentile, "minmax": CalibrationMethod.MinMax,
                                          "entropy": CalibrationMethod.Entropy}[recipe.calibration],
                        extra_options={"CalibPercentile": percentile}, calibration_cache_path=ranges_cache)
        return _save_checked(onnx.load(str(quantized)), path)


def convert_fp16(fp32_path: Path, path: Path) -> Path:
    """Weights and arithmetic in FP16, inputs and outputs still FP32 (the contract and the V2 API are unchanged)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    _sort_topologically(proto.graph)  # the converter appends the input casts after the nodes that read them
    return _save_checked(proto, path)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in known for name in n.input)]
        if not ready:
            raise ValueError("the graph has a cycle or reads a tensor no node writes")
        for node in ready:
            known.update(node.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def build_variant(variant: str, fp32_path: Path, path: Path, calibration: np.ndarray, recipe: Int8Recipe,
                  percentile: float) -> Path:
    if variant == INT8:
        return quantize_int8(fp32_path, path, calibration, recipe, percentile)
    if variant == FP16:
        return convert_fp16(fp32_path, path)
    raise ValueError(f"no builder for variant {variant!r}")


@dataclass(frozen=True)
class VariantScore:
    """One ONNX file on the test split, run by ONNX Runtime on CPU."""

    accuracy: float
    latency_ms_batch1: float
    latency_ms_batch64: float
    onnx_bytes: int


def logits_runs(paths: list[Path], contract: Contract) -> list[Callable[[np.ndarray], np.ndarray]]:
    """For each file, a fresh CPU session (cpu_session) as a call from a normalised batch to its logits."""
    sessions = [cpu_session(path) for path in paths]
    return [lambda batch, session=session: session.run([contract.output_name], {contract.input_name: batch})[0]
            for session in sessions]


def score_onnx(paths: list[Path], contract: Contract, x: np.ndarray, y: np.ndarray,
               batch_size: int = 256) -> list[VariantScore]:
    """Each file's accuracy on `x`, `y` and its latency at batch 1 and 64, the files timed in turns
    (interleaved_median_ms): what their speeds are compared on."""
    runs = logits_runs(paths, contract)
    normalised = contract.normalize(x)
    accuracies = [float((np.concatenate([run(normalised[i : i + batch_size]).argmax(1)
                                          for i in range(0, len(normalised), batch_size)]) == y).mean())
                  for run in runs]
    batch1 = interleaved_median_ms(runs, normalised[:1], 30)
    batch64 = interleaved_median_ms(runs, normalised[np.resize(np.arange(len(normalised)), 64)], 10)
    return [VariantScore(*score, path.stat().st_size) for path, *score in zip(paths, accuracies, batch1, batch64)]


def within_drop(reference: float, accuracy: float, max_drop: float) -> bool:
    """`accuracy` at most `max_drop` below `reference`. Both are shares of the same images, so their difference is
    rounded (to 9 decimals) before it is compared: 0.8805 - 0.8755, ten images in 2,000 and exactly a 0.005 bound,
    is 0.0050000000000000044 in floating point, and would fail the bound it meets."""
    return round(reference - accuracy, 9) <= max_drop


def kept_recipe(records: list[dict], same_speed_within: float) -> int:
    """Which of the recipes tried `search_int8` keeps (its index): of those within the accuracy bound (none within:
    the most accurate), the fastest at batch 64, where every recipe at most `same_speed_within` (a share) slower
    than the fastest counts as fast as it: the most accurate of those, then the first listed. Two recipes a few per
    cent apart swap places from one measurement to the next on a busy CPU; this way that noise does not decide which
    file ships: the same model and params give the same INT8 file and test accuracy from run to run, unless two
    recipes' speeds differ by about the margin itself (or a machine busy with other work spreads them past it)."""
    pool = [i for i, record in enumerate(records) if record["within_bound"]]
    if not pool:
        best = max(record["val_accuracy"] for record in records)
        pool = [i for i, record in enumerate(records) if record["val_accuracy"] == best]
    fastest = min(records[i]["latency_ms_batch64"] for i in pool)
    as_fast = [i for i in pool if records[i]["latency_ms_batch64"] <= fastest * (1 + same_speed_within)]
    return max(as_fast, key=lambda i: (records[i]["val_accuracy"], -i))


def search_int8(fp32_path: Path, path: Path, calibration: np.ndarray, recipes: list[Int8Recipe], percentile: float,
                contract: Contract, x_val: np.ndarray, y_val: np.ndarray,
                max_drop: float, same_speed_within: float) -> tuple[VariantScore, list[dict]]:
    """Quantize by each recipe and score the files beside FP32's, timed in turns (score_onnx), on the validation split
    (never test: the test split then measures the one kept, as it does every variant); keep, at `path`, the one
    `kept_recipe` says: the fastest at batch 64 (within `same_speed_within`) among those within `max_drop` of FP32's
    validation accuracy (none within: the most accurate, for the test split's bound to judge; a validation split of a
    few hundred images moves in steps of several tenths of a point). Returns FP32's score on the validation split, which
    every recipe is held to, and every recipe's accuracy, speed and time to quantize, the one kept marked."""
    with tempfile.TemporaryDirectory() as tmp:
        candidates, seconds = [], []
        for number, recipe in enumerate(recipes):
            candidates.append(Path(tmp) / f"int8-{number}.onnx")
            started = time.perf_counter()
            quantize_int8(fp32_path, candidates[-1], calibration, recipe, percentile,
                          ranges_cache=Path(tmp) / f"ranges-{recipe.calibration}.json")
            seconds.append(time.perf_counter() - started)
        fp32, *scores = score_onnx([fp32_path, *candidates], contract, x_val, y_val)
        records = []
        for recipe, score, quantize_seconds in zip(recipes, scores, seconds):
            log.info("INT8 recipe %s: val accuracy %.4f (FP32 %.4f), batch 64 %.2f ms (FP32 %.2f ms)", recipe.name,
                     score.accuracy, fp32.accuracy, score.latency_ms_batch64, fp32.latency_ms_batch64)
            records.append({
                "recipe": recipe.name, **asdict(recipe), "val_accuracy": score.accuracy,
                "val_accuracy_drop": fp32.accuracy - score.accuracy, "latency_ms_batch1": score.latency_ms_batch1,
                "latency_ms_batch64": score.latency_ms_batch64, "speedup_batch64_cpu": fp32.latency_ms_batch64 /
                score.latency_ms_batch64, "onnx_bytes": score.onnx_bytes, "quantize_seconds": quantize_seconds,
                "within_bound": within_drop(fp32.accuracy, score.accuracy, max_drop), "kept": False})
        # Without 8-bit dot products the files ran unfused (deploy/cpu.py): their times here say nothing of a CPU
        # that serves INT8, so the most accurate within the bound is kept (a tie: the first, the fewest in float).
        kept = kept_recipe(records, same_speed_within if has_int8_dot() else math.inf)
        records[kept]["kept"] = True
        with atomic_path(path) as tmp_path:
            shutil.copyfile(candidates[kept], tmp_path)
    return fp32, records
