"""Where and in what precision the one training loop runs: chosen from this machine, said at the start of a run.

`compute.precision: auto` takes bf16 autocast where the hardware has bf16 arithmetic (a CUDA GPU that supports
it; a CPU with AMX or AVX-512 BF16, where oneDNN's kernels make a training step of Graft's ResNet 2.2x and
resnet18 1.4x faster) and fp32 elsewhere: on a CPU without those units bf16 is emulated and measured 7-12x slower.
One exception, measured: networks built on depthwise convolutions (EfficientNet, MobileNet) train slower in bf16
on the CPU (EfficientNet-Lite0: 0.66x of fp32 channels-last), so auto keeps them in fp32 there
(benchmarks/README.md, ../shared/STACK.md). fp16 needs a CUDA GPU and gets a gradient scaler. Parameters, optimizer state and
checkpoints stay fp32 in every mode (autocast casts per operation), and evaluation runs in fp32.
"""
from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from components.config import ComputeParams
from components.errors import GraftError
from deploy.cpu import cpu_flags

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class ComputeError(GraftError, ValueError):
    """The compute params ask for hardware this machine does not have."""


@dataclass(frozen=True)
class Compute:
    device: str           # cpu | cuda
    precision: str        # fp32 | bf16 | fp16 (autocast)
    channels_last: bool
    reason: str = ""      # why this choice, for the run's first line
    compile: bool = False  # torch.compile the backbone

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=AUTOCAST_DTYPES[self.precision])

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """A batch to the training device in its layout; on CUDA through pinned memory, the copy asynchronous."""
        if self.device == "cuda":
            images = images.pin_memory()
        return images.to(self.device, memory_format=self.memory_format, non_blocking=True)

    def describe(self) -> str:
        layout = "channels-last" if self.channels_last else "NCHW"
        compiled = ", torch.compile" if self.compile else ""
        return f"{self.device}, {self.precision}{' autocast' if self.precision != 'fp32' else ''}, {layout}{compiled} ({self.reason})"

    def to_dict(self) -> dict:
        return {"device": self.device, "precision": self.precision, "channels_last": self.channels_last,
                "compile": self.compile}

    def features(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The backbone's forward as the loop calls it: compiled by TorchInductor when asked (the parameters and
        the checkpoint stay the model's own: only the call is compiled)."""
        return torch.compile(model.features, dynamic=False) if self.compile else model.features


CHANNELS_LAST_BY_DEFAULT = True  # measured faster on both CPUs seen (benchmarks/README.md) and the norm on GPUs
FP32_CPU = Compute("cpu", "fp32", False, "not configured: the plain default")


def depthwise_share(model: nn.Module) -> float:
    """The share of a network's convolutions that are depthwise (one group a channel)."""
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [m for m in convolutions if m.groups > 1 and m.groups == m.in_channels]
    return len(depthwise) / len(convolutions) if convolutions else 0.0


def resolve_compute(params: ComputeParams, model: nn.Module | None = None, cuda: bool | None = None,
                    cuda_bf16: bool | None = None, flags: set[str] | None = None) -> Compute:
    """The device, precision and memory layout `params` ask for, for `model` on this machine (`cuda`, `cuda_bf16`
    and `flags`: what the machine has, read here unless given)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    flags = cpu_flags() if flags is None else flags
    device = params.device if params.device != "auto" else ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        raise ComputeError("compute.device is cuda, but torch sees no CUDA GPU on this machine "
                           "(torch.cuda.is_available() is False); set compute.device: auto or cpu")
    bf16_units = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if device == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        precision = params.precision if params.precision != "auto" else ("bf16" if bf16_ok else "fp16")
        reason = "bf16 arithmetic on this GPU" if precision == "bf16" else "fp16 with a gradient scaler" if precision == "fp16" else "asked for"
    else:
        if params.precision == "fp16":
            raise ComputeError("compute.precision fp16 needs a CUDA GPU (a CPU has no fast fp16 training kernels); "
                               "use bf16 (on a CPU with AMX or AVX-512 BF16) or fp32")
        depthwise = depthwise_share(model) if model is not None else 0.0
        if params.precision == "auto":
            precision = "bf16" if bf16_units and depthwise < 0.2 else "fp32"
            reason = (f"this CPU has {' and '.join(bf16_units)}" if precision == "bf16" else
                      f"{100 * depthwise:.0f}% of this network's convolutions are depthwise: slower in bf16 on a CPU"
                      if bf16_units else "this CPU has no AMX / AVX-512 BF16: bf16 would be emulated, 7-12x slower")
        else:
            precision = params.precision
            reason = "asked for" + ("" if precision != "bf16" or bf16_units else
                                    "; this CPU has no AMX / AVX-512 BF16, so bf16 is emulated and slow")
    channels_last = params.channels_last == "on" or (params.channels_last == "auto" and CHANNELS_LAST_BY_DEFAULT)
    if params.compile and device == "cpu" and not shutil.which("c++"):
        raise ComputeError("compute.compile: true needs a C++ compiler on a CPU (TorchInductor builds its kernels with "
                           "c++); install one (Debian: apt-get install g++) or set compute.compile: false")
    return Compute(device, precision, channels_last, reason, params.compile)
