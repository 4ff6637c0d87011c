"""The drift test (deploy/drift.py) by construction: samples drawn from known distributions, never a trained model.

A p-value is useful only if it is calibrated: when nothing drifted, p < level must happen in about `level` of the
windows, no more (false alarms) and not far fewer (a test that never fires detects nothing)."""
from math import comb

import numpy as np
import pytest

from deploy.drift import DriftMonitor, DriftReference, DriftReferenceError, MMDTest, mmd_test, total_variation

MEANS = np.array([[0.0] * 8, [3.0] * 8, [-2.0, 2.0] * 4])  # a fixed three-component Gaussian mixture in 8 dimensions
WEIGHTS = np.array([0.5, 0.3, 0.2])


def mixture(rows: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    component = rng.choice(len(WEIGHTS), rows, p=WEIGHTS)
    return (MEANS[component] + rng.normal(size=(rows, 8)) + shift).astype(np.float32)


def reference_of(features: np.ndarray, seed: int = 0, classes: int = 4) -> DriftReference:
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(classes), len(features))
    return DriftReference.of_outputs(features, probabilities, np.full(classes, 1 / classes))


def binomial_interval(trials: int, p: float, tail: float) -> tuple[int, int]:
    """The smallest lo and hi with P(X < lo) <= tail and P(X > hi) <= tail for X ~ Binomial(trials, p)."""
    cdf = np.cumsum([comb(trials, k) * p**k * (1 - p) ** (trials - k) for k in range(trials + 1)])
    return int(np.searchsorted(cdf, tail, side="right")), int(np.searchsorted(cdf, 1 - tail))


def test_the_reference_round_trips_through_its_metadata_text():
    reference = reference_of(mixture(50, 1))
    decoded = DriftReference.decode(reference.encode())
    for name in ("features", "predicted", "confidences", "prior"):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(reference, name))
        assert getattr(decoded, name).dtype == getattr(reference, name).dtype
    assert decoded.features.dtype == np.float16, "features are stored compactly"
    assert decoded.predicted_mix.sum() == pytest.approx(1) and decoded.dimensions == 8 and decoded.classes == 4


@pytest.mark.parametrize("text", ["not base64!", "aGVsbG8=", ""])
def test_an_unreadable_reference_says_so(text):
    with pytest.raises(DriftReferenceError, match="cannot be decoded.*export the model again"):
        DriftReference.decode(text)


def test_a_reference_whose_arrays_disagree_is_refused():
    with pytest.raises(DriftReferenceError, match="need 5 predicted classes"):
        DriftReference(np.zeros((5, 3), np.float16), np.zeros(4, np.int32), np.ones(5, np.float16), np.ones(2) / 2)


def test_the_statistic_is_the_unbiased_mmd_with_the_pooled_median_bandwidth():
    """Against the definition computed the slow way: mean kernel within each sample (without the diagonal) minus
    twice the mean across, the kernel exp(-d^2 / median pairwise d^2 of the pooled rows)."""
    x, y = mixture(30, 2).astype(np.float64), mixture(20, 3, shift=0.5).astype(np.float64)
    pooled = np.concatenate([x, y])
    squared = ((pooled[:, None] - pooled[None]) ** 2).sum(-1)
    kernel = np.exp(-squared / np.median(squared[np.triu_indices(50, 1)]))
    kxx, kyy, kxy = kernel[:30, :30], kernel[30:, 30:], kernel[:30, 30:]
    expected = ((kxx.sum() - 30) / (30 * 29) + (kyy.sum() - 20) / (20 * 19) - 2 * kxy.mean())
    statistic, _ = mmd_test(x, y, permutations=10, seed=0)
    assert statistic == pytest.approx(expected, rel=1e-9)
    assert mmd_test(x[::-1], y[::-1], 10, 0)[0] == pytest.approx(statistic, rel=1e-9), "row order does not matter"


