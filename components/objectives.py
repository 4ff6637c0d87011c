"""Extra terms of the training objective, each fed by its own stream of images (components/train.py).

The loop forwards the labelled batch and every term's batch together through the shared backbone (one
BatchNorm batch, as TLlib does), takes the target loss on the labelled part and hands each term its slice of
the features:

  min_f  L_T(f) + lambda(t) * L_S(f) + Omega(f)                 (Omega: components/tuning.py)

- SourceObjective: model-based transfer with the joint objective. The target model keeps training on the
  source's labelled data through the source's own head (shared backbone), weighted by lambda(t) (constant, or
  decaying to 0). With instance weights (instance-based transfer) each source example's loss counts
  w(x) ~ p_T(x) / p_S(x), from a domain classifier on the frozen source features, clipped and normalised to
  mean 1; or, the class-level variant, only the source classes whose features lie nearest the target's are kept.
- Alignment: feature-based transfer (domain adaptation) toward unlabelled target images: Deep CORAL (Sun and
  Saenko 2016), multi-kernel MMD (DAN, Long et al. 2015) or DANN's adversarial domain classifier behind a
  gradient reversal layer (Ganin et al. 2016).
- FixMatch (Sohn et al. 2020): semi-supervised learning from unlabelled target images. The model's answer on a
  weak view of an image, where its top probability reaches a threshold, is the label the strong view of the same
  image is trained toward; the weak view takes no gradient.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.augment import augment_batch
from components.config import AdaptationParams, JointParams, SemiSupervisedParams
from components.data import Splits
from components.errors import GraftError


class ObjectiveError(GraftError, ValueError):
    """An objective cannot be built from what the project holds; the message says what to change."""


class Term:
    """One extra term: its own uint8 pixels, batches of `batch_size` drawn from `pool` (the loop samples them with
    its generator), the views of a batch that go through the backbone, and the loss it makes of their features."""

    name = "term"
    views_per_image = 1

    def __init__(self, pixels: np.ndarray, batch_size: int, about: dict | None = None) -> None:
        self.pixels = torch.from_numpy(pixels)
        self.batch_size = batch_size
        self.about = about or {}  # where its images came from, for the run record
        self.modules = nn.ModuleList()  # what the term trains besides the model (a head, a discriminator)

    @property
    def pool(self) -> int | torch.Tensor:
        """What batches are drawn from: every image (their count), or the indices of some."""
        return len(self.pixels)

    def views(self, scaled: torch.Tensor, augmented: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`views_per_image` views of a batch, stacked view by view: by default the loop's augmentation of it.
        `scaled`: the same images unaugmented (floats in [0, 1]); `generator`: the loop's, for any further draw."""
        return augmented

    def loss(self, index: torch.Tensor, features: torch.Tensor, labelled_features: torch.Tensor,
             progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def summary(self) -> dict:
        """What a run record should keep about this term (weights, ESS, its images)."""
        return {"term": self.name, **self.about}


def schedule_factor(schedule: str, progress: float) -> float:
    """lambda(t) / lambda: constant 1, or decaying from 1 to 0 over training (linear or half a cosine)."""
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


# ---------------------------------------------------------------- instance weights


@dataclass(frozen=True)
class InstanceWeights:
    weights: np.ndarray                 # one per source example, mean 1 over the examples kept
    kept: np.ndarray                    # indices into the source pool with weight > 0
    effective_sample_size: float        # (sum w)^2 / sum w^2 over the kept examples
    details: dict = field(default_factory=dict)

    def summary(self) -> dict:
        w = self.weights[self.kept]
        return {"examples": int(len(self.weights)), "kept": int(len(self.kept)),
                "effective_sample_size": round(self.effective_sample_size, 1),
                "weight_min": round(float(w.min()), 4), "weight_max": round(float(w.max()), 4), **self.details}


def _standardise(source: np.ndarray, target: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    both = np.concatenate([source, target])
    mean, std = both.mean(0), both.std(0) + 1e-6
    return torch.from_numpy((source - mean) / std).float(), torch.from_numpy((target - mean) / std).float()


def _ess(weights: np.ndarray) -> float:
    return float(weights.sum() ** 2 / (weights ** 2).sum())


def domain_weights(source_features: np.ndarray, target_features: np.ndarray, clip: float, l2: float = 1e-2,
                   steps: int = 200) -> InstanceWeights:
    """w(x) ~ p_T(x) / p_S(x) from a logistic domain classifier on frozen features.

    The classifier is fitted with both domains weighted equally, so its odds p/(1-p) estimate the density ratio
    whatever the domains' sizes; the odds are clipped at `clip` times their median (a few examples must not
    take the whole source loss) and normalised to mean 1."""
    source, target = _standardise(source_features, target_features)
    x = torch.cat([source, target])
    y = torch.cat([torch.zeros(len(source)), torch.ones(len(target))])
    balance = torch.cat([torch.full((len(source),), 0.5 / len(source)), torch.full((len(target),), 0.5 / len(target))])
    weight, bias = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x @ weight + bias, y, reduction="none") * balance).sum() + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        logits = source @ weight + bias
        accuracy = 0.5 * float((logits < 0).float().mean()) + 0.5 * float((target @ weight + bias > 0).float().mean())
    odds = np.exp(np.clip(logits.numpy().astype(np.float64), -30, 30))
    odds = np.minimum(odds, clip * np.median(odds))
    weights = odds / odds.mean()
    kept = np.arange(len(weights))
    return InstanceWeights(weights, kept, _ess(weights), {"domain_classifier_accuracy": round(accuracy, 4)})


