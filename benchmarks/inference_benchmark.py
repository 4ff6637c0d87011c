"""Inference on this CPU, in-process: PyTorch eager against ONNX Runtime, and each export variant against FP32.

    .venv/bin/python benchmarks/inference_benchmark.py          # after `graft run`: models/model.onnx, models/variants/

For batch 1 and 64 it measures images/s (median of 7 windows of 0.3 s after 20 warm-up calls) of the fine-tuned
model (models/transfer.pt) in PyTorch eager (fp32, inference mode) and of every ONNX file export wrote (FP32 and
the variants within the accuracy bound; a variant that failed it is built here from the FP32 file only to be
timed, and marked so). FLOPs a image are counted from the ONNX graph (Conv and Gemm/MatMul multiply-adds x 2);
achieved GFLOP/s are set against the CPU's nominal peak: cores x clock x 2 FMA units x 16 FP32 lanes x 2 for FP32,
4 times that for INT8 (AVX-512 VNNI: 4 int8 multiply-adds a 32-bit lane). Accuracy of each file is the export
stage's (metrics/export.json). Results: benchmarks/results/inference.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from components.config import load_params
from components.data import load_splits
from components.export import Int8Recipe, build_variant
from components.network import load_checkpoint
from deploy.cpu import cpu_flags, cpu_model, speed_flags
from deploy.model import read_contract
from deploy.variants import FP32, VARIANTS, variant_path


def flops_per_image(path: Path) -> float:
    """2 x the multiply-adds of every Conv, Gemm and MatMul, from the graph's shapes at batch 1."""
    proto = onnx.load(str(path))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    del proto.graph.value_info[:]
    proto = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]}
    shapes.update({t.name: list(t.dims) for t in proto.graph.initializer})
    total = 0.0
    for node in proto.graph.node:
        if node.op_type == "Conv":
            out, weight = shapes[node.output[0]], shapes[node.input[1]]
            total += 2 * np.prod(out) * np.prod(weight[1:])  # each output value: Cin/groups x kh x kw multiply-adds
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes[node.input[0]], shapes[node.input[1]]
            total += 2 * np.prod(a) * b[-1]
    return float(total)


def images_per_second(run, batch: int) -> float:
    for _ in range(20):
        run()
    rates = []
    for _ in range(7):
        started, count = time.perf_counter(), 0
        while time.perf_counter() - started < 0.3:
            run()
            count += 1
        rates.append(count * batch / (time.perf_counter() - started))
    return statistics.median(rates)


def nominal_peak_gflops() -> float:
    """FP32: cores x clock x 2 FMA units x 16 lanes (AVX-512) x 2 FLOPs, or 8 lanes with AVX2 only."""
    mhz = max(float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("cpu MHz"))
    lanes = 16 if "avx512f" in cpu_flags() else 8
    return os.cpu_count() * mhz / 1000 * 2 * lanes * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--checkpoint", type=Path, default=Path("models/transfer.pt"))
    parser.add_argument("--export-metrics", type=Path, default=Path("metrics/export.json"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared/selected.npz"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inference.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    metadata = {p.key: p.value for p in onnx.load(str(args.onnx), load_external_data=False).metadata_props}
    contract = read_contract(metadata)
    scores = json.loads(args.export_metrics.read_text()).get("variants", {})
    model, _ = load_checkpoint(args.checkpoint)
    model.eval()
    peak = nominal_peak_gflops()
    flops = flops_per_image(args.onnx)
    splits = load_splits(args.data)
    results = {"cpu": cpu_model(), "cpu_flags": speed_flags(),
               "threads": os.cpu_count(), "onnxruntime": ort.__version__, "torch": torch.__version__,
               "input": list(contract.shape), "gflop_per_image": flops / 1e9, "nominal_peak_gflops_fp32": peak,
               "nominal_peak_gops_int8": 4 * peak, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for variant in VARIANTS:
            path = variant_path(args.onnx, variant)
            if not path.is_file():  # not published: built here only to be timed
                settings = load_params("params.yaml").export
                calibration = np.concatenate([splits.x_train, splits.x_val])[: settings.calibration_images]
                path = build_variant(variant, args.onnx, Path(tmp) / f"model.{variant}.onnx", contract.normalize(calibration),
                                     Int8Recipe(), settings.calibration_percentile)
            files[variant] = path
        for batch in (1, 64):
            x = contract.normalize(splits.x_test[np.resize(np.arange(len(splits.x_test)), batch)])
            tensor = torch.from_numpy(x)
            with torch.inference_mode():
                eager = images_per_second(lambda: model(tensor), batch)
            row = {"batch": batch, "pytorch_eager_fp32": eager}
            for variant, path in files.items():
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                row[f"onnxruntime_{variant}"] = images_per_second(lambda: session.run(None, {contract.input_name: x}), batch)
            row["onnxruntime_fp32_over_eager"] = row["onnxruntime_fp32"] / eager
            row["int8_over_fp32"] = row["onnxruntime_int8"] / row["onnxruntime_fp32"]
            row["fp32_gflops"] = row["onnxruntime_fp32"] * flops / 1e9
            row["int8_gops"] = row["onnxruntime_int8"] * flops / 1e9
            row["fp32_share_of_peak"] = row["fp32_gflops"] / peak
            row["int8_share_of_peak"] = row["int8_gops"] / (4 * peak)
            results["rows"].append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    results["accuracy"] = {v: {k: s[k] for k in ("accuracy", "accuracy_drop", "published")} for v, s in scores.items()}
    results["published"] = {v: v == FP32 or variant_path(args.onnx, v).is_file() for v in VARIANTS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['cpu']}: {flops / 1e9:.3f} GFLOP an image; nominal peak {peak:.0f} GFLOP/s FP32, {4 * peak:.0f} GOP/s INT8")


if __name__ == "__main__":
    main()
