"""Drift through the real server over HTTP: each full window of answers is tested against the served file's own
reference (/metrics), the captured records carry the features the server saw, and `graft monitor`'s offline test
over them reaches the same verdicts. The shift is built, not trained: the reference is noise images, the shifted
requests one blank image (a window of identical features is as far from varied ones as a window can be)."""
from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from components.export import add_drift_reference, export_onnx
from components.monitor import monitor
from components.network import build
from components.settings import parse_settings
from deploy.model import load_model
from tests.conftest import tiny_params, tiny_spec, wait_until
from tests.test_capture import _metric, serving

CLASSES = ("ant", "bee", "cat")
WINDOW = 20


def _noise(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 1, 28, 28), dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[0]).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    model = build(tiny_spec(CLASSES), 0)
    path = export_onnx(model, tmp_path_factory.mktemp("drift-model") / "model.onnx", 20)
    add_drift_reference(path, model.spec.contract, _noise(200, 0), np.full(len(CLASSES), 1 / len(CLASSES)))
    return path


def test_the_server_tests_each_window_and_monitor_reaches_the_same_verdicts_from_the_capture(onnx_file, tmp_path):
    folder = tmp_path / "captures"
    options = ("--capture-enabled", "--drift-window", str(WINDOW), "--drift-permutations", "200")
    with serving(onnx_file, folder, *options) as (base, log_path, _), httpx.Client(timeout=30) as client:
        for pixels in _noise(WINDOW, 1):  # one window like the reference
            client.post(f"{base}/predict", content=_png(pixels)).raise_for_status()
        wait_until(lambda: _metric(base, "graft_drift_windows_total") == 1, 30, "the first window was not tested")
        assert _metric(base, "graft_drift_window_size") == WINDOW and _metric(base, "graft_drift_p_value") is not None
        blank = _png(np.zeros((1, 28, 28), np.uint8))
        for sent in range(1, 20 * WINDOW + 1):  # the server samples windows under load: send until one is tested
            client.post(f"{base}/predict", content=blank).raise_for_status()
            if sent >= WINDOW and (_metric(base, "graft_drift_alarms_total") or 0) >= 1:
                break
            time.sleep(0.01)
        assert _metric(base, "graft_drift_alarms_total") >= 1, log_path.read_text()[-2000:]
        assert _metric(base, "graft_drift_p_value") < 0.01
        assert "drift: the last 20 answers of v" in log_path.read_text()
        wait_until(lambda: _metric(base, "graft_captured_total") == WINDOW + sent, 30, "not every answer was captured")

    params = parse_settings(tiny_params(**{"serving.drift.window": WINDOW}))
    report = monitor(tmp_path, params, lambda served: load_model(onnx_file, ["cpu"]).drift_reference, folder)
    assert report.captured == WINDOW + sent and report.without_features == 0
    assert len(report.windows) == (WINDOW + sent) // WINDOW
    assert all(w.result.drifted for w in report.windows[1:]), [w.result.p_value for w in report.windows]
    assert report.retrain_reasons(params)[0].startswith("drift: the latest window")


def test_the_monitor_plot_of_a_capture_without_a_full_window_draws_without_a_warning(tmp_path):
    import warnings

    from components.monitor import MonitorReport, plot

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "identical low and high ylims" reached the user's terminal
        assert plot(MonitorReport(window=100, level=0.01), tmp_path / "monitor.png").stat().st_size > 0
