"""Load an exported Graft model for serving: ONNX Runtime, the model's own metadata, nothing from training.

This module must not import torch or anything in components/: the serving image stays small and starts fast.

A Graft model file has two outputs, the logits and the penultimate features, and stores a drift reference
(deploy/drift.py): `run` gives logits (gates, warm-up), `run_served` both, for the server's drift monitor. A file
exported before the features output loads and serves as before, without drift measurement.

Providers are chosen deliberately, in the order TensorRT (FP16, engine cache on disk), CUDA, CPU. A GPU provider
is asked for only when it can load here (its library and the CUDA libraries it needs open, and a GPU is present):
ONNX Runtime would otherwise print a screen of red library errors and fall back to CPU. `auto` means every
provider that can load, fastest first. What runs, and why, is said in one line (`LoadedModel.provider_note`), and
the provider that really runs is read back from the session; `strict` refuses to serve on CPU when a GPU provider
was asked for.
"""
from __future__ import annotations

import ctypes
import io
import json
import os
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

from deploy.contract import Contract, ContractError
from deploy.cpu import exact_int8_entries
from deploy.drift import DriftReference, DriftReferenceError
from deploy.tags import CLASSES_KEY, CONTRACT_KEY, DRIFT_REFERENCE_KEY
from deploy.settings import GPU_PROVIDERS, PROVIDER_NAMES, default_cache_dir  # stated there: no ONNX Runtime
from deploy.variants import AUTO, FP32


class ModelLoadError(RuntimeError):
    pass


class ProviderError(ModelLoadError):
    """strict serving asked for a GPU provider and ONNX Runtime could only run on CPU."""


class InputError(ValueError):
    """A request's image or tensor cannot be used; the message says why and what is expected."""


class PayloadTooLarge(InputError):
    pass


def _gpu_present() -> str | None:
    """None when the CUDA driver finds a GPU; otherwise why not."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver (libcuda.so.1)"
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "the CUDA driver finds no GPU"
    return None


@cache
def gpu_provider_blockers() -> dict[str, str]:
    """Why each GPU provider of this ONNX Runtime build cannot load in this process (absent: it can).

    ONNX Runtime opens a provider's library only when a session asks for it; opening it here first, the same way,
    tells whether the CUDA / cuDNN / TensorRT libraries it needs are on the loader's path."""
    blockers = {}
    built = set(ort.get_available_providers())
    no_gpu = _gpu_present()
    capi = Path(ort.__file__).parent / "capi"
    try:  # every provider library needs this one's symbols, loaded globally as ONNX Runtime does
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=os.RTLD_GLOBAL)
    except OSError as error:
        no_gpu = no_gpu or str(error)
    for name in ("tensorrt", "cuda"):
        if PROVIDER_NAMES[name] not in built:
            blockers[name] = "not in this ONNX Runtime build (install onnxruntime-gpu)"
            continue
        try:
            ctypes.CDLL(str(capi / f"libonnxruntime_providers_{name}.so"), mode=os.RTLD_LAZY)
        except OSError as error:
            blockers[name] = str(error).split(":")[0] + " is missing"
            continue
        if no_gpu:
            blockers[name] = no_gpu
    return blockers


@dataclass(frozen=True)
class ProviderPlan:
    requested: tuple[str, ...]  # what was asked for, `auto` expanded, as ONNX Runtime names
    providers: list  # those that can load here: names or (name, options) pairs, in ONNX Runtime's format
    skipped: dict[str, str]  # a requested provider that cannot load here -> why

    @property
    def runnable(self) -> list[str]:
        return [p[0] if isinstance(p, tuple) else p for p in self.providers]

    def why(self) -> str:
        return "; ".join(f"{name}: {reason}" for name, reason in self.skipped.items())

    def note(self, active: tuple[str, ...]) -> str:
        """What runs, and why, in one line."""
        dropped = [p for p in self.runnable if p not in active]
        reasons = [self.why()] if self.skipped else []
        reasons += [f"{name} failed to initialise" for name in dropped]
        return f"ONNX Runtime runs on {active[0]}" + (f" ({'; '.join(reasons)})" if reasons else "")


