"""Write a Triton Inference Server model repository for a Graft ONNX model, for users who outgrow one server.

    <repo>/<model>/config.pbtxt     dynamic batching, TensorRT FP16 on GPU, class labels
    <repo>/<model>/labels.txt
    <repo>/<model>/<version>/model.onnx
"""
from __future__ import annotations

import shutil
from pathlib import Path

from deploy.model import load_model


def config_pbtxt(name: str, input_name: str, output_name: str, shape: tuple[int, ...], classes: int,
                 max_batch_size: int, max_queue_delay_us: int, gpu: bool) -> str:
    preferred = [b for b in (4, 8, 16, 32, 64) if b <= max_batch_size] or [max_batch_size]
    accelerators = """
optimization {
  execution_accelerators {
    gpu_execution_accelerator: [
      { name: "tensorrt"
        parameters { key: "precision_mode" value: "FP16" }
        parameters { key: "max_workspace_size_bytes" value: "1073741824" }
        parameters { key: "trt_engine_cache_enable" value: "true" } }
    ]
  }
}""" if gpu else ""
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "{input_name}" data_type: TYPE_FP32 dims: [ {', '.join(map(str, shape))} ] }} ]
output [ {{ name: "{output_name}" data_type: TYPE_FP32 dims: [ {classes} ] label_filename: "labels.txt" }} ]
dynamic_batching {{
  preferred_batch_size: [ {', '.join(map(str, preferred))} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [ {{ count: 1 kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]
model_warmup [ {{ name: "zeros" batch_size: 1 inputs {{ key: "{input_name}" value: {{ data_type: TYPE_FP32 dims: [ {', '.join(map(str, shape))} ] zero_data: true }} }} }} ]{accelerators}
"""


def write_repository(onnx_file: Path, repo: Path, name: str, version: str = "1", max_batch_size: int = 64,
                     max_queue_delay_us: int = 2000, gpu: bool = True) -> Path:
    model = load_model(onnx_file, providers=["cpu"])  # reads and checks the contract the config is built from
    folder = repo / name
    (folder / version).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, folder / version / "model.onnx")
    (folder / "labels.txt").write_text("\n".join(model.classes) + "\n")
    contract = model.contract
    (folder / "config.pbtxt").write_text(config_pbtxt(
        name, contract.input_name, contract.output_name, contract.shape, len(model.classes),
        max_batch_size, max_queue_delay_us, gpu,
    ))
    return folder
