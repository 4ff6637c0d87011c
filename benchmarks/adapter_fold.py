"""The channel adapter folded into the first convolution, or left as its own layer: speed and accuracy.

After a `graft run` on a gray target with a 3-channel source (the default: Animal-MNIST on EfficientNet-Lite0), in
the project: the fine-tuned model (with its temperature, as the export stage writes it) exported twice, with the
adapter folded (what `graft run` ships since the fold) and without, each quantized by the export's INT8 recipes
(params.yaml export.int8_search, export.calibration_percentile, calibrated on the same train + val images). Every
file scored on the validation and test splits (accuracy, top-1 agreement with the folded FP32 file on test), then
timed at batch 64 in turns with the export's own timer (interleaved_median_ms: fresh ONNX Runtime CPU sessions whose
threads sleep between runs, as the export's), `--rounds` times.

    .venv/bin/python benchmarks/adapter_fold.py --rounds 5 --out benchmarks/results/adapter_fold.json

Prints a line a file (accuracies, each round's ms, the median speed-up over the unfolded FP32 file and over the FP32
file of its own graph). Results: benchmarks/README.md "The channel adapter folded".
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components.config import load_params  # noqa: E402
from components.export import export_onnx, interleaved_median_ms, logits_runs, quantize_int8  # noqa: E402
from components.stages.export import int8_recipes, quantization_inputs  # noqa: E402
from deploy.cpu import cpu_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    params = load_params(Path("params.yaml"))
    model, splits, calibration = quantization_inputs(params)
    contract = model.spec.contract
    recipes = int8_recipes(params.export.int8_search)
    with tempfile.TemporaryDirectory() as tmp:
        files: dict[str, Path] = {}
        for graph, fold in (("unfolded", False), ("folded", True)):
            fp32 = export_onnx(model, Path(tmp) / f"{graph}.onnx", params.export.opset, fold_adapter=fold)
            files[f"{graph} FP32"] = fp32
            for number, recipe in enumerate(recipes):
                files[f"{graph} INT8 {recipe.name}"] = quantize_int8(
                    fp32, Path(tmp) / f"{graph}-int8-{number}.onnx", calibration, recipe,
                    params.export.calibration_percentile)
        runs = logits_runs(list(files.values()), contract)
        x_val, x_test = contract.normalize(splits.x_val), contract.normalize(splits.x_test)
        answers = {name: (run(x_val).argmax(1), run(x_test).argmax(1)) for name, run in zip(files, runs)}
        batch = x_test[:64]
        rounds = []
        for _ in range(args.rounds):  # fresh sessions each round, as each export run has
            rounds.append(interleaved_median_ms(logits_runs(list(files.values()), contract), batch, 10))
    rounds_ms = np.array(rounds)  # [round, file]
    names = list(files)
    unfolded_fp32, folded_fp32 = names.index("unfolded FP32"), names.index("folded FP32")
    reference = answers["folded FP32"][1]
    results = []
    for column, name in enumerate(names):
        own_fp32 = folded_fp32 if name.startswith("folded") else unfolded_fp32
        val, test = answers[name]
        record = {
            "file": name, "val_accuracy": float((val == splits.y_val).mean()),
            "test_accuracy": float((test == splits.y_test).mean()),
            "test_agreement_with_folded_fp32": float((test == reference).mean()),
            "batch64_ms": [round(float(ms), 2) for ms in rounds_ms[:, column]],
            "speedup_over_unfolded_fp32": float(np.median(rounds_ms[:, unfolded_fp32] / rounds_ms[:, column])),
            "speedup_over_own_fp32": float(np.median(rounds_ms[:, own_fp32] / rounds_ms[:, column])),
        }
        results.append(record)
        print(f"{name:58s} val {100 * record['val_accuracy']:.2f} test {100 * record['test_accuracy']:.2f} "
              f"agree {100 * record['test_agreement_with_folded_fp32']:.2f}  ms {record['batch64_ms']}  "
              f"x{record['speedup_over_unfolded_fp32']:.2f} over unfolded FP32, x{record['speedup_over_own_fp32']:.2f} "
              f"over its own FP32")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_description(), "rounds": args.rounds,
                                        "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