def plan_providers(preference: list[str], cache_dir: Path) -> ProviderPlan:
    """Map `auto` or `tensorrt,cuda,cpu` to the ONNX Runtime providers that can load here, with their options;
    unknown names are an error."""
    unknown = [p for p in preference if p not in PROVIDER_NAMES and p != AUTO]
    if unknown or not preference:
        raise ModelLoadError(f"unknown execution provider(s) {unknown or preference}; allowed: "
                             f"{', '.join([AUTO, *PROVIDER_NAMES])}")
    names = [n for p in preference for n in (PROVIDER_NAMES if p == AUTO else [p])]
    names = list(dict.fromkeys(names))  # `auto` beside explicit names: each once, first mention wins
    blockers = gpu_provider_blockers()
    providers: list = []
    for name in names:
        if name in blockers:
            continue
        if name == "tensorrt":
            providers.append((PROVIDER_NAMES[name], {
                "trt_fp16_enable": True,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir / "tensorrt"),
                "trt_timing_cache_enable": True,
            }))
        elif name == "cuda":
            providers.append((PROVIDER_NAMES[name], {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}))
        else:
            providers.append(PROVIDER_NAMES[name])
    return ProviderPlan(tuple(PROVIDER_NAMES[n] for n in names), providers,
                        {n: blockers[n] for n in names if n in blockers})


def planned_provider(providers: list[str], cache_dir: Path) -> str:
    """The provider a session asked for `providers` will try first: what the export variant is chosen for."""
    runnable = plan_providers(providers, cache_dir).runnable
    return runnable[0] if runnable else PROVIDER_NAMES["cpu"]


