"""`graft predict`: files scored offline by the registered model graft serve would serve, into a CSV (deploy/predict_files.py)."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deploy.model import load_model, softmax
from deploy.server import image_row
from deploy.source import RegistrySource, SourceError
from tests.conftest import copy_workspace

@pytest.fixture(scope="module")
def published(repro_workspace, tmp_path_factory):
    """A copy of the published workspace (its registry too), and a folder of images to score: three of the target's,
    one in a subfolder, beside files no model can answer and a hidden one that is not read."""
    tmp = tmp_path_factory.mktemp("predict")
    root = copy_workspace(repro_workspace[0], tmp / "ws", registry=True)
    images = tmp / "images"
    (images / "more").mkdir(parents=True)
    (images / ".hidden").mkdir()
    raw = sorted((root / "data/raw/animal-mnist").iterdir())
    firsts = [sorted(folder.iterdir())[0] for folder in raw[:3]]
    shutil.copy(firsts[0], images / "a.png")
    shutil.copy(firsts[1], images / "b.png")
    shutil.copy(firsts[2], images / "more" / "c.png")
    (images / "notes.txt").write_text("not an image")
    (images / "empty.png").write_bytes(b"")
    (images / "cut.png").write_bytes(firsts[0].read_bytes()[:60])
    shutil.copy(firsts[0], images / ".hidden" / "x.png")
    return root, images


def _predict(root: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "GRAFT_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "graft", "predict", "--root", str(root), *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_graft_predict_answers_as_the_served_model_and_names_every_unusable_file(published, tmp_path):
    root, images = published
    done = _predict(root, tmp_path, str(images), "--top-k", "2", "--out", str(tmp_path / "p.csv"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 files, 3 answered, 3 unusable (each with its reason in the CSV)" in done.stdout
    variant = done.stdout.split("(", 1)[1].split(" on ", 1)[0]  # "graft-classifier v1 (int8 on CPU...)"
    with (tmp_path / "p.csv").open(encoding="utf-8") as handle:
        rows = {Path(row["file"]).relative_to(images).as_posix(): row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["a.png", "b.png", "cut.png", "empty.png", "more/c.png", "notes.txt"]  # .hidden not read
    assert "not an image file" in rows["notes.txt"]["error"] and "empty" in rows["empty.png"]["error"]
    assert "truncated or corrupt" in rows["cut.png"]["error"] and rows["cut.png"]["class"] == ""

    # The same numbers as the registered file of that variant, decoded and run as the server runs a request.
    source = RegistrySource(f"sqlite:///{root / 'mlflow.db'}", "graft-classifier", "champion", tmp_path / "check")
    model = load_model(source.fetch("1", variant).onnx_path, providers=["cpu"])
    for name in ("a.png", "b.png", "more/c.png"):
        probabilities = softmax(model.run(image_row((images / name).read_bytes(), model.contract)))[0]
        best = np.argsort(-probabilities)[:2]
        row = rows[name]
        assert (row["class"], row["class_2"]) == tuple(model.classes[i] for i in best) and row["error"] == ""
        assert float(row["probability"]) == pytest.approx(probabilities[best[0]], abs=1e-6)
        assert float(row["probability_2"]) == pytest.approx(probabilities[best[1]], abs=1e-6)


def test_graft_predict_refuses_a_missing_path_or_version_by_name_and_writes_nothing(published, tmp_path):
    root, images = published
    out = tmp_path / "p.csv"
    no_version = _predict(root, tmp_path, str(images), "--version", "99", "--out", str(out))
    assert no_version.returncode == 2 and "graft-classifier v99 not found" in no_version.stderr, no_version.stderr
    no_path = _predict(root, tmp_path, str(tmp_path / "nowhere"), "--out", str(out))
    assert no_path.returncode == 2 and "nowhere: no such file or folder" in no_path.stderr, no_path.stderr
    assert not out.exists() and not list(tmp_path.glob(".p.csv*"))
    missing = _predict(root, tmp_path, str(images), "--onnx-file", str(tmp_path / "mine.onnx"), "--out", str(out))
    assert missing.returncode == 2 and f"{tmp_path / 'mine.onnx'}: no such ONNX file" in missing.stderr, missing.stderr
    shutil.copy(root / "models" / "model.onnx", tmp_path / "mine.onnx")  # a file by another name, no variants beside
    renamed = _predict(root, tmp_path, str(images / "a.png"), "--onnx-file", str(tmp_path / "mine.onnx"), "--out", str(out))
    assert renamed.returncode == 0 and "the ONNX file (fp32 on " in renamed.stdout, renamed.stdout + renamed.stderr
    # The embedded store's answer for a version it lacks: what a server on it answers 404 with (it was a 500).
    with pytest.raises(SourceError, match="graft-classifier v99 not found"):
        RegistrySource(f"sqlite:///{root / 'mlflow.db'}", "graft-classifier", "champion", tmp_path / "c").fetch("99")


def test_graft_predict_labelled_reads_each_class_from_its_folder_and_scores_the_answers(published, tmp_path):
    root, _ = published
    raw = sorted((root / "data/raw/animal-mnist").iterdir())
    check = tmp_path / "check"
    for folder in raw[:3]:
        (check / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:4]:
            shutil.copy(image, check / folder.name / image.name)
    (check / "unicorn").mkdir()
    shutil.copy(sorted(raw[0].iterdir())[0], check / "unicorn" / "u.png")
    done = _predict(root, tmp_path, str(check), "--labelled", "--out", str(tmp_path / "p.csv"))
    assert done.returncode == 0, done.stdout + done.stderr
    with (tmp_path / "p.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == [folder.name for folder in raw[:3] for _ in range(4)] + ["unicorn"]
    right = sum(row["label"] == row["class"] for row in rows[:12])
    assert f"accuracy {right / 12:.4f} on 12 labelled files" in done.stdout
    assert "not scored, not a class of the model: unicorn 1" in done.stdout
    assert all(f" {folder.name} " in done.stdout for folder in raw[:3])  # the classification report's rows

    refused = _predict(root, tmp_path, str(check / "unicorn" / "u.png"), "--labelled")
    assert refused.returncode == 2 and "is not a folder" in refused.stderr
