#!/usr/bin/env bash
# Regenerate deploy/v2_protocol/ from its .proto (after changing it): grpcio-tools 1.81.1 writes gencode for
# protobuf >= 6.33.5, what pyproject.toml installs. The message classes are built in a pool of their own, not
# protobuf's default one: the protocol's names (inference.ModelInferRequest, ...) are also defined by Triton's and
# KServe's client packages, and a process that loads both would fail with "duplicate symbol".
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
python3 -m venv "$tools" && "$tools/bin/pip" install -q "grpcio-tools==1.81.1" "protobuf>=6.33.5,<7"
"$tools/bin/python" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. deploy/v2_protocol/grpc_predict_v2.proto
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/POOL = _descriptor_pool.DescriptorPool()  # its own: see scripts\/generate_v2_protocol.sh\nDESCRIPTOR = POOL.AddSerializedFile(/' \
  deploy/v2_protocol/grpc_predict_v2_pb2.py
rm -rf "$tools"
