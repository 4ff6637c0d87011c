"""The V2 inference protocol over gRPC: KServe's GRPCInferenceService (deploy/v2_protocol/), on its own port beside
HTTP (serving.grpc_port). The same ModelServer answers both, on the same event loop, so gRPC requests get the same
models, versions by number, dynamic batches, canary routing, capture, shadow, API token and size limit as HTTP ones.
Tensors come as raw little-endian bytes (raw_input_contents, what NVIDIA's and KServe's clients send) or as
fp32_contents; answers carry raw_output_contents. Every refusal is a gRPC status with the HTTP side's message:
INVALID_ARGUMENT for a bad tensor, RESOURCE_EXHAUSTED past the size limit, NOT_FOUND for an unknown model or
version, UNAVAILABLE before a model is loaded, UNAUTHENTICATED without the token, UNIMPLEMENTED naming the extension
for Triton's methods Graft does not answer. ModelConfig, Triton's model configuration, is the HTTP /config's.

`server` here is deploy.server.ModelServer (not imported: that module starts this one).
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np
from google.protobuf import json_format
from grpc import aio
from grpc_reflection.v1alpha import reflection

from deploy.capture import new_request_id
from deploy.model import InputError, LoadedModel, PayloadTooLarge
from deploy.v2 import (
    DATATYPE,
    UNSUPPORTED_EXTENSIONS,
    NotServable,
    bearer_matches,
    check_tensor,
    max_infer_rows,
    model_metadata,
    rows_from_bytes,
    rows_from_values,
    server_metadata,
    unsupported,
)
from deploy.v2_protocol import grpc_predict_v2_pb2 as pb
from deploy.v2_protocol.grpc_predict_v2_pb2_grpc import (
    GRPCInferenceServiceServicer,
    add_GRPCInferenceServiceServicer_to_server,
)

log = logging.getLogger("graft.serve")
SERVICE = "inference.GRPCInferenceService"
OPEN_METHODS = frozenset({f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady"})  # as /v2/health/*: no token
REFLECTION_PREFIX = "/grpc.reflection."  # the protocol's description: public, no token either
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                503: grpc.StatusCode.UNAVAILABLE}
# Triton's methods of the service that Graft does not answer -> the protocol extension each belongs to.
UNSUPPORTED_METHODS = {method: extension for extension, (_, methods) in UNSUPPORTED_EXTENSIONS.items()
                       for method in methods}
INLINE_VALUES = 16384  # fp32_contents up to this many values are read on the event loop; more in the decode pool
ENDPOINT = "grpc/ModelInfer"  # its label in the server's metrics, beside the HTTP paths
GRACE_SECONDS = 5.0  # on shutdown, calls in flight get this long to finish


class TokenGuard(aio.ServerInterceptor):
    """Every call but the two health checks needs the metadata `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.refusal = grpc.unary_unary_rpc_method_handler(self._refuse)

    async def intercept_service(self, continuation, details):
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if (details.method in OPEN_METHODS or details.method.startswith(REFLECTION_PREFIX)
                or bearer_matches(given, self.token)):
            return await continuation(details)
        return self.refusal

    @staticmethod
    async def _refuse(request, context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "this server needs an API token: send the metadata 'authorization: Bearer <token>'")


class UnsupportedMethods(grpc.GenericRpcHandler):
    """Answers UNSUPPORTED_METHODS with UNIMPLEMENTED and the extension's name, instead of gRPC's bare 'Method not
    found!'. ModelStreamInfer is a bidirectional stream; the others are unary."""

    def service(self, handler_call_details):
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        extension = UNSUPPORTED_METHODS.get(method) if service == SERVICE else None
        if extension is None:
            return None

        async def refuse(request, context) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, unsupported(extension))
        streaming = method == "ModelStreamInfer"
        return (grpc.stream_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler)(refuse)


def request_rows(request: pb.ModelInferRequest, model: LoadedModel, max_rows: int) -> np.ndarray:
    """A ModelInferRequest -> the float32 (N, C, H, W) batch, checked as an HTTP request's is (deploy/v2.py)."""
    if len(request.inputs) != 1:
        raise InputError(f"expected one input tensor ({model.contract.input_name!r}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    shape = check_tensor(tensor.name, tensor.datatype, list(tensor.shape), model, max_rows)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or tensor.contents.fp32_contents:
            raise InputError("send the tensor once: one raw_input_contents entry, or contents.fp32_contents, not both")
        return rows_from_bytes(request.raw_input_contents[0], shape, "raw_input_contents[0]")
    return rows_from_values(tensor.contents.fp32_contents, shape)


class V2Servicer(GRPCInferenceServiceServicer):
    def __init__(self, server) -> None:
        self.server = server
        self._background: set[asyncio.Task] = set()  # shadow turns in flight (held: the loop keeps weak references)

    async def _servable(self, context, name: str, version: str):
        try:
            return await self.server.servable(name, version or None)
        except NotServable as error:
            await context.abort(STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL), error.message)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.server.ready)

    async def ModelReady(self, request, context):
        """A readiness question gets a yes or no, as over HTTP: no for an unknown model or version too."""
        try:
            await self.server.servable(request.name, request.version or None)
        except NotServable:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(**server_metadata())

    async def ModelMetadata(self, request, context):
        served = await self._servable(context, request.name, request.version)
        metadata = model_metadata(request.name, served.model, self.server.loaded_versions(first=served.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=metadata["name"], versions=metadata["versions"], platform=metadata["platform"],
            inputs=[tensor(**t) for t in metadata["inputs"]], outputs=[tensor(**t) for t in metadata["outputs"]])

    async def ModelConfig(self, request, context):
        served = await self._servable(context, request.name, request.version)
        config = json_format.ParseDict(self.server.configuration(request.name, served), pb.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request, context):
        server, started = self.server, time.perf_counter()
        metrics, code = server.metrics, grpc.StatusCode.OK
        try:
            return await self._infer(request, context)
        except aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            metrics.latency.labels(ENDPOINT).observe(time.perf_counter() - started)
            metrics.requests.labels(ENDPOINT, code.name).inc()

    async def _infer(self, request, context):
        server = self.server
        limit = server.settings.serving.max_body_bytes
        await self._servable(context, request.model_name, request.model_version)
        request_id = new_request_id()
        given = dict(context.invocation_metadata() or ())
        key = given.get(server.settings.serving.canary.key_header.lower()) or request_id
        inline = bool(request.raw_input_contents) or sum(len(t.contents.fp32_contents) for t in request.inputs) <= INLINE_VALUES
        try:
            inferred = await server.infer(lambda served: request_rows(request, served.model, max_infer_rows(served.model, limit)),
                                          key, inline=inline, version=request.model_version or None)
        except NotServable as error:
            server.metrics.errors.labels(ENDPOINT, "model").inc()
            await context.abort(STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL), error.message)
        except InputError as error:
            server.metrics.errors.labels(ENDPOINT, "bad_input").inc()
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(error, PayloadTooLarge) else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(error))
        served, logits = inferred.served, inferred.logits
        shadow_turn = server.answered("grpc", request_id, inferred, inferred.rows)
        if shadow_turn is not None:  # HTTP runs it once the answer is sent; here, just after
            task = asyncio.get_running_loop().create_task(shadow_turn())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        context.set_trailing_metadata((("x-request-id", request_id), ("x-model-version", served.version)))
        output = pb.ModelInferResponse.InferOutputTensor(name=served.model.contract.output_name, datatype=DATATYPE,
                                                         shape=list(logits.shape))
        return pb.ModelInferResponse(model_name=request.model_name, model_version=served.version, id=request.id,
                                     outputs=[output], raw_output_contents=[np.ascontiguousarray(logits, "<f4").tobytes()])


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start(server, host: str, port: int, token: str, max_message_bytes: int) -> aio.Server:
    """The gRPC endpoint of `server`, listening on host:port (the HTTP side checked that it may listen there)."""
    grpc_server = aio.server(
        interceptors=[TokenGuard(token)] if token else [],
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.so_reuseport", 0)])  # a port in use is an error, not a second server sharing it
    add_GRPCInferenceServiceServicer_to_server(V2Servicer(server), grpc_server)
    grpc_server.add_generic_rpc_handlers((UnsupportedMethods(),))
    # Reflection: grpcurl and other generic tools list and call the service without the .proto (open, like health:
    # it tells what the protocol is, which is public, nothing of the models).
    reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), grpc_server, pool=pb.POOL)
    try:
        grpc_server.add_insecure_port(address(host, port))
    except RuntimeError as error:
        raise OSError(f"cannot listen for gRPC on {address(host, port)}: {error}; pass --grpc-port N (0: no gRPC)") from None
    await grpc_server.start()
    log.info("gRPC (KServe V2) listening on %s", address(host, port))
    return grpc_server


async def stop(grpc_server: aio.Server) -> None:
    await grpc_server.stop(GRACE_SECONDS)
