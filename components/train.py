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
from collections.abc import Callable
from dataclasses import dataclass, field
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
from components.augment import augment_batch
from components.balance import balanced_pass, describe, is_balanced, loss_weights
from components.config import EarlyStopping, FinetuneParams, TrainParams
from components.data import Splits
from components.evaluate import balanced_accuracy
from components.network import GraftNet
from components.objectives import Term
from components.predict import Normalizer, predict_logits
from components.tuning import Tuning


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


class BatchSampler:
    """Endless full batches from shuffled passes over the data, reproducible from its generator. `pool`: the
    number of examples (indices 0..n-1), or the indices to draw from."""

    def __init__(self, pool: int | torch.Tensor, batch_size: int, generator: torch.Generator,
                 balance_by: torch.Tensor | None = None) -> None:
        self.pool = pool if isinstance(pool, torch.Tensor) else None
        self.balance_by = balance_by  # labels of 0..n-1: each pass then draws every class equally often
        self.size = len(pool) if isinstance(pool, torch.Tensor) else pool
        self.batch_size, self.generator = batch_size, generator
        self.queue = torch.empty(0, dtype=torch.long)
        self.epochs_started = 0

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.batch_size:
            if self.balance_by is not None:
                order = balanced_pass(self.balance_by, self.generator)
            else:
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
    # fused: one kernel over every parameter instead of a loop per tensor (EfficientNet-Lite0's 151 tensors on the
    # CPU: AdamW 1.8 ms a step against 6.7, SGD 1.2 against 3.5; CUDA has it too)
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=params.momentum, nesterov=params.momentum > 0,
                               weight_decay=params.weight_decay, fused=True)
    return torch.optim.AdamW(groups, weight_decay=params.weight_decay, fused=True)


def evaluate_split(model: nn.Module, x: np.ndarray, y: np.ndarray, normalize: Normalizer) -> dict[str, float]:
    logits = predict_logits(model, x, normalize)
    labels, predicted = torch.from_numpy(y), logits.argmax(1)
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float((predicted == labels).float().mean()),
        "balanced_accuracy": balanced_accuracy(y, predicted.numpy(), logits.shape[1]),
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


@dataclass
class _RunningSums:
    """What a history record averages: the labelled examples' loss and hits since the last record, and the sum of
    each term metric's per-step value."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    terms: dict[str, float] = field(default_factory=dict)

    def add_terms(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.terms[key] = self.terms.get(key, 0.0) + value

    def add_batch(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += loss.item() * len(labels)
        self.correct += int((logits.argmax(1) == labels).sum())
        self.seen += len(labels)

    def as_list(self) -> list:
        """As a resume point keeps them."""
        return [self.loss, self.correct, self.seen, self.terms]


@dataclass
class _PhaseState:
    """A phase under way: its optimizer and schedule (new each phase), the running sums since the last record, and
    the replica over the parameters that train now."""

    index: int
    phase: Phase
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    sums: _RunningSums
    first_step: int  # > 0 when the phase continues from a resume point
    replica: nn.Module


class EarlyStopper:
    """The val split's metric at each evaluation (TrainParams.early_stopping): a copy of the weights at the best one
    so far, and when `patience` evaluations in a row have not improved on it, the word to stop: never before
    `min_steps`, nor in an earlier phase than the last (stopping there would skip fine-tuning altogether)."""

    def __init__(self, rules: EarlyStopping) -> None:
        self.rules = rules
        self.best: dict | None = None  # the best evaluation's record
        self.weights: dict[str, torch.Tensor] | None = None  # the model's at that evaluation
        self.stale = 0  # evaluations since it

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        best, delta = self.best[self.rules.metric], self.rules.min_delta
        return value < best - delta if self.rules.metric == "val_loss" else value > best + delta

    def update(self, model: nn.Module, record: dict, last_phase: bool) -> bool:
        """One evaluation's record taken; True when training should stop now."""
        if self._better(record[self.rules.metric]):
            self.best, self.stale = record, 0
            self.weights = {key: value.detach().clone() for key, value in model.state_dict().items()}
            return False
        self.stale += 1
        return last_phase and self.stale >= self.rules.patience and record["step"] >= self.rules.min_steps

    def restore(self, model: nn.Module, step: int) -> dict:
        """The best evaluation's weights put back; the history record that says so: the best evaluation's val metrics
        at the step training ended, with the step they come from (restored_step)."""
        model.load_state_dict(self.weights)
        return {**{key: value for key, value in self.best.items() if key.startswith("val_")},
                "step": step, "epoch": self.best["epoch"], "phase": "restored", "restored_step": self.best["step"]}

    def state(self) -> dict:
        return {"best": self.best, "weights": self.weights, "stale": self.stale}

    def load(self, state: dict) -> None:
        self.best, self.weights, self.stale = state["best"], state["weights"], state["stale"]


