"""Does `finetune.class_balance` help a long-tailed labelled split, and what does it cost?

Run by hand after `graft run` (it reads params.yaml and the target's images):

    .venv/bin/python benchmarks/imbalance_study.py --seeds 0 1 2 --ratio 10
    .venv/bin/python benchmarks/imbalance_study.py --largest 200 --ratio 50 --modes resample resample+fixmatch

A mode is a class_balance value, with `+fixmatch` also learning from an unlabelled pool as skewed as the labels (the
rest of the training split, drawn with the same profile from --pool-largest down: harvested production images follow
what clients send); `--set KEY=VALUE` overrides params.yaml for every run, as in transfer_study.py.

Protocol: the target's val and test splits as the pipeline draws them (data.split_seed; balanced on Animal-MNIST);
from the rest, each seed draws a long-tailed labelled split, CIFAR-LT's exponential profile: class c (in the data
set's class order) keeps n_max * ratio^(-c / (K - 1)) images, from n_max down to n_max / ratio. Each class-balance
mode fine-tunes the same source with params.yaml's recipe on that split, from the same initialisation and seed.
On the balanced test split the study reports each class's recall, and from them: the mean recall (balanced
accuracy: what a user with every class equally important sees), the accuracy a test split drawn like the training
split would give (recall weighted by the training shares: what plain accuracy on a user's own imbalanced data
shows), the macro-F1 and the mean recall of the three smallest classes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml
from transfer_study import _override  # the benchmarks folder is the script's own

from components.config import parse_params
from components.data import load_splits, prepare
from components.evaluate import score
from components.network import graft
from components.objectives import FixMatch
from components.predict import Normalizer, predict_logits
from components.source_models import load_source, resolve_pretrained
from components.train import strategy_phases, train

MODES = ("none", "reweight", "resample")
TAIL = 3


def long_tail_counts(classes: int, largest: int, ratio: float) -> list[int]:
    return [max(1, round(largest * ratio ** (-c / (classes - 1)))) for c in range(classes)]


def long_tail(labels: np.ndarray, counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """Indices keeping counts[c] examples of each class c, a draw with rng."""
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), size=n, replace=False)
                                   for c, n in enumerate(counts)]))


def run_study(params_path: Path, seeds: list[int], largest: int, ratio: float, source_name: str,
              modes: list[str] = list(MODES), pool_largest: int = 400, overrides: list[str] = ()) -> dict:
    params = parse_params(_override(yaml.safe_load(params_path.read_text()), list(overrides)))
    target = params.data.target.model_copy(update={"labels_per_class": None})
    source = load_source(resolve_pretrained(source_name, params.sources.pretrained[source_name]))
    identity = source.identity
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "target.npz"
        prepare(target, params.data, params.data.channels, params.sources.image_sizes(), 0, data, Path(tmp) / "report.json")
        full = load_splits(data, identity.image_size)
        counts = long_tail_counts(len(full.classes), largest, ratio)
        shares = np.array(counts) / sum(counts)
        tail = np.argsort(counts, kind="stable")[:TAIL]
        for seed in seeds:
            keep = long_tail(full.y_train, counts, np.random.default_rng(seed))
            splits = replace(full, x_train=full.x_train[keep], y_train=full.y_train[keep], origin_train=full.origin_train[keep])
            rest = np.setdiff1d(np.arange(len(full.y_train)), keep)
            pool = rest[long_tail(full.y_train[rest], long_tail_counts(len(full.classes), pool_largest, ratio),
                                  np.random.default_rng(seed))]
            spec = identity.model_spec(splits.classes, params.data.channels, params.finetune.channel_adapter)
            for mode in modes:
                balance, _, semi = mode.partition("+")
                recipe = params.finetune.model_copy(update={"class_balance": balance})
                model = graft(source.backbone, spec, seed)
                terms = (FixMatch(recipe.semi_supervised, full.x_train[pool], model.head),) if semi == "fixmatch" else ()
                started = time.perf_counter()
                train(model, splits, recipe, strategy_phases(recipe), seed, desc=f"{mode} seed {seed}", terms=terms)
                seconds = time.perf_counter() - started
                predicted = predict_logits(model, splits.x_test, Normalizer.of(model.spec.contract)).numpy().argmax(1)
                evaluation = score(splits.y_test, predicted, splits.classes)
                recall = np.array([evaluation.per_class[name]["recall"] for name in splits.classes])
                run = {"seed": seed, "mode": mode, "train_seconds": seconds, "recall": recall.tolist(),
                       "balanced_accuracy": evaluation.balanced_accuracy, "train_shares_accuracy": float(recall @ shares),
                       "macro_f1": evaluation.macro_f1, "tail_recall": float(recall[tail].mean())}
                runs.append(run)
                print(f"seed {seed} {mode:18s} balanced {run['balanced_accuracy']:.4f} as trained "
                      f"{run['train_shares_accuracy']:.4f} macro-F1 {run['macro_f1']:.4f} tail {run['tail_recall']:.4f} "
                      f"({seconds:.0f} s)", flush=True)
    return {"seeds": seeds, "counts": counts, "classes": list(full.classes), "source": source_name,
            "test_images": int(len(full.y_test)), "modes": modes, "pool_largest": pool_largest,
            "overrides": list(overrides), "runs": runs}


def markdown(study: dict) -> str:
    lines = [f"labelled images a class: {study['counts']} ({', '.join(study['classes'])}); source {study['source']}", "",
             "| class_balance | balanced accuracy | accuracy at the training shares | macro-F1 | recall, 3 smallest classes | s a run |",
             "| --- | --- | --- | --- | --- | ---: |"]
    for mode in study.get("modes", MODES):
        runs = [r for r in study["runs"] if r["mode"] == mode]

        def cell(key: str) -> str:
            values = [100 * r[key] for r in runs]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.2f}{spread} ({', '.join(f'{v:.2f}' for v in values)})"

        lines.append(f"| {mode} | {cell('balanced_accuracy')} | {cell('train_shares_accuracy')} | {cell('macro_f1')} | "
                     f"{cell('tail_recall')} | {statistics.mean(r['train_seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--largest", type=int, default=40, help="labelled images of the largest class")
    parser.add_argument("--ratio", type=float, default=10.0, help="largest class over smallest")
    parser.add_argument("--source", default="efficientnet-lite0", help="a pretrained candidate of params.yaml")
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="class_balance values, each optionally +fixmatch")
    parser.add_argument("--pool-largest", type=int, default=400, help="+fixmatch: unlabelled images of the largest class")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for every run, e.g. --set finetune.semi_supervised.threshold=0.9")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/imbalance_study.json"))
    args = parser.parse_args()
    study = run_study(args.params, args.seeds, args.largest, args.ratio, args.source, args.modes, args.pool_largest,
                      args.overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(study, indent=2) + "\n")
    print(markdown(study))


if __name__ == "__main__":
    main()
