"""How far an INT8 file's answers depend on the CPU's integer kernels: each default recipe run three ways.

    .venv/bin/python benchmarks/int8_kernels.py --out benchmarks/results/int8_kernels-NAME.json   # after `graft run`

The fine-tuned model (models/transfer.pt with its temperature) is exported as the export stage does and quantized by
each recipe of `export.int8_search`; every INT8 file is then scored on the val and test splits by ONNX Runtime with
  - `kernels`: its fused integer kernels (what `graft serve` runs): on x86 without VNNI they multiply uint8 by int8
    with VPMADDUBSW, whose 16-bit pair sums saturate;
  - `x64quantprecision`: the session option that moves those multiplications to uint8 x uint8 where weights fall
    outside [-64, 63] (ONNX Runtime applies it on x86 without VNNI only);
  - `qdq_float`: QuantizeLinear / DequantizeLinear left unfused (`session.disable_quant_qdq`), so every convolution
    runs in float over the quantized values: the file's arithmetic with no integer kernel at all, the same on every CPU.
Where `kernels` agrees with `qdq_float` on (almost) every image, the export's accuracy measurement of that file holds
on any CPU; where it does not, it held only for CPUs with this one's kernels. Batch-64 times of the three are beside.
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
from components.export import cpu_session, export_onnx, interleaved_median_ms, quantize_int8  # noqa: E402
from components.stages.export import int8_recipes, quantization_inputs  # noqa: E402
from deploy.cpu import UNFUSED_QDQ, cpu_description  # noqa: E402

MODES = {"kernels": {}, "x64quantprecision": {"session.x64quantprecision": "1"}, "qdq_float": UNFUSED_QDQ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    params = load_params(Path("params.yaml"))
    model, splits, calibration = quantization_inputs(params)
    contract = model.spec.contract
    x_val, x_test = contract.normalize(splits.x_val), contract.normalize(splits.x_test)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "model.onnx", params.export.opset)
        files = {"FP32": fp32}
        for number, recipe in enumerate(int8_recipes(params.export.int8_search)):
            files[recipe.name] = quantize_int8(fp32, Path(tmp) / f"int8-{number}.onnx", calibration, recipe,
                                               params.export.calibration_percentile)
        for name, path in files.items():
            sessions = {mode: cpu_session(path, entries) for mode, entries in MODES.items()}
            runs = {mode: (lambda x, s=s: s.run([contract.output_name], {contract.input_name: x})[0])
                    for mode, s in sessions.items()}
            answers = {mode: (np.concatenate([run(x_val[i:i + 64]) for i in range(0, len(x_val), 64)]).argmax(1),
                              np.concatenate([run(x_test[i:i + 64]) for i in range(0, len(x_test), 64)]).argmax(1))
                       for mode, run in runs.items()}
            ms = interleaved_median_ms(list(runs.values()), x_test[:64], 10)
            record = {"file": name, "modes": {
                mode: {"val_accuracy": float((val == splits.y_val).mean()),
                       "test_accuracy": float((test == splits.y_test).mean()),
                       "test_agreement_with_qdq_float": float((test == answers["qdq_float"][1]).mean()),
                       "batch64_ms": round(float(t), 2)}
                for (mode, (val, test)), t in zip(answers.items(), ms)}}
            results.append(record)
            print(name)
            for mode, row in record["modes"].items():
                print(f"  {mode:18s} val {100 * row['val_accuracy']:.2f} test {100 * row['test_accuracy']:.2f} "
                      f"agrees with qdq_float on {100 * row['test_agreement_with_qdq_float']:.2f}% of test, "
                      f"batch 64 {row['batch64_ms']} ms")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_description(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
