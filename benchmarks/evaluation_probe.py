"""Would the same training score better, evaluated another way? Two ways, on one transfer_study run per seed:

- an exponential moving average of the weights (FixMatch's own evaluation model) instead of the last step's: the
  run keeps several averages beside the training, untouched by them;
- flip averaging: each image and its mirror image (left-right; finetune.augment flips in training) through the
  network, their softmax probabilities averaged ("probabilities"), or their logits ("logits").

Each set of weights is scored at the end on val and test, plainly and flip-averaged.

    .venv/bin/python benchmarks/evaluation_probe.py --seeds 0 1 -- --set finetune.steps=1200 ...

Everything after `--` goes to benchmarks/transfer_study.py as it is (the same protocol: the study's run itself
is unchanged, so its own val and test figures reproduce the study's). Each average: decay d, updated after every
optimisation step (w_avg <- d * w_avg + (1 - d) * w), starting from the weights the training starts from;
"params" averages the parameters and takes BatchNorm's running statistics as they are at the end (FixMatch's
reference code), "all" averages the statistics too (timm's ModelEmaV2). "warmup" uses min(d, (1 + t) / (10 + t))
at step t (TensorFlow's num_updates rule), so early steps do not weigh the starting weights.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import components.train as train_module
import transfer_study
from components.predict import Normalizer, predict_logits

AVERAGES = {  # name: (decay, averages BatchNorm statistics too, warmup)
    "0.98 params": (0.98, False, False),
    "0.99 params": (0.99, False, False),
    "0.995 params": (0.995, False, False),
    "0.99 all": (0.99, True, False),
    "0.995 all": (0.995, True, False),
    "0.999 warmup params": (0.999, False, True),
}
_finished: dict[str, dict[str, torch.Tensor]] = {}


def _update(run, averages: dict[str, dict[str, torch.Tensor]]) -> None:
    state = run.model.state_dict()
    parameters = {name for name, _ in run.model.named_parameters()}
    t = run.global_step
    for name, average in averages.items():
        decay, statistics_too, warmup = AVERAGES[name]
        decay = min(decay, (1 + t) / (10 + t)) if warmup else decay
        for key, value in state.items():
            if value.is_floating_point() and (key in parameters or statistics_too):
                average[key].lerp_(value.detach(), 1 - decay)
            else:
                average[key].copy_(value)


_step, _finish = train_module._TrainingRun.step, train_module._TrainingRun.finish


def step(self, state, phase_step):
    if not hasattr(self, "averages"):
        self.averages = {name: {k: v.detach().clone() for k, v in self.model.state_dict().items()} for name in AVERAGES}
    _step(self, state, phase_step)
    with torch.no_grad():
        _update(self, self.averages)


def finish(self):
    _finish(self)
    _finished.clear()
    _finished.update({name: {k: v.cpu().contiguous() for k, v in average.items()} for name, average in self.averages.items()})


_evaluate = transfer_study._evaluate


def _scores(model, splits) -> dict[str, float]:
    """Val and test accuracy: plain, and flip-averaged over probabilities and over logits."""
    normalize, scores = Normalizer.of(model.spec.contract), {}
    for split in ("val", "test"):
        x, y = splits.split(split)
        plain = predict_logits(model, x, normalize)
        mirrored = predict_logits(model, np.ascontiguousarray(x[..., ::-1]), normalize)  # N, C, H, W: width flipped
        for name, logits in [("", plain), ("flip probabilities ", plain.softmax(1) + mirrored.softmax(1)),
                             ("flip logits ", plain + mirrored)]:
            scores[f"{name}{split}"] = float((logits.argmax(1).numpy() == y).mean())
    return scores


def evaluate(model, splits, bins):
    result = _evaluate(model, splits, bins)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    result["evaluations"] = {}
    for name, weights in [("trained", trained), *_finished.items()]:
        model.load_state_dict(weights)
        scores = result["evaluations"][name] = _scores(model, splits)
        print(f"  {name:22s} " + "  ".join(f"{key} {value:.4f}" for key, value in scores.items()), flush=True)
    model.load_state_dict(trained)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation_probe.json"))
    parser.add_argument("--no-averages", action="store_true", help="the trained weights only")
    args, study_args = parser.parse_known_args()
    if args.no_averages:
        AVERAGES.clear()
    train_module._TrainingRun.step, train_module._TrainingRun.finish = step, finish
    transfer_study._evaluate = evaluate
    sys.argv = [sys.argv[0], "--seeds", *map(str, args.seeds), "--out", str(args.out), *[a for a in study_args if a != "--"]]
    transfer_study.main()
    runs = json.loads(args.out.read_text())["runs"]
    print("\n| weights | evaluation | " + " | ".join(f"seed {r['seed']} val / test" for r in runs) + " |")
    for name in runs[0]["evaluations"]:
        for way in ("", "flip probabilities ", "flip logits "):
            cells = [(r["evaluations"][name][f"{way}val"], r["evaluations"][name][f"{way}test"]) for r in runs]
            print(f"| {name} | {way.strip() or 'plain'} | " + " | ".join(f"{100 * v:.2f} / {100 * t:.2f}" for v, t in cells) + " |")

if __name__ == "__main__":
    main()
