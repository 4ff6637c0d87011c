"""Source selection: score each candidate's frozen features on the target's training split, before any fine-tuning.

- LogME (You et al. 2021): the log marginal evidence of a Bayesian linear model from features to each one-hot
  label column, maximised over its two precisions by fixed-point iteration, averaged over classes and divided by
  the number of examples. Needs only features and labels.
- LEEP (Nguyen et al. 2020): how well the source classifier's soft predictions, mapped to target labels through
  their empirical joint distribution, predict the target labels (mean log-likelihood).
- NCE (Tran et al. 2019): the negative conditional entropy of target labels given the source's hard predictions.
Higher is better for all three. LEEP and NCE use the source's own classifier, whatever classes it was trained on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from components.artifacts import atomic_path, save_png, write_json
from components.config import SCORES

_LABEL = {"logme": "LogME", "leep": "LEEP", "nce": "NCE"}


def _evidence(singular: np.ndarray, projected: np.ndarray, target_norm2: float, n: int, dims: int,
              iterations: int = 1000) -> tuple[float, float, float]:
    """max over alpha, beta of log p(y | F, alpha, beta) / N for one label column y, by MacKay's fixed point;
    returns (evidence / N, alpha, beta).

    Model: y = F m + noise, m ~ N(0, I / alpha), noise ~ N(0, I / beta). With the thin SVD F = U diag(s) V^T and
    projected = U^T y, the posterior mean lies in F's row space; the D - rank(F) directions without data enter
    only through alpha."""
    s2 = singular**2

    def posterior(alpha: float, beta: float) -> tuple[float, float]:
        coef = beta * singular * projected / (alpha + beta * s2)  # posterior mean m in the basis of V
        residual2 = target_norm2 - float((projected**2).sum()) + float(((projected - singular * coef) ** 2).sum())
        return float((coef**2).sum()), residual2  # ||m||^2, ||y - F m||^2

    alpha, beta = 1.0, 1.0
    for _ in range(iterations):
        m_norm2, residual2 = posterior(alpha, beta)
        gamma = float((beta * s2 / (alpha + beta * s2)).sum())  # the effective number of parameters
        new_alpha, new_beta = gamma / max(m_norm2, 1e-12), (n - gamma) / max(residual2, 1e-12)
        converged = abs(new_alpha - alpha) <= 1e-6 * alpha and abs(new_beta - beta) <= 1e-6 * beta
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    m_norm2, residual2 = posterior(alpha, beta)
    log_det = float(np.log(alpha + beta * s2).sum()) + (dims - len(singular)) * np.log(alpha)
    evidence = (dims / 2 * np.log(alpha) + n / 2 * np.log(beta) - beta / 2 * residual2 - alpha / 2 * m_norm2
                - log_det / 2 - n / 2 * np.log(2 * np.pi))
    return float(evidence / n), alpha, beta


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    f = features.astype(np.float64)
    u, singular, _ = np.linalg.svd(f, full_matrices=False)
    dims = f.shape[1]
    evidences = []
    for label in np.unique(labels):
        target = (labels == label).astype(np.float64)
        evidences.append(_evidence(singular, u.T @ target, float(target @ target), len(target), dims)[0])
    return float(np.mean(evidences))


def _joint(source_probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """P(y, z): target label y, source class z, from N examples' soft source predictions."""
    classes = int(labels.max()) + 1
    joint = np.zeros((classes, source_probabilities.shape[1]))
    np.add.at(joint, labels, source_probabilities)
    return joint / len(labels)


def leep(source_probabilities: np.ndarray, labels: np.ndarray) -> float:
    p = source_probabilities.astype(np.float64)
    joint = _joint(p, labels)
    conditional = joint / np.maximum(joint.sum(0, keepdims=True), 1e-12)  # P(y | z)
    likelihood = (p * conditional[labels]).sum(1)                           # sum_z P(y_i | z) theta(x_i)_z
    return float(np.log(np.maximum(likelihood, 1e-12)).mean())


def nce(source_probabilities: np.ndarray, labels: np.ndarray) -> float:
    hard = np.eye(source_probabilities.shape[1])[source_probabilities.argmax(1)]
    joint = _joint(hard, labels)
    marginal = joint.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(joint / marginal), 0.0)
    return float(terms.sum())


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b between two rankings of the same items (ties count for neither side)."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    denominator = np.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return float((concordant - discordant) / denominator) if denominator else 0.0


@dataclass(frozen=True)
class CandidateScore:
    name: str
    kind: str
    description: str
    image_size: int
    feature_dim: int
    logme: float
    leep: float
    nce: float
    seconds: float


def score_candidate(name: str, kind: str, description: str, image_size: int, features: np.ndarray,
                    source_probabilities: np.ndarray, labels: np.ndarray, seconds: float) -> CandidateScore:
    return CandidateScore(name, kind, description, image_size, features.shape[1], logme(features, labels),
                          leep(source_probabilities, labels), nce(source_probabilities, labels), seconds)


