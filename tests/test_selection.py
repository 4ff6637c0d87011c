"""Transferability scores: LogME against its closed form, LEEP and NCE at their extremes, the choice."""
import numpy as np
import pytest

from components.race import successive_halving
from components.selection import (
    CandidateScore,
    _evidence,
    choose_source,
    kendall_tau,
    lead_share,
    leep,
    logme,
    nce,
    why_race,
)


def _log_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """log N(target; 0, I / beta + F F^T / alpha) / N, computed directly."""
    n = len(target)
    covariance = np.eye(n) / beta + features @ features.T / alpha
    _, log_det = np.linalg.slogdet(covariance)
    return float(-0.5 * (target @ np.linalg.solve(covariance, target) + log_det + n * np.log(2 * np.pi)) / n)


@pytest.mark.parametrize("n,d", [(60, 12), (25, 70)])  # more examples than features, and fewer (as with 10 labels a class)
def test_logme_evidence_is_the_closed_form_at_its_maximum(n, d):
    rng = np.random.default_rng(n)
    features, target = rng.normal(size=(n, d)), (rng.random(n) < 0.3).astype(float)
    u, singular, _ = np.linalg.svd(features, full_matrices=False)
    evidence, alpha, beta = _evidence(singular, u.T @ target, float(target @ target), n, d)
    assert evidence == pytest.approx(_log_evidence(features, target, alpha, beta), abs=1e-9)
    for scale_alpha, scale_beta in ((1.5, 1), (0.67, 1), (1, 1.5), (1, 0.67)):
        assert _log_evidence(features, target, alpha * scale_alpha, beta * scale_beta) < evidence


def test_logme_prefers_features_that_separate_the_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 20)
    noise = rng.normal(size=(100, 32))
    separating = noise + 3 * np.eye(32)[labels]
    assert logme(separating, labels) > logme(noise, labels)


def test_leep_and_nce_of_a_perfect_and_a_useless_source():
    labels = np.repeat(np.arange(4), 10)
    perfect = np.eye(6)[labels]                      # source class = target class, certain
    useless = np.full((40, 6), 1 / 6)
    assert nce(perfect, labels) == pytest.approx(0.0) and leep(perfect, labels) == pytest.approx(0.0, abs=1e-9)
    assert leep(useless, labels) == pytest.approx(np.log(1 / 4))
    assert nce(useless, labels) == pytest.approx(np.log(1 / 4))  # every hard prediction is class 0: H(Y | Z) = H(Y)


def test_kendall_tau():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


def _candidate(name, logme_value, leep_value):
    return CandidateScore(name, "pretrained", "", 32, 8, logme_value, leep_value, leep_value, 0.1)


def test_auto_picks_the_best_score_and_report_keeps_the_users_choice():
    candidates = [_candidate("a", -0.9, -2.0), _candidate("b", -0.5, -3.0), _candidate("c", -0.7, -1.0)]
    auto = choose_source(candidates, "auto", "logme", "a", 50)
    assert auto.chosen == "b" and [c.name for c in auto.ranking()] == ["b", "c", "a"]
    by_leep = choose_source(candidates, "auto", "leep", "a", 50)
    assert by_leep.chosen == "c" and [c.name for c in by_leep.ranking()] == ["c", "a", "b"]
    report = choose_source(candidates, "report", "logme", "a", 50)
    assert report.chosen == "a" and report.to_dict()["ranking"] == ["b", "c", "a"]
    assert "| 3 | **a** |" in report.markdown()


def test_the_scores_decide_only_when_they_agree_beyond_their_noise():
    agree = [_candidate("a", -0.5, -1.0), _candidate("b", -0.9, -2.0)]
    assert why_race(agree, "logme", share=1.0, min_share=0.95, resamples=30) == ""
    assert why_race(agree, "logme", share=0.6, min_share=0.95, resamples=30) == (
        "a leads b on LogME in only 60% of 30 bootstrap resamples of the training images (within noise; 95% needed)")
    disagree = [_candidate("a", -0.5, -2.0), _candidate("b", -0.9, -1.0)]
    assert why_race(disagree, "logme", share=1.0, min_share=0.95, resamples=30) == (
        "the scores disagree: LogME picks a, LEEP picks b, NCE picks b")


def test_a_clear_lead_holds_in_every_resample_and_a_tie_in_none():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 20)
    noise = rng.normal(size=(100, 32))
    probabilities = np.full((100, 3), 1 / 3)
    separating = (noise + 3 * np.eye(32)[labels], probabilities)
    assert lead_share(separating, (noise, probabilities), labels, "logme", 20, seed=0) == 1.0
    assert lead_share((noise, probabilities), (noise, probabilities), labels, "logme", 20, seed=0) == 0.0, "a tie is no lead"


def test_successive_halving_keeps_the_better_half_at_twice_the_steps():
    skill = {"a": 0.5, "b": 0.9, "c": 0.7, "d": 0.1}
    calls = []

    def fine_tune(name, steps):
        calls.append((name, steps))
        return skill[name] * min(1.0, steps / 20)

    result = successive_halving(["a", "b", "c", "d"], fine_tune, first_steps=5, budget_seconds=3600)
    assert result.winner == "b" and not result.stopped_by_budget
    assert [(r.steps, list(r.accuracy)) for r in result.rungs] == [(5, ["b", "c", "a", "d"]), (10, ["b", "c"])]
    assert calls == [("a", 5), ("b", 5), ("c", 5), ("d", 5), ("b", 10), ("c", 10)]
    tied = successive_halving(["x", "y"], lambda name, steps: 0.5, first_steps=5, budget_seconds=3600)
    assert tied.winner == "x", "a tie keeps the scores' order"


def test_the_race_stops_at_the_budget_and_the_last_rung_decides():
    now = [0.0]

    def fine_tune(name, steps):
        now[0] += steps  # a step costs a second
        return {"a": 0.2, "b": 0.4, "c": 0.3}[name]

    result = successive_halving(["a", "b", "c"], fine_tune, first_steps=10, budget_seconds=40, clock=lambda: now[0])
    assert result.stopped_by_budget and result.winner == "b" and len(result.rungs) == 1, "the next rung would end at 70 s"
    assert "stopped by the time budget" in result.summary()
