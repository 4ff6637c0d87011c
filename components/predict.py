"""A trained network's answers on prepared images: logits, features and classes, normalised under its own contract
as the server normalises a request (deploy/contract.py)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from components.compute import resolve_compute
from components.config import ComputeParams
from components.network import GraftNet
from deploy.contract import Contract

# Images a forward pass when predicting: the fastest measured on the CPU (EfficientNet-Lite0, 2000 64-px test images,
# Intel Xeon, 2 cores, channels-last: 1.75 s at 64, 1.85 s at 32, 2.06 s at 128, 3.8 s at 512; benchmarks/README.md).
PREDICT_BATCH = 64


@dataclass(frozen=True)
class Normalizer:
    """The contract's scaling and normalisation, on torch tensors."""

    scale: float
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, contract: Contract) -> Normalizer:
        return cls(contract.scale, torch.tensor(contract.mean).view(1, -1, 1, 1), torch.tensor(contract.std).view(1, -1, 1, 1))

    def scaled(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 in the contract's pixel scale (what augmentation works on)."""
        return pixels.float() * self.scale

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W), or already scaled floats -> normalised float32."""
        if pixels.dtype == torch.uint8:
            pixels = self.scaled(pixels)
        return (pixels - self.mean) / self.std


def _batches(model: nn.Module, x: np.ndarray, normalize: Normalizer, batch_size: int):
    """Normalised fp32 batches of x on the model's device."""
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        yield normalize(torch.from_numpy(x[i : i + batch_size])).to(device)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, normalize: Normalizer, batch_size: int = PREDICT_BATCH) -> torch.Tensor:
    """fp32 logits on the CPU, whatever device the model is on."""
    model.eval()
    chunks = [model(batch).cpu() for batch in _batches(model, x, normalize, batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0)


@torch.no_grad()
def predict_features(model: GraftNet, x: np.ndarray, normalize: Normalizer, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """The backbone's output (what the head sees), in eval mode, float32 (N, D)."""
    model.eval()
    return torch.cat([model.features(batch).flatten(1).cpu() for batch in _batches(model, x, normalize, batch_size)]).numpy()


def for_inference(model: GraftNet, compute: ComputeParams) -> GraftNet:
    """A trained model, read back by a stage that only predicts with it (calibrate, evaluate, export's parity), in
    eval mode in the memory layout the training ran in (compute.channels_last: EfficientNet-Lite0 on 2000 test images
    1.75 s channels-last against 2.8 s NCHW in fp32, the same logits within 3e-5)."""
    return model.to(memory_format=resolve_compute(compute, model).memory_format).eval()


def predict_classes(model: GraftNet, x: np.ndarray) -> np.ndarray:
    return predict_logits(model, x, Normalizer.of(model.spec.contract)).argmax(1).numpy()
