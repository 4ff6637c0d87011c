"""Self-training after FixMatch (Noisy Student, Xie et al. 2020), probed on one seed: does a fresh student trained on
a FixMatch teacher's confident answers about the unlabelled pool beat the teacher?

Run by hand after `graft run`, with the transfer study's options for the recipe:

    .venv/bin/python benchmarks/self_training_probe.py --seed 0 --set finetune.steps=600 \
        --set finetune.lr=0.004593668287520293 --set finetune.backbone_lr_scale=0.677457267060533

Teacher: the transfer study's FixMatch run (params.yaml's finetune, the --set changes, FixMatch on; EfficientNet-Lite0;
the seed's k labelled images a class; the pool is the target's training images without their labels, val and test
left out). Its answers on the pool at or above --confidence become labels, beside the seed's own labelled images
(their true labels win where the pool holds them). Student: a fresh graft of the same source, trained on those
labels with the same recipe and the same FixMatch term on the same pool (the student's noise is FixMatch's strong
view); with --rounds N each student is the next one's teacher. What `finetune.semi_supervised.self_training` does in
the finetune stage (components/stages/train_target.py), with the same functions (components/self_training.py). The
pool's own labels are read only to report how many pseudo-labels are right; no training reads them.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from components.config import parse_params
from components.data import load_splits, outside_held_out, prepare
from components.network import graft
from components.objectives import FixMatch
from components.predict import Normalizer, predict_logits
from components.self_training import confident_new_images, with_pseudo_labels
from components.source_models import load_source, resolve_pretrained
from components.train import strategy_phases, train
from transfer_study import _evaluate, _override  # benchmarks/ is the script's own folder, first on sys.path


def _fit(source, spec, splits, pool, params, seed: int, desc: str) -> tuple:
    model = graft(source.backbone, spec, seed)
    started = time.perf_counter()
    train(model, splits, params.finetune, strategy_phases(params.finetune, "finetune"), seed, desc=desc,
          terms=(FixMatch(params.finetune.semi_supervised, pool, model.head),))
    return model, time.perf_counter() - started


def run_probe(params_path: Path, seed: int, labels_per_class: int, overrides: list[str], source_name: str,
              confidence: float, rounds_wanted: int) -> dict:
    raw = _override(yaml.safe_load(params_path.read_text()), [*overrides, "finetune.semi_supervised.method=fixmatch"])
    raw["data"]["unlabeled"] = {"training-pool": {"path": raw["data"]["target"]["path"]}}
    params = parse_params(raw)
    target = params.data.target.model_copy(update={"labels_per_class": labels_per_class})
    identity = resolve_pretrained(source_name, params.sources.pretrained[source_name])
    source = load_source(identity)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = params.sources.image_sizes()
        prepare(target.model_copy(update={"labels_per_class": None}), params.data, params.data.channels, sizes, 0,
                Path(tmp) / "pool.npz", Path(tmp) / "pool.json")
        prepare(target, params.data, params.data.channels, sizes, seed, Path(tmp) / "target.npz", Path(tmp) / "t.json")
        everything = load_splits(Path(tmp) / "pool.npz", identity.image_size)
        splits = load_splits(Path(tmp) / "target.npz", identity.image_size)
    kept = outside_held_out(everything.x_train, splits)
    pool, pool_truth = everything.x_train[kept], everything.y_train[kept]  # the truth: for the report only
    spec = identity.model_spec(splits.classes, params.data.channels, params.finetune.channel_adapter)

    teacher, teacher_seconds = _fit(source, spec, splits, pool, params, seed, f"teacher seed {seed}")
    bins, model, rounds = params.calibration.bins, teacher, []
    for number in range(1, rounds_wanted + 1):
        probabilities = torch.softmax(predict_logits(model, pool, Normalizer.of(model.spec.contract)), 1).numpy()
        confident = confident_new_images(splits, pool, probabilities, confidence)
        student_data, added = with_pseudo_labels(splits, pool, probabilities, confident, "training-pool")
        model, seconds = _fit(source, spec, student_data, pool, params, seed, f"student {number} seed {seed}")
        rounds.append({"round": number, **added,
                       "pseudo_label_accuracy": float((probabilities.argmax(1) == pool_truth)[confident].mean()),
                       "pool_accuracy_all": float((probabilities.argmax(1) == pool_truth).mean()),
                       "student": {**_evaluate(model, splits, bins), "train_seconds": seconds}})
    return {"seed": seed, "labels_per_class": labels_per_class, "overrides": overrides, "confidence": confidence,
            "teacher": {**_evaluate(teacher, splits, bins), "train_seconds": teacher_seconds}, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--source", default="efficientnet-lite0", help="a pretrained candidate of params.yaml")
    parser.add_argument("--confidence", type=float, default=0.95, help="a pool answer at least this sure is a label")
    parser.add_argument("--rounds", type=int, default=1, help="students in turn, each the next one's teacher")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/self_training_probe.json"))
    args = parser.parse_args()
    result = run_probe(args.params, args.seed, args.labels_per_class, args.overrides, args.source, args.confidence,
                       args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"seed {result['seed']}: teacher test {result['teacher']['test']:.4f} (val {result['teacher']['val']:.4f})")
    for done in result["rounds"]:
        print(f"  round {done['round']}: {done['pseudo_labelled']} of {done['pool']} pool images pseudo-labelled, "
              f"{done['pseudo_label_accuracy']:.4f} of them right (the teacher's answers on the whole pool: "
              f"{done['pool_accuracy_all']:.4f}); student test {done['student']['test']:.4f} "
              f"(val {done['student']['val']:.4f})")


if __name__ == "__main__":
    main()
