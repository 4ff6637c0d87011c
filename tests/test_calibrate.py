"""Calibration: the temperature fit, ECE / NLL / Brier against hand-worked values, the temperature folded into the
exported file (what the server's softmax answers is PyTorch's calibrated softmax), and the calibration gate."""
import numpy as np
import pytest
import torch

from components.calibrate import (CalibrationScores, ReliabilityBins, fit_temperature, nll, separated, softmax,
                                  with_temperature)
from components.export import export_onnx
from components.gates import FAILED, PASSED, SKIPPED, calibration_gate
from components.network import build
from components.predict import Normalizer
from components.settings import GateParams
from deploy.model import load_model, softmax as served_softmax
from tests.conftest import tiny_spec


def _overconfident(scale: float, examples: int = 3000, classes: int = 5, seed: int = 0):
    """Labels drawn from softmax(z): z is calibrated by construction, and `scale` * z is over-confident by `scale`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (examples, classes))
    p = softmax(z)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return scale * z, labels


def test_the_fitted_temperature_undoes_over_confidence_and_lowers_nll():
    logits, labels = _overconfident(4.0)
    temperature = fit_temperature(logits, labels)
    assert 3.3 < temperature < 4.8  # the scale the logits were blown up by, up to sampling noise
    assert nll(logits, labels, temperature) < 0.7 * nll(logits, labels)
    # The fit is the minimum: a little either side is worse.
    assert nll(logits, labels, temperature) < min(nll(logits, labels, temperature * 0.9), nll(logits, labels, temperature * 1.1))
    before, after = (CalibrationScores.of(logits, labels, t, bins=15) for t in (1.0, temperature))
    assert after.ece < before.ece / 2 and after.brier < before.brier and after.accuracy == before.accuracy


def test_an_under_confident_model_gets_a_temperature_below_one():
    logits, labels = _overconfident(0.5)
    assert 0.4 < fit_temperature(logits, labels) < 0.6


def test_a_model_right_on_every_validation_image_keeps_t_at_one():
    # Every true class on top: NLL keeps falling as T -> 0, so the split has no temperature to give.
    logits, labels = _overconfident(4.0, examples=400)
    labels = logits.argmax(axis=1)
    tied = logits.copy()  # a true class only tied for the top: NLL still falls towards log(2) / rows as T -> 0
    tied[0, (labels[0] + 1) % logits.shape[1]] = tied[0, labels[0]]
    for rows in (logits, tied):
        assert separated(rows, labels)
        assert nll(rows, labels, 0.25) < nll(rows, labels, 0.5) < nll(rows, labels)
        assert fit_temperature(rows, labels) == 1.0
    # One wrong answer gives NLL a minimum again: a real fit, sharper than 1 for a model right on all the others.
    wrong = labels.copy()
    wrong[0] = (labels[0] + 1) % logits.shape[1]
    assert not separated(logits, wrong)
    temperature = fit_temperature(logits, wrong)
    assert temperature < 1.0
    assert nll(logits, wrong, temperature) < min(nll(logits, wrong, temperature * 0.9), nll(logits, wrong, temperature * 1.1))


def test_the_fit_refuses_an_empty_validation_split():
    with pytest.raises(ValueError, match="no validation images"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_ece_nll_and_brier_equal_hand_worked_values():
    # Five answers, five bins of width 0.2. Top confidences (true class first when right):
    # 0.9 right, 0.9 wrong -> bin (0.8, 1]: accuracy 0.5, confidence 0.9, gap 0.4, weight 2/5
    # 0.5 right           -> bin (0.4, 0.6]: accuracy 1, confidence 0.5, gap 0.5, weight 1/5
    # 0.7 right, 0.8 wrong -> bin (0.6, 0.8] (0.8 is its upper edge): accuracy 0.5, confidence 0.75, gap 0.25, weight 2/5
    # ECE = 0.4 * 0.4 + 0.2 * 0.5 + 0.4 * 0.25 = 0.36
    probabilities = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.7, 0.2, 0.1], [0.8, 0.1, 0.1]])
    labels = np.array([0, 1, 0, 0, 2])
    bins = ReliabilityBins.of(probabilities, labels, bins=5)
    assert bins.counts.tolist() == [0, 0, 1, 2, 2]
    assert bins.ece == pytest.approx(0.36)
    scores = CalibrationScores.of(np.log(probabilities), labels, 1.0, bins=5)  # softmax(log p) = p
    assert scores.ece == pytest.approx(0.36)
    assert scores.nll == pytest.approx(-np.log([0.9, 0.05, 0.5, 0.7, 0.1]).mean())
    # Brier: sum over classes of (p - one-hot)^2, averaged: 0.015, 1.715, 0.38, 0.14, 1.46
    assert scores.brier == pytest.approx(np.mean([0.015, 1.715, 0.38, 0.14, 1.46]))
    assert scores.mean_confidence == pytest.approx(0.76) and scores.accuracy == pytest.approx(0.6)


def test_the_exported_file_answers_pytorchs_calibrated_softmax(tmp_path):
    model = build(tiny_spec(tuple("abcde")), 0).eval()
    with torch.no_grad():  # a confident head, so that the temperature visibly changes the probabilities
        model.head.weight.mul_(50)
    calibrated = with_temperature(model, 2.5)
    path = export_onnx(calibrated, tmp_path / "model.onnx", 20)
    served = load_model(path, providers=["cpu"])
    assert served.contract.temperature == 2.5  # the contract in the file states it
    pixels = np.random.default_rng(0).integers(0, 256, (16, 1, 28, 28), dtype=np.uint8)
    inputs = Normalizer.of(model.spec.contract)(torch.from_numpy(pixels))
    with torch.no_grad():
        expected = torch.softmax(model(inputs) / 2.5, 1).numpy()
        uncalibrated = torch.softmax(model(inputs), 1).numpy()
    got = served_softmax(served.run(inputs.numpy()))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(uncalibrated - expected).max() > 0.05  # the check above could tell the two apart
    assert (got.argmax(1) == uncalibrated.argmax(1)).all()  # a temperature changes no answer


def test_the_calibration_gate_bounds_the_served_ece():
    evaluation = {"calibration": {"ece": 0.04, "temperature": 1.7}}
    assert calibration_gate(evaluation, GateParams(max_ece=0.05)).verdict == PASSED
    failed = calibration_gate(evaluation, GateParams(max_ece=0.03))
    assert failed.verdict == FAILED and "gates.max_ece 0.03" in failed.detail and "0.0400" in failed.detail
    assert calibration_gate(evaluation, GateParams(max_ece=None)).verdict == SKIPPED
