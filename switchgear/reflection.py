"""gRPC server reflection under both names clients ask for: `grpc.reflection.v1` and `v1alpha`.

grpcio-reflection ships only v1alpha; newer clients (grpcurl's recent releases, Postman, grpcui)
ask for v1 first. The two protocols are the same messages under another package, so v1 is
served by the same servicer with v1alpha's (wire-identical) message classes, and its
descriptor — v1alpha's file with the package renamed — is added to the default pool so
reflection can describe v1 itself. Works on grpc.aio servers and on switchgear.rpc's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

V1ALPHA = reflection.SERVICE_NAME
V1 = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    pool.AddSerializedFile(proto.SerializeToString())


def enable(service_names: Iterable[str], server: Any) -> None:
    """Reflection v1 and v1alpha on `server`, listing `service_names` and both reflection services."""
    _add_v1_descriptor()
    names = tuple(dict.fromkeys((*service_names, V1, V1ALPHA)))
    servicer = reflection.aio.ReflectionServicer(names)
    v1alpha_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1, {"ServerReflectionInfo": handler}),))
