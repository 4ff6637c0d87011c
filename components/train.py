"""One training loop for pretraining and fine-tuning; strategies are lists of small phases.

A phase says how many steps to train and how the backbone takes part: frozen (its BatchNorm statistics in
eval mode too), or trainable at a multiple of the head's learning rate. What grafting added (the head, and a
learned channel adapter) always trains at the head's rate. `scratch`, `linear_probe`, `finetune` and `lp_ft`
are one or two phases each; pretraining is one phase on the source data. Inputs are normalised exactly as the
model's preprocessing contract says (deploy/contract.py).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.deterministic
from torch import nn
from tqdm import tqdm

from components import distributed
from components.artifacts import atomic_path
from components.compute import FP32_CPU, Compute
from components.config import Augment, FinetuneParams, TrainParams
from components.data import Splits
from components.model import GraftNet
from components.objectives import Term
from components.tuning import Tuning
from deploy.contract import Contract


@dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    backbone_lr_scale: float | None  # None: the backbone is frozen


def strategy_phases(params: FinetuneParams, strategy: str | None = None) -> list[Phase]:
    strategy = strategy or params.strategy
    if strategy == "scratch":
        return [Phase("scratch", params.steps, 1.0)]
    if strategy == "linear_probe":
        return [Phase("linear_probe", params.steps, None)]
    if strategy == "finetune":
        return [Phase("finetune", params.steps, params.backbone_lr_scale)]
    if strategy == "lp_ft":
        return [Phase("linear_probe", params.lp_steps, None), Phase("finetune", params.steps - params.lp_steps, params.backbone_lr_scale)]
    raise ValueError(f"finetune.strategy: unknown strategy {strategy!r}; allowed: scratch, linear_probe, finetune, lp_ft")


@dataclass(frozen=True)
class Normalizer:
    """The contract's scaling and normalisation, on torch tensors."""

    scale: float
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, contract: Contract) -> Normalizer:
        return cls(contract.scale, torch.tensor(contract.mean).view(1, -1, 1, 1), torch.tensor(contract.std).view(1, -1, 1, 1))

    def scaled(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float32 in the contract's pixel scale (what augmentation works on)."""
        return pixels.float() * self.scale

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W), or already scaled floats -> normalised float32."""
        if pixels.dtype == torch.uint8:
            pixels = self.scaled(pixels)
        return (pixels - self.mean) / self.std


def augment_batch(pixels: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random flip, rotation, scale and shift, one affine warp per image (pixels are floats in [0, 1])."""
    n, _, height, width = pixels.shape
    if not (augment.flip or augment.rotate_degrees or augment.shift_pixels or augment.scale != (1.0, 1.0)):
        return pixels

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = torch.deg2rad(uniform(-augment.rotate_degrees, augment.rotate_degrees))
    scale = uniform(*augment.scale)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if augment.flip else torch.ones(n)
    shift_x = uniform(-augment.shift_pixels, augment.shift_pixels) * 2 / width
    shift_y = uniform(-augment.shift_pixels, augment.shift_pixels) * 2 / height
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class BatchSampler:
    """Endless full batches from shuffled passes over the data, reproducible from its generator. `pool`: the
    number of examples (indices 0..n-1), or the indices to draw from."""

    def __init__(self, pool: int | torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.pool = pool if isinstance(pool, torch.Tensor) else None
        self.size = len(pool) if isinstance(pool, torch.Tensor) else pool
        self.batch_size, self.generator = batch_size, generator
        self.queue = torch.empty(0, dtype=torch.long)
        self.epochs_started = 0

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.batch_size:
            order = torch.randperm(self.size, generator=self.generator)
            self.queue = torch.cat([self.queue, order if self.pool is None else self.pool[order]])
            self.epochs_started += 1
        batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        return batch


@dataclass(frozen=True)
class Resume:
    """Where a training run keeps its resume point, how often it writes it, and the run's identity (params,
    phases, seed, data): a resume point of another run is never used."""

    path: Path
    every_steps: int
    key: str

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - an unreadable resume point only costs the steps it saved
            print(f"ignoring the unreadable resume point {self.path} ({type(error).__name__}); training from step 0", file=sys.stderr)
            return None
        return state if state.get("key") == self.key else None

    def save(self, state: dict) -> None:
        with atomic_path(self.path) as tmp:  # a kill while saving leaves the previous resume point whole
            torch.save({**state, "key": self.key}, tmp)


def warmup_cosine(total_steps: int, warmup_fraction: float):
    warmup = max(1, round(total_steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _optimizer(model: GraftNet, params: TrainParams, phase: Phase, tuning: Tuning,
               terms: tuple[Term, ...] = ()) -> torch.optim.Optimizer:
    term_parameters = [p for term in terms for p in term.modules.parameters()]
    groups = [{"params": model.new_parameters() + tuning.new_parameters(model) + term_parameters, "lr": params.lr}]
    if phase.backbone_lr_scale is not None:
        groups += tuning.backbone_groups(model, params.lr * phase.backbone_lr_scale)
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=params.momentum, nesterov=params.momentum > 0, weight_decay=params.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=params.weight_decay)


def _batches(model: nn.Module, x: np.ndarray, normalize: Normalizer, batch_size: int):
    """Normalised fp32 batches of x on the model's device."""
    device = next(model.parameters()).device
    for i in range(0, len(x), batch_size):
        yield normalize(torch.from_numpy(x[i : i + batch_size])).to(device)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, normalize: Normalizer, batch_size: int = 512) -> torch.Tensor:
    """fp32 logits on the CPU, whatever device the model is on."""
    model.eval()
    chunks = [model(batch).cpu() for batch in _batches(model, x, normalize, batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0)


@torch.no_grad()
def predict_features(model: GraftNet, x: np.ndarray, normalize: Normalizer, batch_size: int = 512) -> np.ndarray:
    """The backbone's output (what the head sees), in eval mode, float32 (N, D)."""
    model.eval()
    return torch.cat([model.features(batch).flatten(1).cpu() for batch in _batches(model, x, normalize, batch_size)]).numpy()


def evaluate_split(model: nn.Module, x: np.ndarray, y: np.ndarray, normalize: Normalizer) -> dict[str, float]:
    logits = predict_logits(model, x, normalize)
    labels = torch.from_numpy(y)
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((logits.argmax(1) == labels).float().mean()),
    }


def _set_batchnorm_momentum(model: nn.Module, momentum: float | None) -> None:
    """Some ImageNet architectures ship BatchNorm momenta for a million steps (EfficientNet-Lite 0.01, MnasNet
    0.0003): over a few hundred steps their running statistics would stay stale and evaluation collapse."""
    if momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = momentum


class _Forward(nn.Module):
    """What a training step runs forward, the backbone (compiled or not) and the head, as one module: the unit
    DistributedDataParallel wraps to average the gradients of every process."""

    def __init__(self, model: GraftNet, features_of) -> None:
        super().__init__()
        self.model, self.features_of = model, features_of

    def forward(self, inputs: torch.Tensor, labelled: int) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features_of(inputs)
        return features, self.model.head(features[:labelled])


def _replica(forward: _Forward, group: distributed.Group, device: str) -> nn.Module:
    """`forward` itself in one process; across processes, a DDP wrapper over the parameters that train now (built
    again whenever that set changes: DDP registers its gradient hooks once, on what requires grad)."""
    if group.world_size == 1:
        return forward
    return nn.parallel.DistributedDataParallel(forward, device_ids=[group.local_rank] if device == "cuda" else None)


def train(
    model: GraftNet, data: Splits, params: TrainParams, phases: list[Phase], seed: int, desc: str = "train",
    resume: Resume | None = None, tuning: Tuning = Tuning(), terms: tuple[Term, ...] = (), compute: Compute = FP32_CPU,
) -> list[dict]:
    """Train in place; returns the history: one record per evaluation on the val split. `tuning` says how a phase
    that trains the backbone treats it (regulariser, layer-wise lr decay, gradual unfreezing, BatchNorm mode).
    Each of `terms` adds its own batch to every step's forward pass and a loss on that batch's features (the
    joint objective's source data, or unlabelled target images to align to: components/objectives.py); its
    running means (source loss, domain accuracy, ...) go into the history beside the target's.

    With `resume`, every `resume.every_steps` steps the whole state (model, optimizer, schedule, both random
    generators, the sampler's queue, history and running sums) is saved; a run killed part-way continues from
    there and ends exactly as an uninterrupted run would.

    `compute` says where and in what precision (components/compute.py): the model and each term's modules move
    there for training and come back to the CPU, fp32 and contiguous, at the end.

    Started as one of N processes (components/distributed.py), every process draws the same batches and
    augmentation, trains on its slice of each batch and DDP averages the gradients; only the first process
    evaluates, shows progress and saves resume points, and the history it returns has the train loss and
    accuracy of whole batches."""
    group = distributed.current()
    if terms and group.world_size > 1:
        raise distributed.DistributedError("the extra terms of the objective train in one process; set compute.processes: 1")
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Filling every new tensor with NaN only helps find reads of uninitialised memory; it cost 25% of a
    # training step on CPU (EfficientNet-Lite0 @64, same losses either way).
    torch.utils.deterministic.fill_uninitialized_memory = False
    _set_batchnorm_momentum(model, params.bn_momentum)
    print(f"{desc}: training on {compute.describe()}", file=sys.stderr)
    model.to(compute.device, memory_format=compute.memory_format)
    for term in terms:
        term.modules.to(compute.device)
    scaler = torch.amp.GradScaler(compute.device, enabled=compute.precision == "fp16")  # fp16 only: bf16 has fp32's range
    forward = _Forward(model, compute.features(model))
    generator = torch.Generator().manual_seed(seed)
    normalize = Normalizer.of(model.spec.contract)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    sampler = BatchSampler(len(y_train), params.batch_size, generator)
    term_samplers = [BatchSampler(term.pool, term.batch_size, generator) for term in terms]
    steps_per_epoch = math.ceil(len(y_train) / params.batch_size)
    eval_every = params.eval_every_steps or steps_per_epoch
    history: list[dict] = []
    global_step = 0
    total = sum(p.steps for p in phases)
    saved = resume.load() if resume else None
    if saved:
        model.load_state_dict(saved["model"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        sampler.queue, sampler.epochs_started = saved["queue"], saved["epochs_started"]
        history, global_step = saved["history"], saved["global_step"]
        if "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        for term, term_sampler, state in zip(terms, term_samplers, saved.get("terms", ())):
            term.modules.load_state_dict(state["modules"])
            term_sampler.queue = state["queue"]
        print(f"{desc}: resuming from step {global_step} of {total} ({resume.path})", file=sys.stderr)
    with tqdm(total=total, initial=global_step, desc=desc, unit="step", mininterval=1.0, disable=not group.writer) as bar:
        for phase_index, phase in enumerate(phases):
            if saved and phase_index < saved["phase"]:
                continue
            optimizer = _optimizer(model, params, phase, tuning, terms)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(phase.steps, params.warmup_fraction))
            backbone_trains = phase.backbone_lr_scale is not None
            running_loss, running_correct, running_seen, running_terms = 0.0, 0, 0, {}
            first_step = 0
            if saved and phase_index == saved["phase"]:
                optimizer.load_state_dict(saved["optimizer"])
                schedule.load_state_dict(saved["schedule"])
                running_loss, running_correct, running_seen, running_terms = saved["running"]
                first_step = saved["step"]
            tuning.set_modes(model, backbone_trains, first_step)
            replica = _replica(forward, group, compute.device)
            for term in terms:
                term.modules.train()
            for step in range(first_step, phase.steps):
                if tuning.unfreeze_every_steps and step % tuning.unfreeze_every_steps == 0:
                    tuning.set_modes(model, backbone_trains, step)
                    replica = _replica(forward, group, compute.device)
                index = sampler.next()
                term_batches = [term_sampler.next() for term_sampler in term_samplers]
                pixels = torch.cat([x_train[index], *(term.pixels[batch] for term, batch in zip(terms, term_batches))])
                pixels = augment_batch(normalize.scaled(pixels), params.augment, generator)
                if group.world_size > 1:  # the whole batch was drawn and augmented, so every generator stays in step
                    index, pixels = distributed.shard(index, group), distributed.shard(pixels, group)
                inputs = compute.images_to_device(normalize(pixels))
                labels = y_train[index].to(compute.device, non_blocking=True)
                with compute.autocast():
                    all_features, logits = replica(inputs, len(index))
                # Losses, penalties and the terms (small heads, feature statistics) in fp32.
                all_features, logits = all_features.float(), logits.float()
                features = all_features[: len(index)]
                loss = F.cross_entropy(logits, labels, label_smoothing=params.label_smoothing)
                if tuning.regularizer is not None:
                    loss = loss + tuning.regularizer.penalty(model, features)
                start = len(index)
                for term, batch in zip(terms, term_batches):
                    term_loss, term_metrics = term.loss(batch, all_features[start : start + len(batch)], features,
                                                        global_step / total)
                    start += len(batch)
                    loss = loss + term_loss
                    for key, value in term_metrics.items():
                        running_terms[key] = running_terms.get(key, 0.0) + value
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                global_step += 1
                running_loss += loss.item() * len(index)
                running_correct += int((logits.argmax(1) == labels).sum())
                running_seen += len(index)
                bar.update(1)
                if global_step % eval_every == 0 or step == phase.steps - 1:
                    running_loss, running_correct, running_seen = distributed.sum_across(
                        [running_loss, running_correct, running_seen], group)
                    evaluates = group.writer and len(data.y_val)
                    val = evaluate_split(model, data.x_val, data.y_val, normalize) if evaluates else {}
                    record = {
                        "step": global_step,
                        "epoch": round(global_step / steps_per_epoch, 3),
                        "phase": phase.name,
                        "lr": optimizer.param_groups[0]["lr"],
                        "train_loss": running_loss / running_seen,
                        "train_accuracy": running_correct / running_seen,
                        **{key: total_value * len(index) / running_seen for key, total_value in running_terms.items()},
                        **{f"val_{k}": v for k, v in val.items()},
                    }
                    history.append(record)
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{record.get('val_accuracy', float('nan')):.3f}")
                    running_loss, running_correct, running_seen, running_terms = 0.0, 0, 0, {}
                    tuning.set_modes(model, backbone_trains, step + 1)
                    replica = _replica(forward, group, compute.device)
                if resume and resume.every_steps and global_step % resume.every_steps == 0 and group.writer:
                    resume.save({
                        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "queue": sampler.queue,
                        "epochs_started": sampler.epochs_started, "history": history, "global_step": global_step,
                        "phase": phase_index, "step": step + 1,
                        "running": [running_loss, running_correct, running_seen, running_terms],
                        "terms": [{"modules": term.modules.state_dict(), "queue": term_sampler.queue}
                                  for term, term_sampler in zip(terms, term_samplers)],
                        "scaler": scaler.state_dict(),
                    })
    model.to("cpu", memory_format=torch.contiguous_format)
    for term in terms:
        term.modules.to("cpu")
    model.eval()
    return history
