"""The KServe/Triton V2 inference protocol, stated once for both transports: what the server says of itself and its
models, and how a request's tensor is checked and read. deploy/server.py answers it over HTTP, deploy/v2_grpc.py over
gRPC; both hand this module the request's parts, so one tensor is refused with one message whichever way it came.

Numpy and the model's contract only: nothing here knows a transport.
"""
from __future__ import annotations

import hmac
import math
from importlib import metadata

import numpy as np

from deploy.model import InputError, LoadedModel, PayloadTooLarge

SERVER_NAME = "graft"
# The protocol's extensions (Triton's names) this server answers. An endpoint of another one is answered with a
# message naming it and these (unsupported), not a bare 404.
EXTENSIONS = ("binary_tensor_data", "model_configuration")
# Triton's other extensions, with the HTTP endpoints (Starlette paths) and gRPC methods of each: a client that calls
# one hears which extension it is (HTTP 501, gRPC UNIMPLEMENTED) and what is supported, not a bare 404.
UNSUPPORTED_EXTENSIONS = {
    "model_repository": (("/v2/repository/{rest:path}",),
                         ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")),
    "statistics": (("/v2/models/{name}/stats", "/v2/models/{name}/versions/{version}/stats"), ("ModelStatistics",)),
    "trace": (("/v2/trace/setting", "/v2/models/{name}/trace/setting"), ("TraceSetting",)),
    "logging": (("/v2/logging",), ("LogSettings",)),
    "system_shared_memory": (("/v2/systemsharedmemory/{rest:path}",),
                             ("SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister")),
    "cuda_shared_memory": (("/v2/cudasharedmemory/{rest:path}",),
                           ("CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister")),
    "streaming": ((), ("ModelStreamInfer",)),  # gRPC only: a bidirectional stream
}
PLATFORM = "onnxruntime_onnx"
DATATYPE = "FP32"  # what every Graft model takes and gives: images preprocessed per the model's contract


class NotServable(Exception):
    """A request for a model or version that cannot be answered now: the HTTP status and the message to answer with
    (gRPC maps the status to its own code)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def bearer_matches(authorization: str, token: str) -> bool:
    """An Authorization header's (or gRPC metadata's) value carries the API token: "Bearer <token>"."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def server_version() -> str:
    """Graft's version (pyproject.toml); in the serving image, where Graft is not an installed package, "unknown"."""
    try:
        return metadata.version("graft")
    except metadata.PackageNotFoundError:
        return "unknown"


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}


def unsupported(extension: str) -> str:
    return (f"the V2 protocol's {extension} extension is not supported by this server; it supports "
            f"{', '.join(EXTENSIONS)} (GET /v2 lists them)")


def tensors(model: LoadedModel) -> tuple[list[dict], list[dict]]:
    """The model's input and output tensors as V2 metadata describes them (-1: any batch size)."""
    contract = model.contract
    return ([{"name": contract.input_name, "datatype": DATATYPE, "shape": [-1, *contract.shape]}],
            [{"name": contract.output_name, "datatype": DATATYPE, "shape": [-1, len(model.classes)]}])


def model_metadata(name: str, model: LoadedModel, versions: list[str]) -> dict:
    inputs, outputs = tensors(model)
    return {"name": name, "versions": versions, "platform": PLATFORM, "inputs": inputs, "outputs": outputs}


def model_config(name: str, version: str, model: LoadedModel, max_batch_size: int, max_queue_delay_ms: float) -> dict:
    """Triton's model configuration (model_config.proto's JSON form): the fields its clients and tools read to build
    requests (max_batch_size, input dims without the batch, format, batching), and Graft's facts as parameters."""
    contract = model.contract
    return {
        "name": name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "max_batch_size": max_batch_size,
        "input": [{"name": contract.input_name, "data_type": "TYPE_FP32", "format": f"FORMAT_{contract.layout}",
                   "dims": list(contract.shape)}],
        "output": [{"name": contract.output_name, "data_type": "TYPE_FP32", "dims": [len(model.classes)]}],
        "dynamic_batching": {"max_queue_delay_microseconds": round(max_queue_delay_ms * 1000)},
        "instance_group": [{"count": 1, "kind": "KIND_CPU" if model.provider == "CPUExecutionProvider" else "KIND_GPU"}],
        "parameters": {key: {"string_value": value} for key, value in {
            "version": version, "variant": model.variant, "provider": model.provider,
            "classes": ",".join(model.classes)}.items()},
    }