@dataclass
class LoadedModel:
    session: ort.InferenceSession
    contract: Contract
    classes: tuple[str, ...]
    metadata: dict[str, str]
    requested_providers: tuple[str, ...]
    active_providers: tuple[str, ...]
    provider_note: str  # what runs, and why, in one line
    path: Path
    size_bytes: int
    load_seconds: float
    info: dict = field(default_factory=dict)
    variant: str = FP32
    variant_note: str = ""  # which export variant runs, and why
    has_features: bool = False  # the file has the contract's features output (files exported before it do not)
    drift_reference: DriftReference | None = None  # what served features are tested against; None: no drift test

    @property
    def provider(self) -> str:
        """The provider that runs the model: the first one the session kept."""
        return self.active_providers[0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits only."""
        return self.session.run([self.contract.output_name], {self.contract.input_name: batch})[0]

    def run_served(self, batch: np.ndarray) -> np.ndarray:
        """Logits and features side by side in one float32 array, one row an input (a batcher splits its rows as
        it splits logits); split() takes them apart. Logits alone when the file has no features output."""
        if not self.has_features:
            return self.run(batch)
        names = [self.contract.output_name, self.contract.features_name]
        return np.concatenate(self.session.run(names, {self.contract.input_name: batch}), axis=1, dtype=np.float32)

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """run_served's rows -> (logits, features or None)."""
        classes = len(self.classes)
        return rows[:, :classes], (rows[:, classes:] if self.has_features else None)


def engine_cache(cache_dir: str | Path | None) -> Path:
    """The cache folder (TensorRT engines go in its tensorrt/ subfolder): `cache_dir`, else $GRAFT_CACHE_DIR,
    else ~/.cache/graft."""
    return Path(cache_dir or default_cache_dir())


def load_model(path: str | Path, providers: list[str] | None = None, strict: bool = False,
               cache_dir: str | Path | None = None, threads: int = 0) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such ONNX file")
    started = time.perf_counter()
    cache = engine_cache(cache_dir)
    plan = plan_providers(providers or [AUTO], cache)
    asked_gpu = any(p in GPU_PROVIDERS for p in plan.requested)
    if strict and asked_gpu and not any(p in GPU_PROVIDERS for p in plan.runnable):
        raise ProviderError(f"asked for {list(plan.requested)} in strict mode, but no GPU provider can load here "
                            f"({plan.why()}). Fix the GPU set-up, or allow CPU serving (strict off).")
    if not plan.providers:
        raise ModelLoadError(f"none of {list(plan.requested)} can load here ({plan.why()}); add cpu to the providers")
    if "TensorrtExecutionProvider" in plan.runnable:
        (cache / "tensorrt").mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # a provider that fails at session creation is reported below, by name
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    for key, value in exact_int8_entries().items():  # an INT8 file answers what it specifies on any CPU
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(str(path), options, providers=plan.providers)
    except Exception as error:  # onnxruntime raises its own untyped errors for bad files
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {error}") from None
    active = tuple(session.get_providers())
    if strict and asked_gpu and not any(p in GPU_PROVIDERS for p in active):
        raise ProviderError(
            f"asked for {list(plan.requested)} but ONNX Runtime runs this model on {list(active)}: the GPU provider "
            "failed to initialise. Fix the GPU set-up, or allow CPU serving (strict off)."
        )
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    contract = read_contract(metadata)
    classes = tuple(json.loads(metadata[CLASSES_KEY]))
    features = next((o for o in session.get_outputs() if o.name == contract.features_name), None)
    return LoadedModel(
        session=session, contract=contract, classes=classes, metadata=metadata,
        requested_providers=plan.requested, active_providers=active, provider_note=plan.note(active), path=path,
        size_bytes=path.stat().st_size, load_seconds=time.perf_counter() - started, has_features=features is not None,
        drift_reference=read_drift_reference(metadata, len(classes), features.shape[-1]) if features else None,
    )


def read_drift_reference(metadata: dict[str, str], classes: int, dimensions: int | str) -> DriftReference | None:
    """The drift reference export stored with the file, checked against the model's outputs (`dimensions`: the
    features output's last axis, a name when the file leaves it symbolic); None when the file has none."""
    if DRIFT_REFERENCE_KEY not in metadata:
        return None
    try:
        reference = DriftReference.decode(metadata[DRIFT_REFERENCE_KEY])
    except DriftReferenceError as error:
        raise ModelLoadError(f"the model's {DRIFT_REFERENCE_KEY!r} metadata is unusable: {error}") from None
    if reference.classes != classes or (isinstance(dimensions, int) and reference.dimensions != dimensions):
        raise ModelLoadError(f"the model's {DRIFT_REFERENCE_KEY!r} holds {reference.classes} classes and "
                             f"{reference.dimensions} features, the model {classes} and {dimensions}; export it again")
    return reference


def read_contract(metadata: dict[str, str]) -> Contract:
    """The preprocessing contract export wrote into the model's metadata."""
    if CONTRACT_KEY not in metadata or CLASSES_KEY not in metadata:
        raise ModelLoadError(f"the ONNX model has no {CONTRACT_KEY!r}/{CLASSES_KEY!r} metadata: it was not exported by Graft")
    try:
        return Contract.from_dict(json.loads(metadata[CONTRACT_KEY]))
    except (ValueError, KeyError, TypeError, ContractError) as error:
        raise ModelLoadError(f"the model's {CONTRACT_KEY!r} metadata is unusable: {error}") from None


def declared_pixels(blob: bytes) -> int:
    """Width x height as the image file's header states them (nothing decoded); 0 when it has no readable header.
    What decoding will cost follows the pixels, not the file's size: a small PNG can hold 27 million pixels."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            return image.width * image.height
    except Exception:  # whatever PIL makes of a bad header, decode_image says it properly
        return 0


def decode_image(blob: bytes, contract: Contract, max_pixels: int = 40_000_000) -> np.ndarray:
    """Image file bytes -> uint8 (C, H, W) per the contract: the same conversion as training's prepare step."""
    if not blob:
        raise InputError("empty image body; send the bytes of a PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(blob)) as image:
            if image.width * image.height > max_pixels:
                raise PayloadTooLarge(f"image is {image.width}x{image.height}; at most {max_pixels} pixels are accepted")
            image.load()
            return contract.pixels(image)
    except UnidentifiedImageError:
        raise InputError("not an image file that can be decoded; use a PNG or JPEG file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"the image cannot be decoded ({error}); it may be truncated or corrupt") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
