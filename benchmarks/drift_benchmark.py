"""Drift detection on real images: false alarms on in-distribution windows, detection of shifted ones, time a test.

    .venv/bin/python benchmarks/drift_benchmark.py                     # after `graft run`: models/model.onnx
    .venv/bin/python benchmarks/drift_benchmark.py --alibi /tmp/alibi/bin/python   # also alibi-detect's MMDDrift

The served model (models/model.onnx, CPU) computes its features and class probabilities for the target's test
split (never in the drift reference the file stores, which comes from the validation split) and for shifted copies
of it: brightness/contrast, rotations (training augments up to 10°), Gaussian noise, and images of another data set
(Fashion-MNIST's test images, classes the model does not know). For each window size, `--windows` windows of that many rows drawn at random
from one set are tested the way the server tests them (deploy/drift.py DriftMonitor: MMD permutation test against
the stored reference); in-distribution windows give the false-alarm rate at the level, shifted ones the detection
rate. Then, at `--window`, the permutations are varied. With `--alibi PYTHON` (a Python with alibi-detect and torch)
the same windows are tested by alibi-detect's MMDDrift (PyTorch backend) and the p-values compared.
Results: benchmarks/results/drift.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path("benchmarks/results/drift.json")


# ---------------------------------------------------------------- the images and their shifts


def brightness_contrast(pixels: np.ndarray, contrast: float, brightness: float) -> np.ndarray:
    return np.clip(pixels.astype(np.float32) * contrast + brightness, 0, 255).round().astype(np.uint8)


def rotated(pixels: np.ndarray, degrees: float) -> np.ndarray:
    """Each image turned about its centre, the uncovered corners black (the target's background)."""
    from PIL import Image

    return np.stack([np.stack([np.asarray(Image.fromarray(channel).rotate(degrees, Image.Resampling.BILINEAR))
                               for channel in image]) for image in pixels])


def noisy(pixels: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, pixels.shape)
    return np.clip(pixels + noise, 0, 255).round().astype(np.uint8)


def other_data_set(contract, count: int, seed: int) -> np.ndarray:
    """Fashion-MNIST test images through the server's own conversion (components/data.py's IDX reader)."""
    from PIL import Image

    from components.data import read_idx_split

    samples, _ = read_idx_split(FASHION_MNIST, "test")
    chosen = np.random.default_rng(seed).choice(len(samples), count, replace=False)
    return np.stack([contract.pixels(Image.fromarray(samples[i].pixels)) for i in chosen])


def image_sets(contract, test: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    return {
        "in-distribution": test,
        "brightness/contrast x0.8 +20": brightness_contrast(test, 0.8, 20),
        "brightness/contrast x0.6 +40": brightness_contrast(test, 0.6, 40),
        "rotation 10°": rotated(test, 10),
        "rotation 20°": rotated(test, 20),
        "rotation 30°": rotated(test, 30),
        "noise sigma 10": noisy(test, 10, seed),
        "fashion-mnist": other_data_set(contract, len(test), seed),
    }


# ---------------------------------------------------------------- the measurements


def served_outputs(model, pixels: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(features, probabilities) as the server computes them: run_served, split, softmax."""
    from deploy.model import softmax

    rows = np.concatenate([model.run_served(model.contract.normalize(pixels[i : i + batch]))
                           for i in range(0, len(pixels), batch)])
    logits, features = model.split(rows)
    return features, softmax(logits)


def windows_of(rows: int, size: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` windows of `size` distinct rows each, drawn at random."""
    rng = np.random.default_rng(seed)
    return [rng.choice(rows, size, replace=False) for _ in range(count)]


def test_windows(reference, outputs: tuple[np.ndarray, np.ndarray], windows: list[np.ndarray], level: float,
                 permutations: int, seed: int) -> list:
    """Each window tested by a fresh DriftMonitor, as the server's monitor tests a full window."""
    from deploy.drift import DriftMonitor

    features, probabilities = outputs
    results = []
    for number, rows in enumerate(windows):
        monitor = DriftMonitor(reference, len(rows), level, permutations, seed=seed + number)
        monitor.add(features[rows], probabilities[rows])
        results.append(monitor.test())
    return results


def summary(results: list) -> dict:
    p_values = np.array([r.p_value for r in results])
    return {"alarm_rate": float(np.mean([r.drifted for r in results])), "windows": len(results),
            "median_p_value": float(np.median(p_values)), "mean_statistic": float(np.mean([r.statistic for r in results])),
            "mean_class_tv_reference": float(np.mean([r.class_tv_reference for r in results])),
            "mean_confidence": float(np.mean([r.mean_confidence for r in results])),
            "ms_per_test": 1000 * float(np.median([r.seconds for r in results]))}


def wilson_interval(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a rate from `hits` of `trials` (Wilson's score interval)."""
    rate, spread = hits / trials, z * z / trials
    centre = (rate + spread / 2) / (1 + spread)
    half = z * np.sqrt(rate * (1 - rate) / trials + spread / (4 * trials)) / (1 + spread)
    return float(max(centre - half, 0)), float(min(centre + half, 1))


def alibi_p_values(python: str, reference: np.ndarray, windows: list[np.ndarray], permutations: int) -> dict:
    """alibi-detect's MMDDrift (PyTorch backend) on the same windows, run by `python` (its own environment)."""
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "windows.npz", Path(tmp) / "alibi.json"
        np.savez(data, reference=reference, **{f"w{i}": w for i, w in enumerate(windows)})
        subprocess.run([python, __file__, "--alibi-worker", str(data), str(out), "--permutations", str(permutations)],
                       check=True)
        return json.loads(out.read_text())


def alibi_worker(data: Path, out: Path, permutations: int) -> None:
    """Runs inside alibi-detect's environment: p-values and seconds for each window of `data`."""
    import torch
    from alibi_detect.cd import MMDDrift

    torch.manual_seed(0)
    with np.load(data) as arrays:
        reference = arrays["reference"]
        windows = [arrays[f"w{i}"] for i in range(len(arrays.files) - 1)]
    detector = MMDDrift(reference, backend="pytorch", p_val=0.01, n_permutations=permutations, device="cpu")
    p_values, seconds = [], []
    for window in windows:
        started = time.perf_counter()
        p_values.append(float(detector.predict(window)["data"]["p_val"]))
        seconds.append(time.perf_counter() - started)
    out.write_text(json.dumps({"p_values": p_values, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50, 100, 200, 400])
    parser.add_argument("--windows", type=int, default=200, help="windows a size and a set (>= 50)")
    parser.add_argument("--level", type=float, default=0.01)
    parser.add_argument("--permutations", type=int, default=200)
    parser.add_argument("--window", type=int, default=100,
                        help="the window of the false-alarm study, the permutation study and alibi's comparison")
    parser.add_argument("--null-windows", type=int, default=1000, help="in-distribution windows for the false-alarm rate")
    parser.add_argument("--permutation-study", type=int, nargs="*", default=[100, 200, 500, 1000])
    parser.add_argument("--alibi", help="a Python with alibi-detect and torch: compare its MMDDrift's p-values")
    parser.add_argument("--alibi-windows", type=int, default=50, help="windows a set for the comparison (slow)")
    parser.add_argument("--alibi-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.alibi_worker:
        return alibi_worker(*args.alibi_worker, args.permutations)

    from deploy.cpu import cpu_flags, cpu_model
    from components.data import load_splits
    from components.layout import Layout
    from deploy.model import load_model

    model = load_model(args.model, ["cpu"])
    reference = model.drift_reference
    if reference is None:
        sys.exit(f"{args.model} stores no drift reference: export it again (`graft run`)")
    splits = load_splits(Layout.selected_data)
    started = time.perf_counter()
    sets = image_sets(model.contract, splits.x_test, args.seed)
    outputs = {name: served_outputs(model, pixels) for name, pixels in sets.items()}
    accuracy = {name: float((outputs[name][1].argmax(1) == splits.y_test).mean()) for name in sets if name != "fashion-mnist"}
    print(f"features of {len(sets)} sets of {len(splits.x_test)} images in {time.perf_counter() - started:.1f} s; "
          f"reference: {len(reference.features)} images x {reference.dimensions} features")

    by_size: dict[int, dict[str, dict]] = {}
    for size in args.sizes:
        by_size[size] = {}
        for number, (name, out) in enumerate(outputs.items()):
            windows = windows_of(len(out[0]), size, args.windows, args.seed + 1000 * number + size)
            by_size[size][name] = summary(test_windows(reference, out, windows, args.level, args.permutations, args.seed))
            print(f"window {size:4d}  {name:30s} alarms {by_size[size][name]['alarm_rate']:6.1%}  "
                  f"{by_size[size][name]['ms_per_test']:6.1f} ms a test")
    shifts = [name for name in outputs if name != "in-distribution"]
    needed = {name: next((size for size in args.sizes if by_size[size][name]["alarm_rate"] >= 0.95), None) for name in shifts}

    null = test_windows(reference, outputs["in-distribution"],
                        windows_of(len(splits.x_test), args.window, args.null_windows, args.seed + 7), args.level,
                        args.permutations, args.seed)
    alarms = sum(r.drifted for r in null)
    false_alarms = {"window": args.window, "windows": len(null), "alarms": alarms, "rate": alarms / len(null),
                    "rate_95pct_interval": wilson_interval(alarms, len(null)),
                    "share_p_below": {str(q): float(np.mean([r.p_value <= q for r in null])) for q in (0.01, 0.05, 0.1, 0.5)}}
    print(f"false alarms at window {args.window}: {alarms} of {len(null)} in-distribution windows "
          f"(95% interval {false_alarms['rate_95pct_interval'][0]:.2%}..{false_alarms['rate_95pct_interval'][1]:.2%}); "
          f"share of p <= q: {false_alarms['share_p_below']}")

    by_permutations: dict[int, dict[str, dict]] = {}
    for permutations in args.permutation_study:
        if 1 / (1 + permutations) >= args.level:
            continue
        by_permutations[permutations] = {}
        for number, (name, out) in enumerate(outputs.items()):
            windows = windows_of(len(out[0]), args.window, args.windows, args.seed + 1000 * number + args.window)
            by_permutations[permutations][name] = summary(test_windows(reference, out, windows, args.level, permutations, args.seed))
        print(f"permutations {permutations:5d} at window {args.window}: " + ", ".join(
            f"{name} {s['alarm_rate']:.0%}" for name, s in by_permutations[permutations].items())
            + f"; {by_permutations[permutations]['in-distribution']['ms_per_test']:.1f} ms a test")

    alibi = None
    if args.alibi:
        alibi = {}
        for number, (name, out) in enumerate(outputs.items()):
            windows = windows_of(len(out[0]), args.window, args.windows, args.seed + 1000 * number + args.window)
            windows = windows[: args.alibi_windows]  # the first of the same windows as above
            ours = test_windows(reference, out, windows, args.level, args.permutations, args.seed)
            theirs = alibi_p_values(args.alibi, reference.features.astype(np.float32), [out[0][w] for w in windows],
                                    args.permutations)
            p_ours, p_theirs = np.array([r.p_value for r in ours]), np.array(theirs["p_values"])
            alibi[name] = {
                "alarm_rate_ours": float((p_ours < args.level).mean()), "alarm_rate_alibi": float((p_theirs < args.level).mean()),
                "decisions_agree": float(((p_ours < args.level) == (p_theirs < args.level)).mean()),
                "p_value_correlation": float(np.corrcoef(p_ours, p_theirs)[0, 1]) if p_ours.std() and p_theirs.std() else None,
                "median_abs_p_difference": float(np.median(np.abs(p_ours - p_theirs))),
                "ms_per_test_ours": 1000 * float(np.median([r.seconds for r in ours])),
                "ms_per_test_alibi": 1000 * float(np.median(theirs["seconds"])),
            }
            print(f"alibi-detect {name:30s} " + ", ".join(f"{k} {v:.3g}" for k, v in alibi[name].items() if v is not None))

    result = {
        "cpu": cpu_model(), "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "amx_tile"}),
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "model": str(args.model),
        "reference_images": len(reference.features), "features": reference.dimensions, "test_images": len(splits.x_test),
        "level": args.level, "permutations": args.permutations, "windows_per_set": args.windows,
        "accuracy": accuracy, "by_window": by_size, "window_needed_for_95pct": needed, "false_alarms": false_alarms,
        "by_permutations_at_window": {"window": args.window, "results": by_permutations}, "alibi_detect": alibi,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"smallest window detecting >= 95%: {needed}; written to {RESULTS}")


if __name__ == "__main__":
    main()
