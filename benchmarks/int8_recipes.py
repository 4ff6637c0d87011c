"""INT8 recipes on this CPU: every combination of format (QDQ, QOperator), weights per channel or per tensor,
calibration method and layers left in float, each quantized from the exported FP32 file, its accuracy on the
validation split and its latency at batch 1 and 64 in a fresh ONNX Runtime session, against FP32's.

Run from the project root after `graft run` (it reads models/model.onnx and data/prepared/selected.npz):
    .venv/bin/python benchmarks/int8_recipes.py [--out benchmarks/results/int8_recipes.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from components import data as data_mod
from components.config import load_params
from components.export import FLOAT_ROLES, Int8Recipe, quantize_int8, score_onnx
from components.layout import Layout
from deploy.model import load_model


def cpu_name() -> str:
    flags = set()
    name = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    shown = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})
    return f"{name} ({', '.join(shown)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/int8_recipes.json")
    parser.add_argument("--formats", nargs="+", default=["qdq", "qoperator"])
    parser.add_argument("--per-channel", nargs="+", default=["true", "false"])
    parser.add_argument("--calibration", nargs="+", default=["percentile", "minmax", "entropy"])
    args = parser.parse_args()
    params = load_params(Path("params.yaml"))
    contract = load_model(Layout.onnx_model, ["cpu"]).contract
    splits = data_mod.load_splits(Layout.selected_data)
    calibration = contract.normalize(np.concatenate([splits.x_train, splits.x_val])[: params.export.calibration_images])
    fp32 = score_onnx(Layout.onnx_model, contract, splits.x_val, splits.y_val)
    rows = [{"recipe": "fp32", **asdict(fp32), "speedup_batch64": 1.0, "quantize_seconds": 0.0}]
    print(f"CPU: {cpu_name()}\nfp32: val {fp32.accuracy:.4f}, batch 64 {fp32.latency_ms_batch64:.2f} ms")
    keep_float_options = [FLOAT_ROLES, ("first_conv",), ()]
    grid = itertools.product(args.formats, [v == "true" for v in args.per_channel], args.calibration, keep_float_options)
    with tempfile.TemporaryDirectory() as tmp:
        for number, (fmt, per_channel, method, keep) in enumerate(grid):
            recipe = Int8Recipe(fmt, per_channel, method, keep)
            path = Path(tmp) / f"int8-{number}.onnx"
            started = time.perf_counter()
            quantize_int8(Layout.onnx_model, path, calibration, recipe, params.export.calibration_percentile)
            seconds = time.perf_counter() - started
            score = score_onnx(path, contract, splits.x_val, splits.y_val)
            row = {"recipe": recipe.name, **asdict(recipe), **asdict(score), "quantize_seconds": seconds,
                   "speedup_batch64": fp32.latency_ms_batch64 / score.latency_ms_batch64}
            rows.append(row)
            print(f"{recipe.name:55s} val {score.accuracy:.4f} ({100 * (score.accuracy - fp32.accuracy):+.1f} pt)  "
                  f"b1 {score.latency_ms_batch1:.2f} ms  b64 {score.latency_ms_batch64:.2f} ms  "
                  f"{row['speedup_batch64']:.2f}x  ({seconds:.1f} s to quantize)", flush=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                          "model": str(Layout.onnx_model), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
