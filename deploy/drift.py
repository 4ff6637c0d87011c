"""Drift on images, with numpy only: do the images served lately still look like the images the model was made for?

Export stores a reference with each model file (`DriftReference`, under the metadata key tags.DRIFT_REFERENCE_KEY):
the penultimate features of in-distribution images (validation split, then training; never test) computed by that
file's own ONNX Runtime session, the class the model predicts for each and its confidence (the top softmax
probability), and the training labels' class shares.

A window of served images is compared with it three ways:
- features: a two-sample test, the maximum mean discrepancy (MMD) with a Gaussian (RBF) kernel, unbiased estimate,
  and a permutation p-value. The kernel's bandwidth is the median heuristic on the pooled sample: it does not
  change when the rows are permuted, so the permutation test is exact (its p-value is uniform when nothing
  drifted). The pooled kernel is computed once a test (the reference's own part once a monitor: `MMDTest`) and
  every permutation's statistic comes from one matrix product.
  A reference drawn stratified by class (the validation split is) is closer to the population's class mix than a
  random sample: in-distribution windows then alarm somewhat less often than the level (benchmarks/README.md).
- class mix: the total variation distance between the window's predicted classes and the reference's predicted
  classes (what the model does on in-distribution images), and against the training labels' prior;
- confidence: the window's mean top probability beside the reference's (images unlike the training set often,
  not always, get lower confidence).
Only the feature test decides `drifted`; the other two say what changed.

`DriftMonitor` keeps the latest rows the server answered in a ring buffer and tests each new full window: the
server runs `test()` in a worker thread, `graft monitor` runs it over the captured records in order.
"""
from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np

REFERENCE_ARRAYS = ("features", "predicted", "confidences", "prior")


