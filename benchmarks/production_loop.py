"""The production loop end to end, on real images, as a user runs it (README "Production loop"):

    git clone . /tmp/loop && cd /tmp/loop && bash scripts/setup.sh && .venv/bin/graft run   # a champion
    .venv/bin/python benchmarks/production_loop.py --root /tmp/loop

1. `graft serve` the champion with capture on (serving.capture.enabled), in its own process;
2. stream in-distribution images, then shifted ones (--shift: the target's images inverted, rotated or darkened),
   as image uploads to POST /predict; read the drift test's verdicts from /metrics after each window;
3. send the true class of some shifted requests to POST /feedback;
4. `graft monitor --retrain`: the production check flow (drift and labels call for a retrain) harvests the capture
   into a new data version and retrains on it; the candidate is judged and registered;
5. score the old champion and the new version, the served variant and FP32, on held-back shifted images (the target's
   test split, shifted: never streamed, never captured) and on the clean test split.

The streamed images are the target's images that are in no split (the 7,500 the default's labels_per_class leaves
unused), so no test image, shifted or not, ever reaches training. Results: benchmarks/results/production_loop.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
import numpy as np
from PIL import Image, ImageOps

SHIFTS = {
    "invert": lambda image: ImageOps.invert(image.convert("L")),
    "rotate": lambda image: image.rotate(90),
    "dark": lambda image: image.point(lambda v: int(v * 0.35 + 10)),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _splits(root: Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(test files, files in no split) of the prepared target, each with its class."""
    with np.load(root / "data/prepared/target.npz", allow_pickle=False) as npz:
        used = {str(o) for split in ("train", "val", "test") for o in npz[f"origin_{split}"]}
        test = [str(o) for o in npz["origin_test"]]
    params = yaml.safe_load((root / "params.yaml").read_text())
    target = root / params["data"]["target"]["path"]
    unused = [p for p in sorted(target.glob("*/*")) if str(p.relative_to(root)) not in used and str(p) not in used
              and not p.name.startswith("production-")]
    return [(root / t if not Path(t).is_absolute() else Path(t), Path(t).parent.name) for t in test], \
           [(p, p.parent.name) for p in unused]


def _metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


def _graft(root: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "graft", *args, "--root", str(root)], capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-2000:], sep="\n")
    if done.returncode not in (0, 3):
        raise SystemExit(f"graft {' '.join(args)} failed ({done.returncode})")
    return done


def _score(onnx_path: Path, images: list[tuple[bytes, str]]) -> float:
    from deploy.model import decode_image, load_model

    model = load_model(onnx_path, ["cpu"])
    batch = np.stack([model.contract.normalize(decode_image(blob, model.contract)[None])[0] for blob, _ in images])
    predicted = np.concatenate([model.run(batch[i : i + 256]).argmax(1) for i in range(0, len(batch), 256)])
    return float(np.mean([model.classes[p] == label for p, (_, label) in zip(predicted, images)]))


