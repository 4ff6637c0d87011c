"""What this CPU is and which of its features decide speed, read from Linux's /proc/cpuinfo (no torch): training's
precision (components/compute.py), the variant a server prefers (deploy/variants.py), and how every benchmark
figure names its machine."""
from __future__ import annotations

import functools
from pathlib import Path

# The CPU features that decide speed here (bf16 training, INT8 kernels): what every benchmark figure names its CPU by.
SPEED_FLAGS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})
# Instructions that multiply and add 8-bit integers in one step (x86 VNNI and AMX, Arm's dot product): where ONNX
# Runtime's INT8 kernels have them, an INT8 file runs about 2x FP32, exactly; without them its x86 kernels multiply
# with VPMADDUBSW, whose 16-bit pair sums saturate, and ran no faster than FP32 (AMD EPYC, AVX2 only: 73.1 against
# 72.6 ms at batch 64, 6% of the default model's answers changed; benchmarks/README.md "INT8 on a CPU without VNNI").
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "asimddp")
# ONNX Runtime leaves QuantizeLinear / DequantizeLinear unfused: each convolution of a QDQ file then runs in float
# over the quantized values, the file's own arithmetic on any CPU (a QOperator file keeps its integer kernels).
UNFUSED_QDQ = {"session.disable_quant_qdq": "1"}


@functools.cache
def _cpuinfo_text() -> str:
    """Linux's /proc/cpuinfo, read once a process (every ONNX Runtime session asks: deploy/model.py); "" where it
    cannot be read."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo; empty where it has none."""
    return next((line.partition(":")[2].strip() for line in _cpuinfo_text().splitlines() if line.startswith(field)), "")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty where they cannot be read."""
    return set((_cpuinfo("flags") or _cpuinfo("Features")).split())


def cpu_model() -> str:
    return _cpuinfo("model name") or "unknown CPU"


def has_int8_dot(flags: set[str] | None = None) -> bool:
    """Whether this CPU (or one with `flags`) has an 8-bit dot-product instruction; True where its flags cannot be
    read, so that nothing changes where nothing is known."""
    flags = cpu_flags() if flags is None else flags
    return not flags or bool(flags & set(INT8_DOT_FLAGS))


def exact_int8_entries(flags: set[str] | None = None) -> dict[str, str]:
    """ONNX Runtime session config entries that make an INT8 QDQ file answer what it specifies on this CPU: none
    where it has 8-bit dot products; UNFUSED_QDQ where it has not (slower than FP32 there, so `serving.variant: auto`
    serves FP32 on such a CPU; an export there measures INT8 as a CPU with VNNI runs it). No effect on FP32 or FP16
    files, which have no QDQ nodes."""
    return {} if has_int8_dot(flags) else dict(UNFUSED_QDQ)


def speed_flags() -> list[str]:
    """This CPU's SPEED_FLAGS, sorted."""
    return sorted(cpu_flags() & SPEED_FLAGS)


def cpu_description() -> str:
    """The CPU's model and its speed flags, as benchmark results name the machine."""
    return f"{cpu_model()} ({', '.join(speed_flags())})"
