"""Stage service wiring with zero-copy-minded tensor streams.

The tensor-carrying RPCs (``Forward``, ``Backward``, ``FetchWeights``) move already-serialized
``TensorChunk`` bytes: :func:`node.wire.tensors.encode_stream` writes data chunks straight in protobuf wire
format, and the receiver copies each payload once into the tensor's buffer. The wire format is exactly the
one ``proto/stage.proto`` describes, so any gRPC client that speaks it interoperates; only the Python
objects in between are skipped.

Requests of the other RPCs arrive as bytes too and are parsed inside the handler, after the membership
check: a request that protobuf cannot parse is refused with ``INVALID_ARGUMENT`` (reason ``bad_message``)
through the servicer's ``bad_message``, where gRPC's own deserializer would answer ``UNKNOWN`` and log it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from node.proto import stage_pb2 as pb
from node.proto import stage_pb2_grpc

SERVICE = "swarm_node.v1.Stage"


def _identity(message: bytes) -> bytes:
    return message


BadMessage = Callable[[grpc.aio.ServicerContext, str], Awaitable[None]]


async def _abort_bad_message(context: grpc.aio.ServicerContext, message: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad_message: {message}")


async def _parse(raw: bytes, request: Any, context: grpc.aio.ServicerContext, bad: BadMessage) -> Any:
    try:
        return request.FromString(raw)
    except DecodeError as err:
        await bad(context, f"not a {request.DESCRIPTOR.name}: {err}")


def _unary(method: Callable, request: Any, bad: BadMessage) -> Callable:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await method(await _parse(raw, request, context, bad), context)

    return handle


def _server_stream(method: Callable, request: Any, bad: BadMessage) -> Callable:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext):
        async for item in method(await _parse(raw, request, context, bad), context):
            yield item

    return handle


def add_stage_service(servicer: stage_pb2_grpc.StageServicer, server: grpc.aio.Server) -> None:
    """Registers ``servicer``; its tensor streams see raw message bytes (decode with TensorAssembler). A
    request that does not parse goes to ``servicer.bad_message(context, text)`` when it has one."""
    bad: BadMessage = getattr(servicer, "bad_message", _abort_bad_message)
    handlers = {
        name: grpc.stream_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=_identity, response_serializer=pb.Ack.SerializeToString
        )
        for name in ("Forward", "Backward", "PushReplica", "ParkState", "PushGradients")
    }
    for name in ("FetchWeights", "FetchReplica", "ExportWeights"):
        handlers[name] = grpc.unary_stream_rpc_method_handler(
            _server_stream(getattr(servicer, name), pb.FetchWeightsRequest, bad),
            request_deserializer=_identity,
            response_serializer=_identity,
        )
    for name, (request, reply) in {
        "Prepare": (pb.PrepareRequest, pb.PrepareReply),
        "Commit": (pb.CommitRequest, pb.CommitReply),
        "Abort": (pb.AbortRequest, pb.Ack),
        "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatReply),
        "GetStatus": (pb.StatusRequest, pb.StageStatus),
        "Rollback": (pb.RollbackRequest, pb.RollbackReply),
    }.items():
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _unary(getattr(servicer, name), request, bad),
            request_deserializer=_identity,
            response_serializer=reply.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class StageClient(stage_pb2_grpc.StageStub):
    """The generated stub, except that tensor streams send and receive serialized bytes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel)
        self.Forward = channel.stream_unary(
            f"/{SERVICE}/Forward", request_serializer=_identity, response_deserializer=pb.Ack.FromString
        )
        self.Backward = channel.stream_unary(
            f"/{SERVICE}/Backward", request_serializer=_identity, response_deserializer=pb.Ack.FromString
        )
        for name in ("PushReplica", "ParkState", "PushGradients"):
            setattr(
                self,
                name,
                channel.stream_unary(
                    f"/{SERVICE}/{name}", request_serializer=_identity, response_deserializer=pb.Ack.FromString
                ),
            )
        for name in ("FetchWeights", "FetchReplica", "ExportWeights"):
            setattr(
                self,
                name,
                channel.unary_stream(
                    f"/{SERVICE}/{name}",
                    request_serializer=pb.FetchWeightsRequest.SerializeToString,
                    response_deserializer=_identity,
                ),
            )
