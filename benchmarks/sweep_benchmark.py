"""`graft sweep` on a 2-worker Dask LocalCluster (through Prefect) against the same sweep one branch after another,
on the default project (its selected source and target), each in a fresh MLflow store so that nothing is resumed.

    .venv/bin/python benchmarks/sweep_benchmark.py              # after a `graft run`; about 6 min on 2 cores

8 fine-tunes by default: strategies scratch and finetune x 5 and 10 labels a class x seeds 0 and 1, at
--steps steps each. Results: benchmarks/results/sweep_benchmark.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

from components.settings import load_settings
from components.sweep import run_sweep
from deploy.cpu import cpu_model
from flows.sweep import run_sweep_on_dask


def _timed(run, root: Path, params) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as store:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
        started = time.perf_counter()
        report = run(str(root), params)
        return time.perf_counter() - started, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sweep_benchmark.json"))
    args = parser.parse_args()
    root = args.root.resolve()
    params = load_settings(root / "params.yaml")
    sweep = params.sweep.model_copy(update={"labels_per_class": [5, 10], "seeds": [0, 1],
                                            "strategies": {"scratch": {"strategy": "scratch"}, "finetune": {"strategy": "finetune"}}})
    params = params.model_copy(update={"sweep": sweep, "finetune": params.finetune.model_copy(
        update={"steps": args.steps, "eval_every_steps": args.steps})})
    with contextlib.chdir(root):
        sequential_s, sequential = _timed(run_sweep, root, params)
        dask_s, on_dask = _timed(run_sweep_on_dask, root, params)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "branches": 8, "steps": args.steps,
              "sequential_seconds": round(sequential_s, 1), "dask_2_workers_seconds": round(dask_s, 1),
              "speedup": round(sequential_s / dask_s, 2), "dask_workers": on_dask["workers"],
              "mean_accuracy": {"sequential": {f"{r['strategy']}/k={r['labels_per_class']}": round(r["mean"], 4) for r in sequential["rows"]},
                                "dask": {f"{r['strategy']}/k={r['labels_per_class']}": round(r["mean"], 4) for r in on_dask["rows"]}}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
