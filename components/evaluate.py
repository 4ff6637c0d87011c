"""Evaluate: accuracy, balanced accuracy, macro-F1, per-class precision/recall/F1/support, the classification report
and a confusion matrix on the test split."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from components.artifacts import atomic_path, save_png  # noqa: E402
from components.columns import display_width, right  # noqa: E402


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    balanced_accuracy: float  # the mean of the classes' recalls: every class counts the same, whatever its share
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]

    def summary(self) -> dict[str, float]:
        """Flat metrics, for DVC metrics files and MLflow (support is a count of the data, not a score)."""
        flat = {"accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy, "macro_f1": self.macro_f1}
        for name, scores in self.per_class.items():
            flat.update({f"{metric}_{name}": value for metric, value in scores.items() if metric in SCORE_NAMES})
        return flat


SCORE_NAMES = ("precision", "recall", "f1")


def classification_report(per_class: dict[str, dict[str, float]], accuracy: float, digits: int = 3) -> str:
    """Per class precision, recall, F1 and support, then accuracy and the macro and support-weighted averages:
    the table the reference texts (and scikit-learn) print."""
    width = max(len("weighted avg"), *(display_width(name) for name in per_class))
    header = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"
    row = lambda name, p, r, f, n: f"{right(name, width)} {p:>9.{digits}f} {r:>9.{digits}f} {f:>9.{digits}f} {n:>9d}"  # noqa: E731
    supports = np.array([scores["support"] for scores in per_class.values()], dtype=float)
    total = int(supports.sum())
    lines = [header, ""]
    lines += [row(name, s["precision"], s["recall"], s["f1"], int(s["support"])) for name, s in per_class.items()]
    columns = {metric: np.array([s[metric] for s in per_class.values()]) for metric in SCORE_NAMES}
    weights = supports / max(1.0, supports.sum())
    lines += ["", f"{'accuracy':>{width}} {'':>9} {'':>9} {accuracy:>9.{digits}f} {total:>9d}",
              row("macro avg", *(float(columns[m].mean()) for m in SCORE_NAMES), total),
              row("weighted avg", *(float((columns[m] * weights).sum()) for m in SCORE_NAMES), total)]
    return "\n".join(lines) + "\n"


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _recall(matrix: np.ndarray) -> np.ndarray:
    """Each class's share of its images predicted as it (0 for a class the split does not hold)."""
    true_positive, actual = np.diag(matrix).astype(float), matrix.sum(1)
    return np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """The mean recall over the classes the split holds: accuracy as if every class were as large as the largest, so
    that predicting the large classes more often earns nothing (an objective for unequal classes: tune.objective,
    early_stopping.metric)."""
    return _balanced(confusion_matrix(y_true, y_pred, n_classes))


def _balanced(matrix: np.ndarray) -> float:
    held = matrix.sum(1) > 0
    return float(_recall(matrix)[held].mean()) if held.any() else 0.0


def score(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...]) -> Evaluation:
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    true_positive = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(0), matrix.sum(1)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = _recall(matrix)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(actual[i])}
        for i, name in enumerate(classes)
    }
    return Evaluation(
        accuracy=float(true_positive.sum() / max(1, matrix.sum())),
        balanced_accuracy=_balanced(matrix),
        macro_f1=float(f1.mean()),
        per_class=per_class,
        confusion=matrix.tolist(),
    )


def plot_confusion(evaluation: Evaluation, classes: tuple[str, ...], title: str, path: Path) -> Path:
    matrix = np.array(evaluation.confusion)
    size = max(5.0, 0.55 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
             title=f"{title}\naccuracy {evaluation.accuracy:.3f}, macro-F1 {evaluation.macro_f1:.3f}")
    axis.set_xticklabels(classes, rotation=45, ha="right")
    axis.set_yticklabels(classes)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        axis.text(col, row, str(count), ha="center", va="center", fontsize=8, color="white" if count > threshold else "black")
    figure.tight_layout()
    return save_png(figure, path)


def plot_curves(histories: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Train loss and val accuracy against step, one line per model; a star where early stopping kept the weights
    of an earlier evaluation (the history's "restored" record)."""
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in histories.items():
        evaluations = [r for r in history if r["phase"] != "restored"]
        steps = [r["step"] for r in evaluations]
        loss_axis.plot(steps, [r["train_loss"] for r in evaluations], label=label)
        if evaluations and "val_accuracy" in evaluations[0]:
            (line,) = accuracy_axis.plot(steps, [r["val_accuracy"] for r in evaluations], label=label)
            for kept in (r for r in history if r["phase"] == "restored"):
                accuracy_axis.plot(kept["restored_step"], kept["val_accuracy"], marker="*", markersize=12,
                                   color=line.get_color(), linestyle="none",
                                   label=f"{label}: kept, step {kept['restored_step']:g} (early stopping)")
    loss_axis.set(xlabel="step", ylabel="train loss", title="train loss")
    accuracy_axis.set(xlabel="step", ylabel="val accuracy", title="val accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return save_png(figure, path)


def write_predictions(y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...], path: Path) -> Path:
    """actual,predicted class names per test example: DVC's confusion-matrix plot reads this."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[t], classes[p]) for t, p in zip(y_true, y_pred))
    return path


def write_history(history: list[dict], path: Path) -> Path:
    keys = list(dict.fromkeys(k for record in history for k in record))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    return path


def read_history(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [{k: (v if k == "phase" else float(v)) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]
