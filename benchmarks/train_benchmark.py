"""Training throughput: Graft's loop against a minimal hand-written PyTorch loop, in each precision and layout.

    .venv/bin/python benchmarks/train_benchmark.py                  # ~4 min on 2 cores
    .venv/bin/python benchmarks/train_benchmark.py --models own_resnet --steps 40

For each model (the pipeline's own ResNet at 28 px, batch 128; EfficientNet-Lite0 and torchvision resnet18 at
64 px, batch 32 and 64: the ImageNet architectures the default selects or users pick) and each compute setting
(fp32 / bf16 autocast x NCHW / channels-last), in one process, one after the other:
- minimal: a hand-written loop on the same model, the same batches (indices drawn ahead, already normalised) and
  the same AdamW: forward, cross-entropy, backward, step. The reference.
- graft: `components.train.train` on the same model and data, augmentation off, no evaluation: its overhead.
- graft+augment: the same with the pipeline's augmentation (a random affine warp a batch); the share of its
  step time spent preparing the batch (sampling, augmentation, normalisation) is measured separately.
Every figure is images per second over the timed steps after a warm-up; ratios are within this one run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.compute import Compute
from components.config import Augment, TrainParams
from components.data import Splits
from components.network import ModelSpec, build
from components.predict import Normalizer
from components.augment import augment_batch
from components.train import BatchSampler, Phase, train
from deploy.contract import COLOR_MODES, Contract
from deploy.cpu import cpu_description, cpu_model, speed_flags

MODELS = {  # name: (architecture, channels, size, batch)
    "own_resnet": ("graft_resnet", 1, 28, 128),
    "efficientnet_lite0": ("efficientnet_lite0", 3, 64, 32),
    "resnet18": ("resnet18", 3, 64, 64),
}
SETTINGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def _spec(architecture: str, channels: int, size: int) -> ModelSpec:
    contract = Contract(COLOR_MODES[channels], size, size, (0.5,) * channels, (0.5,) * channels)
    if architecture == "graft_resnet":
        return ModelSpec.own_resnet(tuple(map(str, range(10))), contract, (32, 64, 128))
    return ModelSpec(architecture, tuple(map(str, range(10))), contract, channels, (0.5,) * channels, (0.5,) * channels)


def _data(channels: int, size: int, n: int = 2048) -> Splits:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    empty = np.empty(0, dtype=object)
    return Splits(x, y, x[:0], y[:0], x[:0], y[:0], tuple(map(str, range(10))), empty, empty, empty, "bench")


def minimal_loop(model, data: Splits, batch: int, steps: int, compute: Compute, warmup: int) -> float:
    normalize = Normalizer.of(model.spec.contract)
    generator = torch.Generator().manual_seed(0)
    order = [torch.randint(0, len(data.y_train), (batch,), generator=generator) for _ in range(warmup + steps)]
    x = normalize(torch.from_numpy(data.x_train)).contiguous(memory_format=compute.memory_format)
    y = torch.from_numpy(data.y_train)
    model.to(memory_format=compute.memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i, index in enumerate(order):
        if i == warmup:
            started = time.perf_counter()
        with compute.autocast():
            logits = model(x[index])
        loss = F.cross_entropy(logits.float(), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def graft_loop(model, data: Splits, batch: int, steps: int, compute: Compute, warmup: int, augment: Augment) -> float:
    params = TrainParams(batch_size=batch, optimizer="adamw", lr=1e-3, weight_decay=0.0, augment=augment,
                         eval_every_steps=10**9)
    train(model, data, params, [Phase("warmup", warmup, 1.0)], 0, desc="warm-up", compute=compute)
    started = time.perf_counter()
    train(model, data, params, [Phase("timed", steps, 1.0)], 0, desc="timed", compute=compute)
    return steps * batch / (time.perf_counter() - started)


def batch_preparation_seconds(data: Splits, batch: int, steps: int, augment: Augment, normalize: Normalizer) -> float:
    """What the loop does before the forward pass: sample, gather, augment, normalise."""
    generator = torch.Generator().manual_seed(0)
    sampler = BatchSampler(len(data.y_train), batch, generator)
    x = torch.from_numpy(data.x_train)
    started = time.perf_counter()
    for _ in range(steps):
        normalize(augment_batch(normalize.scaled(x[sampler.next()]), augment, generator))
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="bf16 only where the CPU has bf16 units: elsewhere it is emulated, 9-10x slower")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_benchmark.json"))
    args = parser.parse_args()
    augment = Augment(flip=True, rotate_degrees=10.0, scale=(0.9, 1.1), shift_pixels=2)
    results = {"cpu": cpu_model(), "flags": speed_flags(), "threads": torch.get_num_threads(), "steps": args.steps, "rows": []}
    print(f"{cpu_description()}, {results['threads']} threads; images/s over {args.steps} steps\n")
    print("| model | batch | compute | minimal loop | graft loop | graft / minimal | graft + augmentation | batch preparation share |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        architecture, channels, size, batch = MODELS[name]
        data, spec = _data(channels, size), _spec(architecture, channels, size)
        prep = batch_preparation_seconds(data, batch, 10, augment, Normalizer.of(spec.contract))
        for precision, channels_last in [setting for setting in SETTINGS if setting[0] in args.precisions]:
            compute = Compute("cpu", precision, channels_last, "benchmark")
            minimal = minimal_loop(build(spec, 0), data, batch, args.steps, compute, args.warmup)
            graft = graft_loop(build(spec, 0), data, batch, args.steps, compute, args.warmup, Augment())
            augmented = graft_loop(build(spec, 0), data, batch, args.steps, compute, args.warmup, augment)
            share = prep / (batch / augmented)
            row = {"model": name, "batch": batch, "precision": precision, "channels_last": channels_last,
                   "minimal": minimal, "graft": graft, "graft_augment": augmented, "preparation_share": share}
            results["rows"].append(row)
            layout = "channels-last" if channels_last else "NCHW"
            print(f"| {name} | {batch} | {precision} {layout} | {minimal:.0f} | {graft:.0f} | {graft / minimal:.2f} | "
                  f"{augmented:.0f} | {100 * share:.0f}% |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
