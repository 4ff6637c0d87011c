"""Class imbalance in the labelled training split (`class_balance` of the training loop's params).

With a few images of one class against many of another, plain cross-entropy learns the large classes' prior: the
small class is rarely predicted. Two standard remedies, each a no-op on a balanced split (so a balanced run is
bit-identical with either set):
- reweight: the loss of an example of class c weighted by n / (K * n_c) (scikit-learn's "balanced" weights);
- resample: each pass over the data draws every class as often as the largest one (small classes repeated).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from components.config import ClassBalance


def class_counts(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=classes)


def is_balanced(labels: torch.Tensor, classes: int) -> bool:
    counts = class_counts(labels, classes)
    return bool((counts == counts[0]).all())


def loss_weights(labels: torch.Tensor, classes: int) -> torch.Tensor | None:
    """Each class's weight in the loss, n / (K * n_c); None where the split is balanced (every weight would be 1).
    A class without examples gets weight 0: it contributes no loss either way."""
    if is_balanced(labels, classes):
        return None
    counts = class_counts(labels, classes).double()
    weights = torch.where(counts > 0, len(labels) / (classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.float()


def balanced_pass(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One shuffled pass in which every class present appears as often as the largest: each class's examples in a
    random order, repeated whole as often as fits and then cut, so no example of a class is drawn twice more often
    than another of the same class."""
    members = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    largest = max(len(m) for m in members)
    drawn = [m[torch.randperm(len(m), generator=generator)].repeat(math.ceil(largest / len(m)))[:largest] for m in members]
    everything = torch.cat(drawn)
    return everything[torch.randperm(len(everything), generator=generator)]


def describe(mode: ClassBalance, labels: torch.Tensor, classes: Sequence[str]) -> str | None:
    """A line for the training log on unequal class sizes and what the loop does about them; None when they are
    equal (nothing to say)."""
    counts = class_counts(labels, len(classes)).tolist()
    largest, smallest = max(counts), min(counts)
    if largest == smallest:
        return None
    sizes = (f"{smallest} to {largest} labelled images a class ({classes[counts.index(smallest)]} smallest, "
             f"{largest / max(smallest, 1):.1f}:1)")
    if mode == "none":
        return f"{sizes}; class_balance: none (reweight or resample would even them)"
    return f"{sizes}; class_balance: {mode}"
