"""Load an exported Graft model for serving: ONNX Runtime, the model's own metadata, nothing from training.

This module must not import torch or anything in components/: the serving image stays small and starts fast.

Providers are chosen deliberately, in the order TensorRT (FP16, engine cache on disk), CUDA, CPU, and the
provider that really runs is read back from the session: ONNX Runtime falls back to CPU silently when the
GPU libraries are missing, so `strict` refuses to serve on CPU when a GPU provider was asked for.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

from deploy.contract import CLASSES_KEY, CONTRACT_KEY, Contract, ContractError

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}


class ModelLoadError(RuntimeError):
    pass


class ProviderError(ModelLoadError):
    """strict serving asked for a GPU provider and ONNX Runtime could only run on CPU."""


class InputError(ValueError):
    """A request's image or tensor cannot be used; the message says why and what is expected."""


class PayloadTooLarge(InputError):
    pass


@dataclass(frozen=True)
class ProviderPlan:
    requested: tuple[str, ...]
    providers: list  # names or (name, options) pairs, in ONNX Runtime's format


def plan_providers(preference: list[str], cache_dir: Path) -> ProviderPlan:
    """Map `tensorrt,cuda,cpu` to ONNX Runtime providers with their options; unknown names are an error."""
    unknown = [p for p in preference if p not in PROVIDER_NAMES]
    if unknown or not preference:
        raise ModelLoadError(f"unknown execution provider(s) {unknown or preference}; allowed: {', '.join(PROVIDER_NAMES)}")
    providers: list = []
    for name in preference:
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
    return ProviderPlan(tuple(PROVIDER_NAMES[p] for p in preference), providers)


@dataclass
class LoadedModel:
    session: ort.InferenceSession
    contract: Contract
    classes: tuple[str, ...]
    metadata: dict[str, str]
    requested_providers: tuple[str, ...]
    active_providers: tuple[str, ...]
    path: Path
    size_bytes: int
    load_seconds: float
    info: dict = field(default_factory=dict)

    @property
    def provider(self) -> str:
        """The provider that runs the model: the first one the session kept."""
        return self.active_providers[0]

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.contract.output_name], {self.contract.input_name: batch})[0]


def load_model(path: str | Path, providers: list[str] | None = None, strict: bool = False,
               cache_dir: str | Path | None = None, threads: int = 0) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such ONNX file")
    started = time.perf_counter()
    cache = Path(cache_dir or os.environ.get("GRAFT_ENGINE_CACHE", Path.home() / ".cache" / "graft"))
    plan = plan_providers(providers or ["tensorrt", "cuda", "cpu"], cache)
    if any(isinstance(p, tuple) and p[0] == "TensorrtExecutionProvider" for p in plan.providers):
        (cache / "tensorrt").mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the fallback is reported below, by name, not as a C++ stack dump
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    available = set(ort.get_available_providers())
    usable = [p for p in plan.providers if (p[0] if isinstance(p, tuple) else p) in available]
    if not usable:
        raise ModelLoadError(f"none of {list(plan.requested)} is available in this ONNX Runtime build ({sorted(available)})")
    try:
        session = ort.InferenceSession(str(path), options, providers=usable)
    except Exception as error:  # onnxruntime raises its own untyped errors for bad files
        raise ModelLoadError(f"{path}: ONNX Runtime cannot load it: {error}") from None
    active = tuple(session.get_providers())
    asked_gpu = any(p in GPU_PROVIDERS for p in plan.requested)
    if strict and asked_gpu and not any(p in GPU_PROVIDERS for p in active):
        raise ProviderError(
            f"asked for {list(plan.requested)} but ONNX Runtime runs this model on {list(active)}: the GPU provider "
            "failed to initialise (missing CUDA/cuDNN/TensorRT libraries or no GPU). Fix the GPU set-up, or allow CPU "
            "serving (strict off, or providers=cpu)."
        )
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    contract = read_contract(metadata)
    return LoadedModel(
        session=session, contract=contract, classes=tuple(json.loads(metadata[CLASSES_KEY])), metadata=metadata,
        requested_providers=plan.requested, active_providers=active, path=path, size_bytes=path.stat().st_size,
        load_seconds=time.perf_counter() - started,
    )


def read_contract(metadata: dict[str, str]) -> Contract:
    """The preprocessing contract export wrote into the model's metadata."""
    if CONTRACT_KEY not in metadata or CLASSES_KEY not in metadata:
        raise ModelLoadError(f"the ONNX model has no {CONTRACT_KEY!r}/{CLASSES_KEY!r} metadata: it was not exported by Graft")
    try:
        return Contract.from_dict(json.loads(metadata[CONTRACT_KEY]))
    except (ValueError, KeyError, TypeError, ContractError) as error:
        raise ModelLoadError(f"the model's {CONTRACT_KEY!r} metadata is unusable: {error}") from None


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
        raise InputError("the body is not an image file ONNX serving can decode; send PNG or JPEG bytes") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"the image cannot be decoded ({error}); it may be truncated or corrupt") from None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