def drift_summary(report: dict, clean: int) -> dict:
    """From `graft monitor`'s windows over the captured stream (capture order): false alarms among the windows of
    in-distribution requests, and how many shifted requests it took to the first alarm."""
    windows = report["windows"]
    size = report["window"]
    clean_windows = [w for i, w in enumerate(windows) if (i + 1) * size <= clean]
    shifted_windows = [(i, w) for i, w in enumerate(windows) if i * size >= clean]
    first = next(((i + 1) * size - clean for i, w in shifted_windows if w["drifted"]), None)
    return {"window": size, "level": report["level"], "clean_windows": len(clean_windows),
            "false_alarms": sum(w["drifted"] for w in clean_windows), "shifted_windows": len(shifted_windows),
            "shifted_windows_detected": sum(w["drifted"] for _, w in shifted_windows),
            "shifted_requests_to_first_alarm": first, "seconds_per_test": max(w["seconds"] for w in windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="a project whose `graft run` registered a champion")
    parser.add_argument("--shift", choices=sorted(SHIFTS), default="invert")
    parser.add_argument("--clean", type=int, default=400, help="in-distribution requests first")
    parser.add_argument("--shifted", type=int, default=1000, help="shifted requests after them")
    parser.add_argument("--labels", type=int, default=300, help="feedback labels for the first shifted requests")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/production_loop.json"))
    args = parser.parse_args()
    root = args.root.resolve()
    shift = SHIFTS[args.shift]
    test, unused = _splits(root)
    rng = np.random.default_rng(0)
    stream = [unused[i] for i in rng.permutation(len(unused))[: args.clean + args.shifted]]
    capture = root / "captures"  # params.yaml serving.capture.folder: where `graft monitor` and harvest read
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "graft", "serve", "--root", str(root), "--port", str(port),
                               "--capture-enabled", "--capture-folder", str(capture), "--poll-seconds", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(root / "loop-server.log", "w"))
    url = f"http://127.0.0.1:{port}"
    result: dict = {"shift": args.shift, "root": str(root)}
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if client.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            champion = client.get("/v2/models/graft-classifier").json()["parameters"]
            result["champion"] = {"version": champion["version"], "variant": champion["variant"]}
            labelled = 0
            for number, (path, label) in enumerate(stream):
                shifted = number >= args.clean
                image = Image.open(path)
                answer = client.post("/predict", content=_png(shift(image) if shifted else image))
                answer.raise_for_status()
                if shifted and labelled < args.labels:
                    client.post("/feedback", json={"request_id": answer.headers["x-request-id"], "label": label}).raise_for_status()
                    labelled += 1
            metrics = client.get("/metrics").text
            # The server tests the latest window when one is full and its last test's time allows (at most 5% of a
            # core): live windows need not line up with the stream's phases; `graft monitor` below tests them exactly.
            result["live_drift"] = {"windows_tested": _metric(metrics, "graft_drift_windows_total"),
                                    "alarms": _metric(metrics, "graft_drift_alarms_total")}
            result["feedback_labels"] = labelled
    finally:
        server.terminate()
        server.wait(30)
    started = time.monotonic()
    check = _graft(root, "monitor", "--retrain")
    result["check_seconds"] = round(time.monotonic() - started, 1)
    result["check_exit"] = check.returncode
    result["drift"] = drift_summary(json.loads((root / "reports/monitor.json").read_text()), args.clean)

    from mlflow import MlflowClient

    from deploy.source import RegistrySource
    from deploy.variants import FP32

    params = yaml.safe_load((root / "params.yaml").read_text())
    uri = f"sqlite:///{root / 'mlflow.db'}"
    name = params["registry"]["model_name"]
    versions = sorted(int(v.version) for v in MlflowClient(uri).search_model_versions(f"name='{name}'"))
    new = str(versions[-1])
    result["new_version"] = new
    result["new_aliases"] = MlflowClient(uri).get_model_version(name, new).aliases
    source = RegistrySource(uri, name, "champion", root / ".graft" / "loop-cache")
    held_back = [(_png(shift(Image.open(path))), label) for path, label in test]
    clean = [(path.read_bytes(), label) for path, label in test]
    scores = {}
    for role, version in (("old_champion", result["champion"]["version"]), ("new", new)):
        for variant in sorted({FP32, result["champion"]["variant"]}):
            onnx_path = source.fetch(version, variant).onnx_path
            scores[f"{role} v{version} {variant}"] = {"shifted_held_back": _score(onnx_path, held_back),
                                                      "clean_test": _score(onnx_path, clean)}
    result["scores"] = scores
    served = result["champion"]["variant"]
    old = scores[f"old_champion v{result['champion']['version']} {served}"]
    now = scores[f"new v{new} {served}"]
    cost = old["clean_test"] - old["shifted_held_back"]
    result["recovered_share_of_shift_cost"] = (now["shifted_held_back"] - old["shifted_held_back"]) / cost if cost > 0 else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