def score_of(score: str, features: np.ndarray, source_probabilities: np.ndarray, labels: np.ndarray) -> float:
    return logme(features, labels) if score == "logme" else globals()[score](source_probabilities, labels)


def lead_share(leader: tuple[np.ndarray, np.ndarray], runner_up: tuple[np.ndarray, np.ndarray], labels: np.ndarray,
               score: str, resamples: int, seed: int) -> float:
    """The share of bootstrap resamples of the training images (both candidates scored on the same draw) in which
    the leader's score stays above the runner-up's: how far the lead is from noise. Each argument pair is a
    candidate's (features, source probabilities)."""
    rng = np.random.default_rng(seed)
    leads = 0
    for _ in range(resamples):
        draw = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[draw])) < 2:
            continue  # a draw of one class scores nothing
        a, b = (score_of(score, f[draw], p[draw], labels[draw]) for f, p in (leader, runner_up))
        leads += a > b
    return leads / resamples


def why_race(candidates: list[CandidateScore], score: str, share: float | None, min_share: float, resamples: int) -> str:
    """Why the scores cannot decide ('' when they can): they name different leaders, or the deciding score's lead
    is within its noise."""
    leaders = {name: max(candidates, key=lambda c: getattr(c, name)).name for name in SCORES}
    if len(set(leaders.values())) > 1:
        return "the scores disagree: " + ", ".join(f"{_LABEL[name]} picks {leader}" for name, leader in leaders.items())
    if share is not None and share < min_share:
        ranked = sorted(candidates, key=lambda c: -getattr(c, score))
        return (f"{ranked[0].name} leads {ranked[1].name} on {_LABEL[score]} in only {share:.0%} of {resamples} "
                f"bootstrap resamples of the training images (within noise; {min_share:.0%} needed)")
    return ""


@dataclass(frozen=True)
class Selection:
    mode: str
    score: str
    chosen: str
    candidates: list[CandidateScore]
    examples: int
    decided_by: str = ""     # the rule that chose, in words
    race: dict | None = None  # components/race.py RaceResult.to_dict(), when a race decided

    def ranking(self) -> list[CandidateScore]:
        """Best first by the deciding score (ties keep the order of params.yaml)."""
        return sorted(self.candidates, key=lambda c: -getattr(c, self.score))

    def to_dict(self) -> dict:
        return {"mode": self.mode, "score": self.score, "chosen": self.chosen, "examples": self.examples,
                "decided_by": self.decided_by, "race": self.race,
                "ranking": [c.name for c in self.ranking()], "candidates": [asdict(c) for c in self.candidates]}

    def markdown(self) -> str:
        rows = [f"## Source selection: {self.chosen} ({self.examples} target training images)", "",
                f"Decided by: {self.decided_by}", "",
                "| rank | candidate | kind | source | size | features | LogME | LEEP | NCE | seconds |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for rank, c in enumerate(self.ranking(), 1):
            name = f"**{c.name}**" if c.name == self.chosen else c.name
            rows.append(f"| {rank} | {name} | {c.kind} | {c.description} | {c.image_size} | {c.feature_dim} | "
                        f"{c.logme:.4f} | {c.leep:.4f} | {c.nce:.4f} | {c.seconds:.1f} |")
        return "\n".join(rows)


def choose_source(candidates: list[CandidateScore], mode: str, score: str, use: str, examples: int) -> Selection:
    """The choice the scores make: the best by `score` (auto), or `use` (report)."""
    selection = Selection(mode, score, "", candidates, examples)
    if mode == "auto":
        return replace(selection, chosen=selection.ranking()[0].name, decided_by=f"best {_LABEL[score]}")
    return replace(selection, chosen=use, decided_by="selection.use (mode: report)")


def write_selection(selection: Selection, report: Path, markdown: Path, plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(report, selection.to_dict())
    with atomic_path(markdown) as tmp:
        tmp.write_text(selection.markdown() + "\n")
    ranked = selection.ranking()
    figure, axes = plt.subplots(1, len(SCORES), figsize=(4 * len(SCORES), 0.5 * len(ranked) + 2))
    for axis, name in zip(axes, SCORES):
        colours = ["tab:green" if c.name == selection.chosen else "tab:gray" for c in ranked]
        axis.barh([c.name for c in ranked], [getattr(c, name) for c in ranked], color=colours)
        axis.invert_yaxis()
        axis.set(title=name + (" (decides)" if name == selection.score else ""), xlabel="higher is better")
        axis.grid(alpha=0.3, axis="x")
    figure.suptitle(f"source candidates on the target's training split; chosen: {selection.chosen}")
    figure.tight_layout()
    save_png(figure, plot)