def class_weights(source_features: np.ndarray, source_labels: np.ndarray, target_features: np.ndarray,
                  target_labels: np.ndarray, keep: int) -> InstanceWeights:
    """The class-level variant: keep the `keep` source classes whose mean feature lies nearest a target class's
    mean feature (standardised features); every kept example weighs the same."""
    source, target = (t.numpy() for t in _standardise(source_features, target_features))
    source_classes, target_classes = np.unique(source_labels), np.unique(target_labels)
    if keep > len(source_classes):
        raise ObjectiveError(f"finetune.joint.keep_classes is {keep}, but the source has {len(source_classes)} classes")
    source_means = np.stack([source[source_labels == c].mean(0) for c in source_classes])
    target_means = np.stack([target[target_labels == c].mean(0) for c in target_classes])
    distance = np.linalg.norm(source_means[:, None] - target_means[None], axis=2).min(1)
    nearest = source_classes[np.argsort(distance, kind="stable")[:keep]]
    mask = np.isin(source_labels, nearest)
    weights = mask.astype(np.float64)
    kept = np.flatnonzero(mask)
    return InstanceWeights(weights, kept, _ess(weights[kept]), {"kept_classes": [int(c) for c in sorted(nearest)]})


# ---------------------------------------------------------------- the joint objective


class SourceObjective(Term):
    """lambda(t) * L_S: the source's labelled data through the source's own head, optionally instance-weighted."""

    name = "source"

    def __init__(self, params: JointParams, pixels: np.ndarray, labels: np.ndarray, source_head: nn.Module,
                 weights: InstanceWeights | None) -> None:
        super().__init__(pixels, params.batch_size)
        self.params = params
        self.labels = torch.from_numpy(labels)
        self.modules.append(source_head)
        self.instance_weights = weights
        self.example_weights = torch.from_numpy(weights.weights).float() if weights else None
        self.kept = torch.from_numpy(weights.kept) if weights else None

    @property
    def pool(self) -> int | torch.Tensor:
        return super().pool if self.kept is None else self.kept

    def loss(self, index, features, labelled_features, progress):
        logits = self.modules[0](features)
        labels = self.labels[index].to(features.device)
        per_example = F.cross_entropy(logits, labels, reduction="none")
        if self.example_weights is not None:
            per_example = per_example * self.example_weights[index].to(features.device)
        source_loss = per_example.mean()
        weight = self.params.weight * schedule_factor(self.params.schedule, progress)
        return weight * source_loss, {"source_loss": source_loss.item(),
                                      "source_accuracy": (logits.argmax(1) == labels).float().mean().item()}

    def summary(self) -> dict:
        return {**super().summary(), "weight": self.params.weight, "schedule": self.params.schedule,
                "instance_weights": self.params.instance_weights, "source_examples": int(len(self.pixels)),
                **({"weights": self.instance_weights.summary()} if self.instance_weights else {})}


def require_source_data(source: str, kind: str, pipeline_sources: list[str], asked_by: str, turn_off: str) -> None:
    """The joint objective trains on the source's own labelled data: only a pipeline source has it in the project."""
    if kind != "pipeline":
        raise ObjectiveError(
            f"{asked_by} needs the source's own labelled data, and the selected source {source} is pretrained elsewhere "
            f"(no data in this project); select a pipeline source (selection.mode: report, selection.use: "
            f"{', '.join(pipeline_sources) or 'a sources.pipeline entry'}) or {turn_off}")


def joint_term(params: JointParams, source: Splits, target: Splits, source_head: nn.Module,
               featurize: Callable[[np.ndarray], np.ndarray], seed: int) -> SourceObjective:
    """The source term for a model just grafted from the source: a seeded pool of the source's training images,
    a trainable copy of the source's head, and the instance weights asked for (on the frozen source features,
    so computed before any fine-tuning)."""
    if source.x_train.shape[1:] != target.x_train.shape[1:]:
        raise ObjectiveError(
            f"finetune.joint: the source's images are {tuple(source.x_train.shape[1:])} (channels, height, width) and the "
            f"target's {tuple(target.x_train.shape[1:])}; the joint objective needs both in the same colour mode and size "
            "(a pipeline source with the target's data.channels), or finetune.joint.weight: 0")
    pool = np.arange(len(source.y_train))
    if params.source_examples is not None and params.source_examples < len(pool):
        pool = np.sort(np.random.default_rng(seed).choice(pool, params.source_examples, replace=False))
    pixels, labels = source.x_train[pool], source.y_train[pool]
    weights = None
    if params.instance_weights == "domain":
        weights = domain_weights(featurize(pixels), featurize(target.x_train), params.clip)
    elif params.instance_weights == "class":
        weights = class_weights(featurize(pixels), labels, featurize(target.x_train), target.y_train, params.keep_classes)
    return SourceObjective(params, pixels, labels, copy.deepcopy(source_head), weights)


