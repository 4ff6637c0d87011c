"""The V2 protocol's gRPC messages as Graft defines them (deploy/v2_protocol/) against NVIDIA's client's own
(tritonclient.grpc.service_pb2): the same service and method names, and every field Graft keeps with the number
and type the client uses, so the two speak one wire format. Both load in one process (Graft's own pool)."""
from __future__ import annotations

from tritonclient.grpc import service_pb2 as triton

from deploy.v2 import DATATYPE
from deploy.v2_grpc import UNSUPPORTED_METHODS
from deploy.v2_protocol import grpc_predict_v2_pb2 as graft


def _messages(descriptor):
    yield descriptor
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            yield from _messages(nested)


def test_every_message_field_has_the_number_and_type_nvidias_client_uses():
    compared = 0
    for top in graft.DESCRIPTOR.message_types_by_name.values():
        for message in _messages(top):
            theirs = triton.DESCRIPTOR.pool.FindMessageTypeByName(message.full_name)
            for field in message.fields:
                other = theirs.fields_by_name[field.name]
                assert (field.number, field.type, field.is_repeated) == (other.number, other.type, other.is_repeated), (
                    f"{message.full_name}.{field.name}")
                compared += 1
    assert compared >= 60
    for enum in [*graft.DESCRIPTOR.enum_types_by_name.values(),
                 *(e for top in graft.DESCRIPTOR.message_types_by_name.values() for e in top.enum_types)]:
        theirs = triton.DESCRIPTOR.pool.FindEnumTypeByName(enum.full_name)
        assert {v.name: v.number for v in enum.values}.items() <= {v.name: v.number for v in theirs.values}.items(), (
            enum.full_name)


def test_the_service_and_its_methods_are_the_ones_the_client_calls():
    ours = graft.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            other.input_type.full_name, other.output_type.full_name)
    assert {m.name for m in ours.methods} == {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                               "ModelMetadata", "ModelInfer", "ModelConfig"}
    # every other method of Triton's service is answered by the extension it belongs to (tests/test_server.py)
    assert set(UNSUPPORTED_METHODS) | {m.name for m in ours.methods} == {m.name for m in theirs.methods}


def test_a_request_the_client_writes_is_read_as_it_was_meant():
    request = triton.ModelInferRequest(model_name="m", model_version="2", id="r1")
    tensor = request.inputs.add(name="pixels", datatype=DATATYPE, shape=[1, 2])
    tensor.parameters["binary_data_size"].int64_param = 8
    request.raw_input_contents.append(b"\x00" * 8)
    read = graft.ModelInferRequest.FromString(request.SerializeToString())
    assert (read.model_name, read.model_version, read.id) == ("m", "2", "r1")
    assert list(read.inputs[0].shape) == [1, 2] and read.inputs[0].parameters["binary_data_size"].int64_param == 8
    assert read.raw_input_contents == [b"\x00" * 8]
