"""Calibration: a model's probabilities made to mean what they say, and measured.

Temperature scaling (Guo et al., 2017): one scalar T > 0 divides the logits, fitted by minimising the negative
log-likelihood on the validation split (never the test split). It changes no prediction (argmax is unchanged) and
cannot overfit a small validation split the way a per-class or histogram method can. The exported model carries it
folded into its classifier, so every probability the server answers, captures and monitors is the calibrated one.

How calibrated, on the test split: expected calibration error (top-class confidence in equal-width bins, the
support-weighted mean |accuracy - confidence| over bins), NLL, and the multi-class Brier score; a reliability
diagram draws the bins before and after.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from components.artifacts import save_png  # noqa: E402
from components.network import GraftNet  # noqa: E402

# The search interval of 1/T: a model this over- or under-confident is not fixed by one scalar.
INVERSE_TEMPERATURE_RANGE = (0.01, 100.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / temperature)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_normaliser = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float((log_normaliser - scaled[np.arange(len(labels)), labels]).mean())


def separated(logits: np.ndarray, labels: np.ndarray) -> bool:
    """Whether every row's true class has the largest logit (a tie included). Then NLL keeps falling as T -> 0 and
    has no minimum: the split says only "sharper is better", which a model right on every image of a split has not
    earned."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return bool((logits[rows, labels] >= others.max(axis=1)).all())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising NLL(softmax(logits / T)). NLL is convex in 1/T, so a golden-section search over 1/T finds the
    minimum to float precision, deterministically and without a learning rate. A minimum at the interval's edge
    stops there. Logits that are `separated` have no minimum to find (the search would stop wherever NLL underflows
    to 0, sharpening by an arbitrary factor): T stays 1."""
    if len(labels) == 0:
        raise ValueError("no validation images to fit the temperature on")
    if separated(logits, labels):
        return 1.0
    golden = (np.sqrt(5) - 1) / 2
    low, high = np.log(INVERSE_TEMPERATURE_RANGE[0]), np.log(INVERSE_TEMPERATURE_RANGE[1])

    def loss(log_beta: float) -> float:
        return nll(logits, labels, float(np.exp(-log_beta)))

    a, b = high - golden * (high - low), low + golden * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(80):  # the interval shrinks 0.618x a step: 80 steps reach 1e-16 of its width
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - golden * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + golden * (high - low)
            loss_b = loss(b)
    return float(np.exp(-(low + high) / 2))


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-class confidence in `len(counts)` equal-width bins over (0, 1]: per bin its count, mean confidence and
    accuracy (NaN where empty)."""

    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @classmethod
    def of(cls, probabilities: np.ndarray, labels: np.ndarray, bins: int) -> ReliabilityBins:
        confidence = probabilities.max(axis=1)
        correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
        # (lo, hi]: 0.2 falls in (0.1, 0.2], also when a softmax rounds it to 0.2000000000000001
        index = np.clip(np.ceil(confidence * bins - 1e-9).astype(int) - 1, 0, bins - 1)
        counts = np.bincount(index, minlength=bins)
        with np.errstate(invalid="ignore"):
            mean_confidence = np.bincount(index, confidence, bins) / counts
            accuracy = np.bincount(index, correct, bins) / counts
        return cls(counts, mean_confidence, accuracy)

    @property
    def ece(self) -> float:
        filled = self.counts > 0
        weights = self.counts[filled] / self.counts.sum()
        return float((weights * np.abs(self.accuracy[filled] - self.confidence[filled])).sum())


@dataclass(frozen=True)
class CalibrationScores:
    ece: float
    nll: float
    brier: float
    mean_confidence: float
    accuracy: float

    @classmethod
    def of(cls, logits: np.ndarray, labels: np.ndarray, temperature: float, bins: int) -> CalibrationScores:
        probabilities = softmax(logits, temperature)
        one_hot = np.eye(probabilities.shape[1])[labels]
        return cls(ece=ReliabilityBins.of(probabilities, labels, bins).ece, nll=nll(logits, labels, temperature),
                   brier=float(((probabilities - one_hot) ** 2).sum(axis=1).mean()),
                   mean_confidence=float(probabilities.max(axis=1).mean()),
                   accuracy=float((probabilities.argmax(axis=1) == labels).mean()))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def with_temperature(model: GraftNet, temperature: float) -> GraftNet:
    """A copy of `model` whose logits are divided by `temperature`, folded into the classifier's weights and bias (no
    extra operator: the exported graph, its INT8 and FP16 variants run exactly the network they ran), its contract
    stating the temperature."""
    calibrated = copy.deepcopy(model)
    with torch.no_grad():
        calibrated.head.weight.div_(temperature)
        calibrated.head.bias.div_(temperature)
    calibrated.spec = replace(model.spec, contract=replace(model.spec.contract, temperature=temperature))
    return calibrated


def plot_reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, bins: int, title: str, path: Path) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal is perfect calibration."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    edges = np.linspace(0, 1, bins + 1)
    for axis, (label, t) in zip(axes, (("uncalibrated (T = 1)", 1.0), (f"temperature scaled (T = {temperature:.3g})", temperature))):
        reliability = ReliabilityBins.of(softmax(logits, t), labels, bins)
        filled = reliability.counts > 0
        axis.bar(edges[:-1][filled], reliability.accuracy[filled], width=1 / bins, align="edge", edgecolor="black",
                 color="tab:blue", alpha=0.75, label="accuracy in the bin")
        axis.bar(edges[:-1][filled], reliability.confidence[filled] - reliability.accuracy[filled],
                 bottom=reliability.accuracy[filled], width=1 / bins, align="edge", color="tab:red", alpha=0.35,
                 hatch="//", label="gap to its mean confidence")
        axis.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-class probability)",
                 title=f"{label}\nECE {reliability.ece:.4f}, NLL {nll(logits, labels, t):.4f}")
        axis.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel("accuracy")
    figure.suptitle(title)
    figure.tight_layout()
    return save_png(figure, path)