def _deterministic_torch() -> None:
    """The same seed gives the same weights, which is also what lets a resumed run end as an uninterrupted one."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Filling every new tensor with NaN only helps find reads of uninitialised memory; it cost 25% of a
    # training step on CPU (EfficientNet-Lite0 @64, same losses either way).
    torch.utils.deterministic.fill_uninitialized_memory = False


class _TrainingRun:
    """One call of `train`: what it sets up once (model and terms on the device, the seeded generator and the
    samplers drawing from it), and what moves on over the phases: the global step and the history."""

    def __init__(self, model: GraftNet, data: Splits, params: TrainParams, phases: list[Phase], seed: int, desc: str,
                 resume: Resume | None, tuning: Tuning, terms: tuple[Term, ...], compute: Compute) -> None:
        self.group = distributed.current()
        if terms and self.group.world_size > 1:
            raise distributed.DistributedError("the extra terms of the objective train in one process; set compute.processes: 1")
        self.model, self.data, self.params, self.desc = model, data, params, desc
        self.resume, self.tuning, self.terms, self.compute = resume, tuning, terms, compute
        _deterministic_torch()
        _set_batchnorm_momentum(model, params.bn_momentum)
        print(f"{desc}: training on {compute.describe()}", file=sys.stderr)
        model.to(compute.device, memory_format=compute.memory_format)
        for term in terms:
            term.modules.to(compute.device)
        self.scaler = torch.amp.GradScaler(compute.device, enabled=compute.precision == "fp16")  # fp16 only: bf16 has fp32's range
        self.forward = _Forward(model, compute.features(model))
        self.generator = torch.Generator().manual_seed(seed)
        self.normalize = Normalizer.of(model.spec.contract)
        self.x_train, self.y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
        resample = params.class_balance == "resample" and not is_balanced(self.y_train, len(data.classes))
        self.sampler = BatchSampler(len(self.y_train), params.batch_size, self.generator,
                                    balance_by=self.y_train if resample else None)
        weights = loss_weights(self.y_train, len(data.classes)) if params.class_balance == "reweight" else None
        self.class_weights = None if weights is None else weights.to(compute.device)
        if balance := describe(params.class_balance, self.y_train, data.classes):
            print(f"{desc}: {balance}", file=sys.stderr)
        self.term_samplers = [BatchSampler(term.pool, term.batch_size, self.generator) for term in terms]
        self.steps_per_epoch = math.ceil(len(self.y_train) / params.batch_size)
        self.eval_every = params.eval_every_steps or self.steps_per_epoch
        self.total = sum(phase.steps for phase in phases)
        self.global_step = 0
        self.history: list[dict] = []
        self.stopper = EarlyStopper(params.early_stopping) if params.early_stopping.enabled else None
        if self.stopper and not len(data.y_val):
            raise ValueError(f"{desc}: early_stopping watches the val split, and this data has none: give it one "
                             f"(data.target.val_size) or set early_stopping.enabled: false")
        if self.stopper and self.group.world_size > 1:
            raise distributed.DistributedError("early stopping trains in one process (only the first evaluates); set "
                                               "compute.processes: 1 or early_stopping.enabled: false")

    def restore(self) -> dict | None:
        """Continue from this run's resume point, if there is one; returns it, for its phase to continue from too."""
        saved = self.resume.load() if self.resume else None
        if not saved:
            return None
        self.model.load_state_dict(saved["model"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        self.sampler.queue, self.sampler.epochs_started = saved["queue"], saved["epochs_started"]
        self.history, self.global_step = saved["history"], saved["global_step"]
        if "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])
        for term, term_sampler, term_state in zip(self.terms, self.term_samplers, saved.get("terms", ())):
            term.modules.load_state_dict(term_state["modules"])
            term_sampler.queue = term_state["queue"]
        if self.stopper and "early_stopping" in saved:
            self.stopper.load(saved["early_stopping"])
        print(f"{self.desc}: resuming from step {self.global_step} of {self.total} ({self.resume.path})", file=sys.stderr)
        return saved

    def start_phase(self, index: int, phase: Phase, saved: dict | None) -> _PhaseState:
        """A fresh optimizer and schedule for the phase, or, with `saved`, theirs where the resume point left them."""
        optimizer = _optimizer(self.model, self.params, phase, self.tuning, self.terms)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(phase.steps, self.params.warmup_fraction))
        sums, first_step = _RunningSums(), 0
        if saved:
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            sums, first_step = _RunningSums(*saved["running"]), saved["step"]
        state = _PhaseState(index, phase, optimizer, schedule, sums, first_step, self.set_modes(phase, first_step))
        for term in self.terms:
            term.modules.train()
        return state

    def set_modes(self, phase: Phase, phase_step: int) -> nn.Module:
        """Sets which blocks train (and in which BatchNorm mode) at this step of the phase; returns a replica over
        them."""
        self.tuning.set_modes(self.model, phase.backbone_lr_scale is not None, phase_step)
        return _replica(self.forward, self.group, self.compute.device)

    def next_batch(self) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The labelled batch's indices, each term's batch of indices, and the augmented pixels of all of them (each
        term's as many views of its images as it asks for); across processes, this process's slice of the labelled
        indices and of the pixels."""
        index = self.sampler.next()
        term_batches = [term_sampler.next() for term_sampler in self.term_samplers]
        scaled = self.normalize.scaled(torch.cat([self.x_train[index], *(term.pixels[batch] for term, batch in zip(self.terms, term_batches))]))
        pixels = augment_batch(scaled, self.params.augment, self.generator)
        if self.terms:
            views, start = [pixels[: len(index)]], len(index)
            for term, batch in zip(self.terms, term_batches):
                end = start + len(batch)
                views.append(term.views(scaled[start:end], pixels[start:end], self.generator))
                start = end
            pixels = torch.cat(views)
        if self.group.world_size > 1:  # the whole batch was drawn and augmented, so every generator stays in step
            index, pixels = distributed.shard(index, self.group), distributed.shard(pixels, self.group)
        return index, term_batches, pixels

    def objective(self, all_features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                  term_batches: list[torch.Tensor], sums: _RunningSums) -> torch.Tensor:
        """The labelled batch's loss, the regulariser's penalty, and each term's loss on the features of its own
        batch's views (which follow the labelled batch's in `all_features`); the terms' metrics go into `sums`."""
        features = all_features[: len(labels)]
        loss = F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=self.params.label_smoothing)
        if self.tuning.regularizer is not None:
            loss = loss + self.tuning.regularizer.penalty(self.model, features)
        start = len(labels)
        for term, batch in zip(self.terms, term_batches):
            end = start + len(batch) * term.views_per_image
            term_loss, term_metrics = term.loss(batch, all_features[start:end], features, self.global_step / self.total)
            start = end
            loss = loss + term_loss
            sums.add_terms(term_metrics)
        return loss

    def step(self, state: _PhaseState, phase_step: int) -> None:
        """One optimisation step on the next batch."""
        if self.tuning.unfreeze_every_steps and phase_step % self.tuning.unfreeze_every_steps == 0:
            state.replica = self.set_modes(state.phase, phase_step)
        index, term_batches, pixels = self.next_batch()
        inputs = self.compute.images_to_device(self.normalize(pixels))
        labels = self.y_train[index].to(self.compute.device, non_blocking=True)
        with self.compute.autocast():
            all_features, logits = state.replica(inputs, len(index))
        # Losses, penalties and the terms (small heads, feature statistics) in fp32.
        all_features, logits = all_features.float(), logits.float()
        loss = self.objective(all_features, logits, labels, term_batches, state.sums)
        state.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(state.optimizer)
        self.scaler.update()
        state.schedule.step()
        self.global_step += 1
        state.sums.add_batch(loss, logits, labels)

    def record_due(self, state: _PhaseState, phase_step: int) -> bool:
        return self.global_step % self.eval_every == 0 or phase_step == state.phase.steps - 1

    def record(self, state: _PhaseState, phase_step: int) -> dict:
        """Appends a history record: the running means since the last one (over every process), and the val
        split's loss and accuracy (evaluated by the writer); the running sums start again."""
        loss, correct, seen = distributed.sum_across([state.sums.loss, state.sums.correct, state.sums.seen], self.group)
        evaluates = self.group.writer and len(self.data.y_val)
        val = evaluate_split(self.model, self.data.x_val, self.data.y_val, self.normalize) if evaluates else {}
        # Each term metric is a per-step value and every labelled batch holds `batch_size` examples (terms train
        # in one process): sum * batch_size / seen is its mean over the steps.
        record = {
            "step": self.global_step,
            "epoch": round(self.global_step / self.steps_per_epoch, 3),
            "phase": state.phase.name,
            "lr": state.optimizer.param_groups[0]["lr"],
            "train_loss": loss / seen,
            "train_accuracy": correct / seen,
            **{key: total_value * self.params.batch_size / seen for key, total_value in state.sums.terms.items()},
            **{f"val_{k}": v for k, v in val.items()},
        }
        self.history.append(record)
        state.sums = _RunningSums()
        state.replica = self.set_modes(state.phase, phase_step + 1)  # evaluation left the model in eval mode
        return record

    def resume_point_due(self) -> bool:
        return bool(self.resume and self.resume.every_steps and self.global_step % self.resume.every_steps == 0
                    and self.group.writer)

    def save_resume_point(self, state: _PhaseState, phase_step: int) -> None:
        """Everything an interrupted run needs to end exactly as an uninterrupted one, after `phase_step`."""
        self.resume.save({
            "model": self.model.state_dict(), "optimizer": state.optimizer.state_dict(), "schedule": state.schedule.state_dict(),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(), "queue": self.sampler.queue,
            "epochs_started": self.sampler.epochs_started, "history": self.history, "global_step": self.global_step,
            "phase": state.index, "step": phase_step + 1,
            "running": state.sums.as_list(),
            "terms": [{"modules": term.modules.state_dict(), "queue": term_sampler.queue}
                      for term, term_sampler in zip(self.terms, self.term_samplers)],
            "scaler": self.scaler.state_dict(),
            **({"early_stopping": self.stopper.state()} if self.stopper else {}),
        })

    def finish(self) -> None:
        """With early stopping, the best evaluation's weights back (said in the history); model and terms back on
        the CPU, fp32 and contiguous, in eval mode."""
        if self.stopper and self.stopper.weights is not None:
            self.history.append(self.stopper.restore(self.model, self.global_step))
        self.model.to("cpu", memory_format=torch.contiguous_format)
        for term in self.terms:
            term.modules.to("cpu")
        self.model.eval()


