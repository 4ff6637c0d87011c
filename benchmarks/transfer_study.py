"""Does transfer pay? Every strategy against scratch, several seeds, one fixed test split.

Run by hand after `graft run` (it reuses the pipeline's source checkpoint and params.yaml):

    .venv/bin/python benchmarks/transfer_study.py --seeds 0 1 2 --labels-per-class 10

Protocol: the test and val splits are fixed by data.split_seed; each seed draws its own k labelled images a
class and its own initialisation; every strategy, scratch included, gets the same steps, batch size,
optimizer, learning rate and augmentation from params.yaml; the test split is never used for selection.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from components.config import STRATEGIES, parse_params
from components.data import load_splits, prepare
from components.evaluate import score
from components.model import build, graft, load_checkpoint
from components.stages import Layout, model_spec
from components.train import Normalizer, predict_logits, strategy_phases, train


def _override(raw: dict, assignments: list[str]) -> dict:
    for assignment in assignments:
        dotted, value = assignment.split("=", 1)
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = yaml.safe_load(value)
    return raw


def run_study(params_path: Path, seeds: list[int], labels_per_class: int, strategies: list[str], overrides: list[str]) -> dict:
    params = parse_params(_override(yaml.safe_load(params_path.read_text()), overrides))
    target_params = params.data.target.model_copy(update={"labels_per_class": labels_per_class})
    source, _ = load_checkpoint(Layout.source_model)
    results: dict[str, list[float]] = {s: [] for s in strategies}
    val_results: dict[str, list[float]] = {s: [] for s in strategies}
    seconds: dict[str, list[float]] = {s: [] for s in strategies}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            data_path = Path(tmp) / f"target-{seed}.npz"
            prepare(target_params, params.data, seed, data_path, Path(tmp) / f"report-{seed}.json")
            splits = load_splits(data_path)
            spec = model_spec(params, splits.classes)
            for strategy in strategies:
                model = build(spec, seed) if strategy == "scratch" else graft(source, spec, seed)
                started = time.perf_counter()
                train(model, splits, params.finetune, strategy_phases(params.finetune, strategy), seed, desc=f"{strategy} seed {seed}")
                seconds[strategy].append(time.perf_counter() - started)
                normalize = Normalizer.of(spec.mean, spec.std)
                for split, store in (("test", results), ("val", val_results)):
                    x, y = splits.split(split)
                    store[strategy].append(score(y, predict_logits(model, x, normalize).argmax(1).numpy(), splits.classes).accuracy)
                print(f"seed {seed} {strategy:13s} val {val_results[strategy][-1]:.4f} test {results[strategy][-1]:.4f}")
    return {"seeds": seeds, "labels_per_class": labels_per_class, "test_examples": int(len(splits.y_test)),
            "overrides": overrides, "accuracy": results, "val_accuracy": val_results, "train_seconds": seconds}


def markdown(study: dict) -> str:
    scratch = study["accuracy"].get("scratch")
    lines = [f"k={study['labels_per_class']} labels a class, seeds {study['seeds']}, {study['test_examples']} test images, "
             f"overrides: {study['overrides'] or 'none'}",
             "", "| strategy | test accuracy % (mean ± std) | per seed | minus scratch, per seed | val % (mean) | train s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for strategy, values in study["accuracy"].items():
        mean, std = 100 * statistics.mean(values), 100 * (statistics.stdev(values) if len(values) > 1 else 0.0)
        per_seed = ", ".join(f"{100 * v:.1f}" for v in values)
        gains = ", ".join(f"{100 * (v - s):+.1f}" for v, s in zip(values, scratch)) if scratch else ""
        val = 100 * statistics.mean(study["val_accuracy"][strategy])
        lines.append(f"| {strategy} | {mean:.1f} ± {std:.1f} | {per_seed} | {gains} | {val:.1f} | {statistics.mean(study['train_seconds'][strategy]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this study, e.g. --set finetune.backbone_lr_scale=0.3")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transfer_study.json"))
    args = parser.parse_args()
    study = run_study(args.params, args.seeds, args.labels_per_class, args.strategies, args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(study, indent=2) + "\n")
    print(markdown(study))


if __name__ == "__main__":
    main()
