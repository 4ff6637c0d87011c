"""INT8 recipes on this CPU: every combination of format (QDQ, QOperator), weights per channel or per tensor,
calibration method and layers left in float, run through the export stage's own search (components/export.py
search_int8): each quantized from the exported FP32 file, its accuracy on the validation split and its latency at
batch 1 and 64 in ONNX Runtime sessions timed in turns with FP32's (one run of each file, over and over), against
FP32's.

Run from the project root after `graft run` (it reads models/model.onnx and data/prepared/selected.npz):
    .venv/bin/python benchmarks/int8_recipes.py [--out benchmarks/results/int8_recipes.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


from components import data as data_mod
from components.config import Int8SearchParams, load_params
from components.export import search_int8
from components.layout import Layout
from components.stages.export import calibration_images, int8_recipes
from deploy.cpu import cpu_description
from deploy.model import load_model

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/int8_recipes.json")
    parser.add_argument("--formats", nargs="+", default=["qdq", "qoperator"])
    parser.add_argument("--per-channel", nargs="+", default=["true", "false"])
    parser.add_argument("--calibration", nargs="+", default=["percentile", "minmax", "entropy"])
    parser.add_argument("--float-convs", nargs="+", type=int, default=[0, 1, 2, 4, 8],
                        help="how many leading convolutions each recipe leaves in float")
    parser.add_argument("--float-classifier", nargs="+", default=["true"])
    args = parser.parse_args()
    params = load_params(Path("params.yaml"))
    settings = params.export
    grid = Int8SearchParams(formats=args.formats, per_channel=[v == "true" for v in args.per_channel],
                            calibration=args.calibration, float_convs=args.float_convs,
                            float_classifier=[v == "true" for v in args.float_classifier])
    contract = load_model(Layout.onnx_model, ["cpu"]).contract
    splits = data_mod.load_splits(Layout.selected_data)
    calibration = calibration_images(splits, contract, settings.calibration_images, params.seed)
    cpu = cpu_description()
    with tempfile.TemporaryDirectory() as tmp:
        fp32, rows = search_int8(Layout.onnx_model, Path(tmp) / "int8.onnx", calibration, int8_recipes(grid),
                                 settings.calibration_percentile, contract, splits.x_val, splits.y_val,
                                 settings.max_accuracy_drop, settings.int8_search.same_speed_within)
    print(f"CPU: {cpu}\nfp32: val {fp32.accuracy:.4f}, batch 64 {fp32.latency_ms_batch64:.2f} ms")
    for row in rows:
        print(f"{row['recipe']:55s} val {row['val_accuracy']:.4f} ({-100 * row['val_accuracy_drop']:+.1f} pt)  "
              f"b1 {row['latency_ms_batch1']:.2f} ms  b64 {row['latency_ms_batch64']:.2f} ms  "
              f"{row['speedup_batch64_cpu']:.2f}x  ({row['quantize_seconds']:.1f} s to quantize)"
              f"{'  kept' if row['kept'] else ''}")
    Path(args.out).write_text(json.dumps({
        "cpu": cpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": str(Layout.onnx_model),
        "fp32": {"val_accuracy": fp32.accuracy, "latency_ms_batch1": fp32.latency_ms_batch1,
                 "latency_ms_batch64": fp32.latency_ms_batch64, "onnx_bytes": fp32.onnx_bytes},
        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