def train(
    model: GraftNet, data: Splits, params: TrainParams, phases: list[Phase], seed: int, desc: str = "train",
    resume: Resume | None = None, tuning: Tuning = Tuning(), terms: tuple[Term, ...] = (), compute: Compute = FP32_CPU,
    on_evaluation: Callable[[dict], None] | None = None,
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
    accuracy of whole batches.

    With params.early_stopping on, training stops once the val split has not improved for `patience` evaluations
    (in the last phase, past `min_steps`) and the weights of the best evaluation are restored; the history's last
    record (phase "restored") has that evaluation's val metrics and its step (restored_step).

    `on_evaluation` sees each evaluation's record as it is made (`graft tune` reports it to its pruner, which may
    end the run by raising)."""
    run = _TrainingRun(model, data, params, phases, seed, desc, resume, tuning, terms, compute)
    saved = run.restore()
    first_phase = saved["phase"] if saved else 0
    stop = False
    with tqdm(total=run.total, initial=run.global_step, desc=desc, unit="step", mininterval=1.0, disable=not run.group.writer) as bar:
        for index, phase in enumerate(phases[first_phase:], first_phase):
            state = run.start_phase(index, phase, saved if index == first_phase else None)
            for phase_step in range(state.first_step, phase.steps):
                run.step(state, phase_step)
                bar.update(1)
                if run.record_due(state, phase_step):
                    record = run.record(state, phase_step)
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_acc=f"{record.get('val_accuracy', float('nan')):.3f}")
                    if on_evaluation is not None:
                        on_evaluation(record)
                    stop = run.stopper is not None and run.stopper.update(run.model, record, index == len(phases) - 1)
                if run.resume_point_due():
                    run.save_resume_point(state, phase_step)
                if stop:
                    print(f"{desc}: early stopping at step {run.global_step}: val {params.early_stopping.metric} has not "
                          f"improved for {params.early_stopping.patience} evaluations; the weights of step "
                          f"{run.stopper.best['step']} are kept", file=sys.stderr)
                    break
            if stop:
                break
    run.finish()
    return run.history