def test_the_p_value_is_calibrated_when_nothing_drifted():
    """One fixed reference and 300 in-distribution windows: the share of p <= 0.05 is within the binomial
    interval of a calibrated test (each tail 0.05%; with 199 permutations P(p <= 0.05) is exactly 0.05)."""
    reference = mixture(300, 0)
    windows = 300
    p_values = np.array([mmd_test(reference, mixture(40, 1000 + w), permutations=199, seed=w)[1] for w in range(windows)])
    alarms = int((p_values <= 0.05).sum())
    low, high = binomial_interval(windows, 0.05, 0.0005)
    assert low <= alarms <= high, f"{alarms} of {windows} windows alarmed at 0.05; a calibrated test: {low}..{high}"
    assert abs(float(np.mean(p_values)) - 0.5) < 0.1, "p-values of in-distribution windows are uniform"


def test_a_clear_shift_is_detected_in_every_window():
    reference = mixture(300, 0)
    p_values = [mmd_test(reference, mixture(40, 2000 + w, shift=1.5), permutations=199, seed=w)[1] for w in range(20)]
    assert max(p_values) == pytest.approx(1 / 200), "no permutation reaches a shifted window's statistic"


def test_the_test_is_deterministic_for_a_seed():
    x, y = mixture(100, 0), mixture(30, 1, shift=0.2)
    assert mmd_test(x, y, 99, 7) == mmd_test(x, y, 99, 7)


def test_a_reference_prepared_once_tests_every_window_as_a_fresh_test_would():
    """The server's monitor keeps the reference's own distances between tests: windows of other sizes, one after
    another, each give what a test made for it alone gives, to the last bit."""
    x = mixture(60, 0)
    prepared = MMDTest(x)
    windows = [mixture(20, 1), mixture(35, 2, shift=0.8), mixture(5, 3), mixture(20, 1)]
    for seed, window in enumerate(windows):
        assert prepared.test(window, 49, seed) == mmd_test(x, window, 49, seed)
    with pytest.raises(ValueError, match="same features"):
        prepared.test(mixture(20, 4)[:, :2], 49, 0)


def test_the_monitor_tests_each_new_full_window_of_the_latest_rows():
    features = mixture(300, 0)
    reference = reference_of(features)
    monitor = DriftMonitor(reference, window=20, level=0.05, permutations=99, seed=3)
    served = mixture(50, 5, shift=2.0)
    probabilities = np.zeros((50, 4), np.float32)
    probabilities[:, 1] = 0.7
    probabilities[:, 2] = 0.3
    for start in range(0, 19, 6):  # 19 rows: not yet a window
        monitor.add(served[start : min(start + 6, 19)], probabilities[start : min(start + 6, 19)])
    assert not monitor.full()
    with pytest.raises(ValueError, match="needs a full window of 20"):
        monitor.test()
    monitor.add(served[19:35], probabilities[19:35])  # 35 rows: the latest 20 are rows 15..34
    assert monitor.full()
    result = monitor.test()
    assert not monitor.full(), "a tested window is not tested again"
    statistic, p_value = mmd_test(reference.features.astype(np.float32), served[15:35], 99, seed=3)
    assert (result.statistic, result.p_value) == pytest.approx((statistic, p_value), rel=1e-6)
    assert result.drifted and result.p_value < 0.05 and result.window == 20 and result.seconds > 0
    assert result.class_mix == (0.0, 1.0, 0.0, 0.0)
    assert result.class_tv_prior == pytest.approx(0.75)
    assert result.class_tv_reference == pytest.approx(total_variation([0, 1, 0, 0], reference.predicted_mix))
    assert result.mean_confidence == pytest.approx(0.7) and result.reference_mean_confidence == reference.mean_confidence
    monitor.add(served[35:50], probabilities[35:50])
    assert not monitor.full(), "15 new rows are not a new window"
    assert monitor.test().window == 20 and monitor.tests == 2


def test_the_monitor_refuses_settings_that_could_never_alarm():
    reference = reference_of(mixture(10, 0))
    with pytest.raises(ValueError, match="use at least 100 permutations"):
        DriftMonitor(reference, window=50, level=0.01, permutations=50)
    with pytest.raises(ValueError, match="window >= 2"):
        DriftMonitor(reference, window=1, level=0.01, permutations=500)
    monitor = DriftMonitor(reference, window=5, level=0.01, permutations=100)
    with pytest.raises(ValueError, match="expected rows of 8 features and 4 probabilities"):
        monitor.add(np.zeros((2, 7)), np.zeros((2, 4)))
