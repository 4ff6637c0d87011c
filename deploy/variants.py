"""Export variants of one model: the FP32 ONNX file, an INT8 file (static quantization, for CPUs) and an FP16 file
(for CUDA). Stated once, here, for export, publishing and the server (no torch).

A variant lives beside its model at `variants/model.<name>.onnx`, in the project (models/) and in the registry
(the registered model's artifact folder); its registered sha256 is the tag `graft.onnx.<name>.sha256`. Export
writes a variant only when it scored within `export.max_accuracy_drop` of FP32, so a variant that exists was
published.
"""
from __future__ import annotations

from pathlib import Path

from deploy.cpu import INT8_DOT_FLAGS, has_int8_dot
from deploy.tags import ONNX_SHA_TAG

FP32, INT8, FP16 = "fp32", "int8", "fp16"
VARIANTS = (FP32, INT8, FP16)
AUTO = "auto"  # the one `auto`: the provider's best variant; for providers (deploy/settings.py), every one that loads
VARIANT_DIR = "variants"
ONNX_FILE = "model.onnx"
# What each execution provider runs best, in order of preference: INT8 kernels (VNNI/AMX) on CPU, FP16 on CUDA.
# TensorRT builds its own FP16 engine from the FP32 graph (trt_fp16_enable): it takes the FP32 file. On a CPU
# without 8-bit dot-product instructions (deploy/cpu.py INT8_DOT_FLAGS) an INT8 file runs unfused, slower than FP32,
# so the CPU's preference there is FP32.
PREFERENCE = {
    "CPUExecutionProvider": (INT8, FP32),
    "CUDAExecutionProvider": (FP16, FP32),
    "TensorrtExecutionProvider": (FP32,),
}


class VariantError(ValueError):
    pass


def relative_path(variant: str) -> str:
    """Where a variant's file lives relative to the folder that holds model.onnx."""
    return ONNX_FILE if variant == FP32 else f"{VARIANT_DIR}/model.{variant}.onnx"


def variant_path(model_onnx: str | Path, variant: str) -> Path:
    """The file of `variant` for the FP32 file `model_onnx`: that file itself (whatever its name: `graft serve
    --onnx-file` and `graft predict --onnx-file` take any), the others in the variants folder beside it."""
    return Path(model_onnx) if variant == FP32 else Path(model_onnx).parent / relative_path(variant)


def sha_tag(variant: str) -> str:
    return ONNX_SHA_TAG if variant == FP32 else f"graft.onnx.{variant}.sha256"


def published_in(tags: dict[str, str]) -> list[str]:
    """The variants a registered version holds, read from its tags."""
    return [v for v in VARIANTS if tags.get(sha_tag(v))]


def choose_variant(asked: str, provider: str, available: list[str],
                   flags: set[str] | None = None) -> tuple[str, str]:
    """The variant to serve on `provider` from those `available`, and why. `auto`: the provider's preference (on the
    CPU, INT8 only where `flags`, this CPU's by default, hold an 8-bit dot-product instruction, or cannot be read);
    a named variant is served as asked (INT8 on a CPU without them, where it runs unfused to stay exact: deploy/cpu.py,
    with that said in the reason), or refused by name when the model has none."""
    int8_slow = provider == "CPUExecutionProvider" and not has_int8_dot(flags)
    without = f"this CPU has no 8-bit dot-product instructions ({', '.join(INT8_DOT_FLAGS)})"
    if asked != AUTO:
        if asked not in VARIANTS:
            raise VariantError(f"unknown variant {asked!r}; allowed: {', '.join((AUTO, *VARIANTS))}")
        if asked not in available:
            raise VariantError(f"the model has no {asked} variant (it has {', '.join(available)}): export.variants did "
                               f"not include it, or it failed export.max_accuracy_drop; serve variant auto or fp32")
        if asked == INT8 and int8_slow:
            return asked, f"asked for; {without}: INT8 runs slower than FP32 here, in float over the quantized values"
        return asked, "asked for"
    if int8_slow and INT8 in available:
        return FP32, f"{without}: INT8 would run slower than FP32 on {provider}"
    for variant in PREFERENCE.get(provider, (FP32,)):
        if variant in available:
            reason = "preferred on" if variant != FP32 else "no faster variant published for"
            return variant, f"{reason} {provider}"
    return FP32, f"default for {provider}"
