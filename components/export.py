"""Export: ONNX with a dynamic batch axis, the preprocessing contract and class names in its metadata,
checked by the ONNX checker, and a parity check of ONNX Runtime against PyTorch on the test split."""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from components.artifacts import atomic_path
from components.model import Classifier
from components.train import Normalizer, predict_logits
from deploy.model import CLASSES_KEY, CONTRACT_KEY  # the server reads exactly what export writes

INPUT_NAME, OUTPUT_NAME = "pixels", "logits"


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    argmax_agreement: float
    examples: int
    atol: float

    @property
    def passed(self) -> bool:
        return self.argmax_agreement == 1.0 and self.max_abs_diff <= self.atol


def preprocessing_contract(model: Classifier) -> dict:
    """How a client turns an image into the model's input; the server reads exactly this."""
    spec = model.spec
    return {
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "layout": "NCHW",
        "dtype": "float32",
        "channels": spec.in_channels,
        "color_mode": "L" if spec.in_channels == 1 else "RGB",
        "height": spec.image_size,
        "width": spec.image_size,
        "resize": "bilinear",
        "scale": 1 / 255,
        "mean": list(spec.mean),
        "std": list(spec.std),
    }


def export_onnx(model: Classifier, path: Path, opset: int, metadata: dict[str, str] | None = None) -> Path:
    """Write a single-file ONNX model; the checker's full check runs before the file takes its name."""
    model.eval()
    example = torch.zeros(2, model.spec.in_channels, model.spec.image_size, model.spec.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        logging.getLogger("torch.onnx").setLevel(logging.WARNING)
        torch.onnx.export(
            model, (example,), str(raw), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=True, external_data=False, dynamic_shapes={"x": {0: "batch"}},
        )
        proto = onnx.load(str(raw))
    props = {CONTRACT_KEY: json.dumps(preprocessing_contract(model)), CLASSES_KEY: json.dumps(list(model.spec.classes)), **(metadata or {})}
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp_path:
        onnx.save(proto, str(tmp_path))
    return path


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(model: Classifier, onnx_path: Path, x: np.ndarray, atol: float, batch_size: int = 256) -> Parity:
    normalize = Normalizer.of(model.spec.mean, model.spec.std)
    expected = predict_logits(model, x, normalize).numpy()
    session = cpu_session(onnx_path)
    got = np.concatenate([
        session.run([OUTPUT_NAME], {INPUT_NAME: normalize(torch.from_numpy(x[i : i + batch_size])).numpy()})[0]
        for i in range(0, len(x), batch_size)
    ])
    return Parity(
        max_abs_diff=float(np.abs(got - expected).max()),
        argmax_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
        examples=len(x),
        atol=atol,
    )


def read_metadata(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}