# ---------------------------------------------------------------- domain adaptation


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL: the squared Frobenius distance of the two feature covariances, / 4 d^2."""
    d = source.shape[1]

    def covariance(x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(0, keepdim=True)
        return centred.T @ centred / max(1, len(x) - 1)

    return (covariance(source) - covariance(target)).pow(2).sum() / (4 * d * d)


def mmd(source: torch.Tensor, target: torch.Tensor, bandwidth_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    """Squared maximum mean discrepancy with a sum of Gaussian kernels (DAN's multi-kernel MMD), bandwidths
    around the batch's mean squared distance."""
    x = torch.cat([source, target])
    distances = torch.cdist(x, x).pow(2)
    base = distances.detach().sum() / (len(x) ** 2 - len(x))
    kernel = sum(torch.exp(-distances / (base * factor)) for factor in bandwidth_factors)
    n = len(source)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float) -> torch.Tensor:
    return _ReverseGradient.apply(x, coefficient)


def dann_coefficient(progress: float) -> float:
    """DANN's ramp for the reversed gradient: 0 at the start (the features are not yet worth confusing), 1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


class Alignment(Term):
    """Pull the labelled batch's features and unlabelled target images' features together."""

    def __init__(self, params: AdaptationParams, unlabeled: np.ndarray, features: int, seed: int,
                 about: dict | None = None) -> None:
        super().__init__(unlabeled, params.batch_size, about)
        self.params = params
        self.name = params.method
        if params.method == "dann":
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.modules.append(nn.Sequential(nn.Linear(features, params.hidden), nn.ReLU(), nn.Linear(params.hidden, 1)))

    def loss(self, index, features, labelled_features, progress):
        source, target = labelled_features.flatten(1), features.flatten(1)
        if self.params.method == "coral":
            distance = coral(source, target)
            return self.params.weight * distance, {"coral": distance.item()}
        if self.params.method == "mmd":
            distance = mmd(source, target)
            return self.params.weight * distance, {"mmd": distance.item()}
        # The domain classifier always learns at full strength; `weight` (ramped up) is how hard the features
        # are pushed, through the reversed gradient, to make the domains indistinguishable.
        both = reverse_gradient(torch.cat([source, target]), self.params.weight * dann_coefficient(progress))
        logits = self.modules[0](both).squeeze(1)
        domains = torch.cat([torch.zeros(len(source)), torch.ones(len(target))]).to(features.device)
        domain_loss = F.binary_cross_entropy_with_logits(logits, domains)
        return domain_loss, {"domain_loss": domain_loss.item(),
                             "domain_accuracy": ((logits > 0).float() == domains).float().mean().item()}

    def summary(self) -> dict:
        return {**super().summary(), "weight": self.params.weight, "unlabeled_examples": int(len(self.pixels))}


# ---------------------------------------------------------------- semi-supervised learning


class FixMatch(Term):
    """L_u = (1/B) sum 1[max p(y|weak) >= threshold] CE(argmax p(y|weak), p(y|strong)), weighted by lambda_u. The
    weak view is the loop's own augmentation (finetune.augment), the strong one strong_augment of the same image;
    both go through the backbone with the labelled batch (one BatchNorm batch), and through the model's head."""

    name = "fixmatch"
    views_per_image = 2

    def __init__(self, params: SemiSupervisedParams, unlabeled: np.ndarray, head: nn.Module, about: dict | None = None) -> None:
        super().__init__(unlabeled, params.batch_size, about)
        self.params = params
        self.head = head  # the model's own head: the loop's optimizer trains it already, so not one of self.modules

    def views(self, scaled, augmented, generator):
        return torch.cat([augmented, augment_batch(scaled, self.params.strong_augment, generator)])

    def loss(self, index, features, labelled_features, progress):
        weak, strong = features.flatten(1).chunk(2)
        with torch.no_grad():
            confidence, pseudo_labels = F.softmax(self.head(weak), dim=1).max(1)
            mask = (confidence >= self.params.threshold).float()
        per_image = F.cross_entropy(self.head(strong), pseudo_labels, reduction="none")
        unlabeled_loss = (per_image * mask).mean()
        return self.params.weight * unlabeled_loss, {"fixmatch_loss": unlabeled_loss.item(), "fixmatch_mask": mask.mean().item()}

    def summary(self) -> dict:
        return {**super().summary(), "weight": self.params.weight, "threshold": self.params.threshold,
                "unlabeled_examples": int(len(self.pixels))}