class DriftReferenceError(ValueError):
    """A drift reference that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class DriftReference:
    features: np.ndarray     # (n, d): penultimate features of in-distribution images, stored as float16
    predicted: np.ndarray    # (n,): the class index the model predicts for each
    confidences: np.ndarray  # (n,): the model's top softmax probability for each
    prior: np.ndarray        # (k,): the training labels' class shares

    def __post_init__(self) -> None:
        n = len(self.features)
        if self.features.ndim != 2 or n < 2:
            raise DriftReferenceError(f"reference features must be (images, features) with at least 2 images, got {self.features.shape}")
        if self.predicted.shape != (n,) or self.confidences.shape != (n,):
            raise DriftReferenceError(f"{n} reference images need {n} predicted classes and confidences, "
                                      f"got {self.predicted.shape} and {self.confidences.shape}")
        if self.prior.ndim != 1 or not len(self.prior) or (len(self.predicted) and self.predicted.max() >= len(self.prior)):
            raise DriftReferenceError(f"the class prior {self.prior.shape} does not cover the predicted classes")

    @classmethod
    def of_outputs(cls, features: np.ndarray, probabilities: np.ndarray, prior: np.ndarray) -> DriftReference:
        """From a model's outputs on the reference images: features, softmax probabilities (n, k), label shares (k,)."""
        return cls(np.asarray(features, np.float16), probabilities.argmax(1).astype(np.int32),
                   probabilities.max(1).astype(np.float16), np.asarray(prior, np.float64))

    @property
    def classes(self) -> int:
        return len(self.prior)

    @property
    def dimensions(self) -> int:
        return self.features.shape[1]

    @property
    def predicted_mix(self) -> np.ndarray:
        return class_mix(self.predicted, self.classes)

    @property
    def mean_confidence(self) -> float:
        return float(self.confidences.astype(np.float64).mean())

    def encode(self) -> str:
        """Compressed .npz (plain arrays, no pickle) as base64 text: an ONNX metadata value."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: getattr(self, name) for name in REFERENCE_ARRAYS})
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    @classmethod
    def decode(cls, text: str) -> DriftReference:
        try:
            with np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False) as arrays:
                return cls(**{name: arrays[name] for name in REFERENCE_ARRAYS})
        except DriftReferenceError:
            raise
        except Exception as error:  # base64, zip and npy each raise their own errors for damaged bytes
            raise DriftReferenceError(f"the drift reference cannot be decoded ({type(error).__name__}: {error}); "
                                      "export the model again") from None


def class_mix(predicted: np.ndarray, classes: int) -> np.ndarray:
    """Each class's share of the predicted class indices."""
    return np.bincount(predicted, minlength=classes) / max(len(predicted), 1)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance between two distributions: 0 the same, 1 disjoint."""
    return float(0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


class MMDTest:
    """The MMD permutation test against one fixed reference sample: `test(window, ...)` is `mmd_test(reference,
    window, ...)`. What depends on the reference alone (its rows' squared norms, the distances between its rows and
    their upper triangle, which the median takes) is computed once, so that a test computes only the window's
    distances: at 500 reference rows, windows of 100 and 1280 features, 23 -> 12 ms a test (benchmarks/README.md)."""

    def __init__(self, reference: np.ndarray) -> None:
        x = np.asarray(reference, np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"the reference must be (rows, features) with at least 2 rows, got {x.shape}")
        self._reference, self._squares = x, (x * x).sum(1)
        self._distances = self._squared_distances(x, self._squares, x, self._squares)
        np.fill_diagonal(self._distances, 0)
        self._pairs = self._distances[np.triu_indices(len(x), 1)]

    @staticmethod
    def _squared_distances(a: np.ndarray, a_squares: np.ndarray, b: np.ndarray, b_squares: np.ndarray) -> np.ndarray:
        return np.maximum(a_squares[:, None] + b_squares[None, :] - 2 * a @ b.T, 0)

    def _kernel(self, y: np.ndarray) -> np.ndarray:
        """exp(-|a - b|^2 / median pairwise |a - b|^2) over the pooled rows (the reference's, then the window's),
        with a zero diagonal (the unbiased estimate leaves out each row's kernel with itself)."""
        y_squares = (y * y).sum(1)
        across = self._squared_distances(self._reference, self._squares, y, y_squares)
        within = self._squared_distances(y, y_squares, y, y_squares)
        median = float(np.median(np.concatenate([self._pairs, across.ravel(), within[np.triu_indices(len(y), 1)]])))
        kernel = np.exp(-np.block([[self._distances, across], [across.T, within]])
                        / max(median, np.finfo(np.float64).tiny))  # identical rows: every kernel value 1
        np.fill_diagonal(kernel, 0)
        return kernel

    def test(self, window: np.ndarray, permutations: int, seed: int) -> tuple[float, float]:
        """(MMD^2 statistic, permutation p-value) of the hypothesis that the window comes from the reference's
        distribution. The p-value is (1 + #{permuted statistic >= observed}) / (1 + permutations): never 0, and
        uniform (up to its resolution 1 / (1 + permutations)) when the hypothesis holds."""
        y = np.asarray(window, np.float64)
        n, m = len(self._reference), len(y)
        if y.ndim != 2 or y.shape[1] != self._reference.shape[1]:
            raise ValueError(f"reference {self._reference.shape} and window {y.shape} must be (rows, features) with "
                             f"the same features")
        if m < 2 or permutations < 1:
            raise ValueError(f"the test needs at least 2 rows a sample and 1 permutation, got {n}, {m} and {permutations}")
        kernel = self._kernel(y)
        # Column j marks which pooled rows play the reference: column 0 is the observed split, the others random.
        rng = np.random.default_rng(seed)
        chosen = rng.permuted(np.tile(np.arange(n + m), (permutations, 1)), axis=1)[:, :n]
        member = np.zeros((n + m, permutations + 1))
        member[:n, 0] = 1
        member[chosen, np.arange(1, permutations + 1)[:, None]] = 1
        # With a the column, r = K 1 and t = 1'K1: sum K over reference pairs a'Ka, over window pairs t - 2a'r + a'Ka,
        # across the two a'r - a'Ka.
        row_sums = kernel.sum(1)
        within_reference = (member * (kernel @ member)).sum(0)
        to_reference = row_sums @ member
        within_window = row_sums.sum() - 2 * to_reference + within_reference
        across = to_reference - within_reference
        statistics = within_reference / (n * (n - 1)) + within_window / (m * (m - 1)) - 2 * across / (n * m)
        observed = statistics[0]
        return float(observed), float((1 + np.count_nonzero(statistics[1:] >= observed)) / (1 + permutations))


def mmd_test(reference: np.ndarray, window: np.ndarray, permutations: int, seed: int) -> tuple[float, float]:
    """(MMD^2 statistic, permutation p-value) of the hypothesis that both samples come from one distribution: one
    `MMDTest`, for a reference tested once."""
    return MMDTest(reference).test(window, permutations, seed)


@dataclass(frozen=True)
class DriftResult:
    statistic: float               # MMD^2 between the window's features and the reference's
    p_value: float
    level: float
    drifted: bool                  # p_value < level
    window: int                    # rows tested
    permutations: int
    class_mix: tuple[float, ...]   # the window's predicted classes' shares
    class_tv_reference: float      # total variation distance of the class mix to the reference's predicted classes
    class_tv_prior: float          # ... to the training labels' prior
    mean_confidence: float         # the window's mean top probability
    reference_mean_confidence: float
    seconds: float                 # the test's time

    def to_dict(self) -> dict:
        return asdict(self) | {"class_mix": list(self.class_mix)}


class DriftMonitor:
    """The latest `window` rows served (features and class probabilities), tested against the reference each time
    `window` new rows have arrived: windows do not overlap, so tests are independent and their false alarms
    occur at the rate `level`. add() and test() may run in different threads."""

    def __init__(self, reference: DriftReference, window: int, level: float, permutations: int, seed: int = 0) -> None:
        if window < 2 or not 0 < level < 1 or permutations < 1:
            raise ValueError(f"drift monitoring needs window >= 2, 0 < level < 1 and permutations >= 1; "
                             f"got {window}, {level} and {permutations}")
        if 1 / (1 + permutations) >= level:
            raise ValueError(f"with {permutations} permutations the smallest p-value is 1/{1 + permutations}, never below "
                             f"the level {level}: use at least {int(np.ceil(1 / level))} permutations")
        self.reference, self.window, self.level, self.permutations, self.seed = reference, window, level, permutations, seed
        self._mmd = MMDTest(reference.features)
        self._features = np.zeros((window, reference.dimensions), np.float32)
        self._probabilities = np.zeros((window, reference.classes), np.float32)
        self._seen = 0   # rows added in all
        self._fresh = 0  # rows added since the last test
        self.tests = 0
        self._lock = threading.Lock()

    def add(self, features: np.ndarray, probabilities: np.ndarray) -> None:
        """Rows the model answered: features (r, d) and softmax probabilities (r, k)."""
        features, probabilities = np.atleast_2d(features), np.atleast_2d(probabilities)
        if features.shape[1:] != self._features.shape[1:] or probabilities.shape[1:] != self._probabilities.shape[1:] \
                or len(features) != len(probabilities):
            raise ValueError(f"expected rows of {self.reference.dimensions} features and {self.reference.classes} "
                             f"probabilities, got {features.shape} and {probabilities.shape}")
        features, probabilities = features[-self.window :], probabilities[-self.window :]
        rows = len(features)
        with self._lock:  # the ring buffer written as at most two slices: every batch pays this, in its thread
            start = self._seen % self.window
            first = min(rows, self.window - start)
            self._features[start : start + first], self._probabilities[start : start + first] = (
                features[:first], probabilities[:first])
            if first < rows:
                self._features[: rows - first], self._probabilities[: rows - first] = features[first:], probabilities[first:]
            self._seen += rows
            self._fresh += rows

    def full(self) -> bool:
        """True once `window` rows have arrived since the last test."""
        return self._fresh >= self.window

    def test(self) -> DriftResult:
        """Test the latest `window` rows (oldest first, so the same rows give the same result) and start a new window."""
        with self._lock:
            if self._seen < self.window:
                raise ValueError(f"{self._seen} rows seen; a drift test needs a full window of {self.window}")
            oldest = self._seen % self.window
            features = np.roll(self._features, -oldest, axis=0)
            probabilities = np.roll(self._probabilities, -oldest, axis=0)
            self._fresh, number = 0, self.tests
            self.tests += 1
        started = time.perf_counter()
        statistic, p_value = self._mmd.test(features, self.permutations, self.seed + number)
        mix = class_mix(probabilities.argmax(1), self.reference.classes)
        return DriftResult(
            statistic=statistic, p_value=p_value, level=self.level, drifted=p_value < self.level, window=self.window,
            permutations=self.permutations, class_mix=tuple(float(share) for share in mix),
            class_tv_reference=total_variation(mix, self.reference.predicted_mix),
            class_tv_prior=total_variation(mix, self.reference.prior),
            mean_confidence=float(probabilities.max(1).astype(np.float64).mean()),
            reference_mean_confidence=self.reference.mean_confidence, seconds=time.perf_counter() - started,
        )
