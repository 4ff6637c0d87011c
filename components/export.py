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
from components.errors import GraftError
from components.model import GraftNet
from components.train import Normalizer, predict_logits
from deploy.contract import (  # the server reads exactly what export writes
    CLASSES_KEY,
    CONTRACT_KEY,
)


class ParityFailed(GraftError):
    """ONNX Runtime does not compute what PyTorch computes: the model is not published."""


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    worst_tolerance_ratio: float  # max |diff| / (atol + rtol * |expected|): at most 1 passes
    argmax_agreement: float
    examples: int
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return self.argmax_agreement == 1.0 and self.worst_tolerance_ratio <= 1.0


def export_onnx(model: GraftNet, path: Path, opset: int, metadata: dict[str, str] | None = None) -> Path:
    """Write a single-file ONNX model with the preprocessing contract and class names in its metadata; the
    checker's full check runs before the file takes its name."""
    model.eval()
    contract = model.spec.contract
    example = torch.zeros(2, *contract.shape)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        logging.getLogger("torch.onnx").setLevel(logging.WARNING)
        torch.onnx.export(
            model, (example,), str(raw), input_names=[contract.input_name], output_names=[contract.output_name],
            opset_version=opset, dynamo=True, external_data=False, dynamic_shapes={"x": {0: "batch"}},
        )
        proto = onnx.load(str(raw))
    props = {CONTRACT_KEY: contract.to_json(), CLASSES_KEY: json.dumps(list(model.spec.classes)), **(metadata or {})}
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(path) as tmp_path:
        onnx.save(proto, str(tmp_path))
    return path


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(model: GraftNet, onnx_path: Path, x: np.ndarray, atol: float, rtol: float, batch_size: int = 256) -> Parity:
    contract = model.spec.contract
    expected = predict_logits(model, x, Normalizer.of(contract)).numpy()
    session = cpu_session(onnx_path)
    got = np.concatenate([
        session.run([contract.output_name], {contract.input_name: contract.normalize(x[i : i + batch_size])})[0]
        for i in range(0, len(x), batch_size)
    ])
    difference = np.abs(got - expected)
    return Parity(
        max_abs_diff=float(difference.max()),
        worst_tolerance_ratio=float((difference / (atol + rtol * np.abs(expected))).max()),
        argmax_agreement=float((got.argmax(1) == expected.argmax(1)).mean()),
        examples=len(x),
        atol=atol,
        rtol=rtol,
    )


def read_metadata(path: Path) -> dict[str, str]:
    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}