def max_infer_rows(model: LoadedModel, max_body_bytes: int) -> int:
    """The most rows a JSON request can hold within the body limit (each value takes at least 2 bytes: "0,"):
    the row limit follows from the body limit, so neither can contradict the other."""
    return max(1, max_body_bytes // (2 * math.prod(model.contract.shape)))


def check_tensor(name: str | None, datatype: str | None, shape, model: LoadedModel, max_rows: int) -> list[int]:
    """A request's one input tensor, described by its name (None: unnamed), datatype and shape, against what the
    model takes: the shape, or InputError naming what is wrong and what is expected."""
    contract = model.contract
    if name not in (None, "", contract.input_name):
        raise InputError(f"unknown input {name!r}; the model's input is {contract.input_name!r}")
    if datatype != DATATYPE:
        raise InputError(f"datatype {datatype!r} is not supported; send {DATATYPE} (preprocessed per the model's "
                         f"contract)")
    if (not isinstance(shape, list) or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape)
            or tuple(shape[1:]) != contract.shape):
        raise InputError(f"shape {shape} does not fit the model: expected [N, {', '.join(map(str, contract.shape))}]")
    if shape[0] > max_rows:
        raise PayloadTooLarge(f"batch of {shape[0]} rows is over the limit of {max_rows} (what fits in the body limit); "
                              f"split it")
    return shape


def rows_from_bytes(raw: bytes, shape: list[int], where: str) -> np.ndarray:
    """Raw little-endian FP32 tensor bytes (`where`: what carried them, for the message) -> the checked rows."""
    expected = 4 * math.prod(shape)
    if len(raw) != expected:
        raise InputError(f"binary tensor data: shape {shape} FP32 needs {expected} bytes; {where} holds {len(raw)}")
    return finite(np.frombuffer(raw, dtype="<f4").reshape(shape))


def rows_from_values(values, shape: list[int]) -> np.ndarray:
    """A tensor's values as numbers (a JSON list, flat or nested; gRPC's fp32_contents) -> the checked rows."""
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError("data holds something that is not a number") from None
    if array.size != math.prod(shape):
        raise InputError(f"data has {array.size} values; shape {shape} needs {math.prod(shape)}")
    return finite(array.reshape(shape))


def finite(array: np.ndarray) -> np.ndarray:
    if not np.isfinite(array).all():
        raise InputError("data holds NaN or infinity; send finite numbers")
    return array


def split_binary(raw: bytes, header_length: str | None) -> tuple[bytes, bytes | None]:
    """An HTTP body -> its JSON header and, under the binary tensor extension, the raw tensor bytes after it."""
    if header_length is None:
        return raw, None
    if not header_length.isdigit() or int(header_length) > len(raw):
        raise InputError(f"Inference-Header-Content-Length {header_length!r} must be the byte length of the JSON header, "
                         f"at most the body's {len(raw)} bytes")
    return raw[: int(header_length)], raw[int(header_length):]


def parse_json_infer(body: dict, model: LoadedModel, max_rows: int, binary: bytes | None = None) -> np.ndarray:
    """An HTTP V2 request -> the float32 (N, C, H, W) batch, or InputError naming what is wrong. The tensor comes as
    a JSON list in "data", or (binary tensor extension) as raw little-endian FP32 bytes after the JSON header, their
    length in parameters.binary_data_size."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError('expected {"inputs": [{"name": ..., "shape": [N, C, H, W], "datatype": "FP32", "data": [...]}]}')
    tensor = inputs[0]
    shape = check_tensor(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), model, max_rows)
    parameters = tensor.get("parameters")
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if binary is not None or size is not None:
        expected = 4 * math.prod(shape)
        if binary is None or size != len(binary) or size != expected:
            raise InputError(f"binary tensor data: shape {shape} FP32 needs {expected} bytes; parameters.binary_data_size "
                             f"is {size!r} and {0 if binary is None else len(binary)} bytes follow the JSON header "
                             f"(Inference-Header-Content-Length)")
        return rows_from_bytes(binary, shape, "the body after the JSON header")
    data = tensor.get("data")
    if not isinstance(data, list):
        raise InputError("data must be a flat (or nested) JSON list of numbers")
    return rows_from_values(data, shape)


def wants_binary_output(body: dict) -> bool:
    """Binary outputs, per the extension: parameters.binary_data_output, or binary_data on the requested output."""
    parameters = body.get("parameters")
    if isinstance(parameters, dict) and parameters.get("binary_data_output") is True:
        return True
    outputs = body.get("outputs")
    return isinstance(outputs, list) and any(
        isinstance(o, dict) and isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data") is True
        for o in outputs)
