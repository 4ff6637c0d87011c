"""Which INT8 recipe is faster, asked again and again: how stable is the answer, by how the files are timed?

After a `graft run`, in the project: the FP32 file and its INT8 files with the first 1, 2 and 4 convolutions in
float (the default search's recipes), each measurement with fresh ONNX Runtime CPU sessions, a warm-up, then 10
timed runs per file at batch 64 (the search's own figure), the median kept. Four ways, each measured `--rounds`
times, rounds interleaved so a slow minute of the host lands on every way:

- blocks: one file's 10 runs, then the next file's (the search before this script);
- turns: one run of each file in turn, 10 times over (what a change in the machine's speed meets on every file);
- either with the sessions' threads spinning between runs (ONNX Runtime's default) or sleeping (`_nospin`:
  session.intra_op.allow_spinning 0).

    .venv/bin/python benchmarks/int8_timing_modes.py --rounds 6

Prints, per way, FP32's batch-64 ms, the first-2 / first-4 ratio (the pair the search must rank) and FP32 /
first-4 (the speed-up), one figure per round. Results: benchmarks/README.md "INT8 recipes".
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from components import data as data_mod  # noqa: E402
from components.config import load_params  # noqa: E402
from components.export import Int8Recipe, interleaved_median_ms, quantize_int8, read_metadata  # noqa: E402
from components.layout import Layout  # noqa: E402
from components.stages.export import calibration_images  # noqa: E402
from deploy.contract import Contract  # noqa: E402
from deploy.tags import CONTRACT_KEY  # noqa: E402

WAYS = ["blocks", "turns", "turns_nospin", "blocks_nospin"]


def runs(files: list[Path], contract: Contract, spin: bool) -> list:
    calls = []
    for path in files:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        calls.append(lambda batch, session=session: session.run([contract.output_name], {contract.input_name: batch}))
    return calls


def measure(way: str, files: list[Path], contract: Contract, batch: np.ndarray, repeats: int = 10) -> list[float]:
    """The export's own timer (interleaved_median_ms) on all the files at once ("turns"), or on one file at a time."""
    calls = runs(files, contract, spin=not way.endswith("_nospin"))
    if way.startswith("blocks"):
        return [interleaved_median_ms([call], batch, repeats)[0] for call in calls]
    return interleaved_median_ms(calls, batch, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    params = load_params("params.yaml")
    contract = Contract.from_dict(json.loads(read_metadata(Layout.onnx_model)[CONTRACT_KEY]))
    splits = data_mod.load_splits(Layout.selected_data)
    calibration = calibration_images(splits, contract, params.export.calibration_images, params.seed)
    folder = Path(tempfile.mkdtemp())
    files = [Layout.onnx_model]
    for float_convs in (1, 2, 4):
        files.append(folder / f"int8-{float_convs}.onnx")
        quantize_int8(Layout.onnx_model, files[-1], calibration, Int8Recipe(float_convs=float_convs),
                      params.export.calibration_percentile, ranges_cache=folder / "ranges.json")
    batch = contract.normalize(splits.x_val)[np.resize(np.arange(len(splits.x_val)), 64)]
    results = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            results[way].append(measure(way, files, contract, batch))
    for way in WAYS:
        ms = np.array(results[way])  # rounds x (fp32, int8-1, int8-2, int8-4)
        print(f"{way:14s} fp32 ms {np.round(ms[:, 0], 1).tolist()}  first-2/first-4 "
              f"{np.round(ms[:, 2] / ms[:, 3], 3).tolist()}  fp32/first-4 {np.round(ms[:, 0] / ms[:, 3], 2).tolist()}")


if __name__ == "__main__":
    main()
