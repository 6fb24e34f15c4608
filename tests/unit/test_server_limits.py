"""The server's call limits on a real in-process gRPC server: stream caps per connection, per caller and in all,
paced streams, and unary calls that are never starved by stalled streams."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from node.proto import stage_pb2 as pb
from node.proto import stage_pb2_grpc
from node.transport.channels import GRPC_OPTIONS
from node.transport.server import ServerLimits, StageServer
from node.transport.stage_rpc import StageClient


class Sink(stage_pb2_grpc.StageServicer):
    """Reads every Forward stream to its end; answers heartbeats."""

    def __init__(self) -> None:
        self.messages = 0

    async def Forward(self, request_iterator, context) -> pb.Ack:
        async for _ in request_iterator:
            self.messages += 1
        return pb.Ack(ok=True)

    async def Heartbeat(self, request, context) -> pb.HeartbeatReply:
        return pb.HeartbeatReply(stage=1)


LIMITS = ServerLimits(max_streams=6, streams_per_caller=4, streams_per_connection=3, message_idle_seconds=1.0)


@pytest.fixture
async def server():
    refused: list[tuple[str, str]] = []
    sink = Sink()
    srv = StageServer(sink, limits=LIMITS, on_refused=lambda reason, text: refused.append((reason, text)))
    address = await srv.start("127.0.0.1", 0)
    yield address, sink, refused
    await srv.stop(grace=0)


def connection(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=[*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)])


async def outcome(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_stalled_streams_hit_the_connection_cap_and_are_cut_off_while_heartbeats_go_on(server) -> None:
    address, sink, refused = server
    async with connection(address) as ch:
        stub = StageClient(ch)
        calls = [stub.Forward() for _ in range(5)]  # open, send nothing
        await asyncio.sleep(0.3)
        # the cap holds 3; the other 2 are refused at once, and heartbeats are not counted against it
        assert (await stub.Heartbeat(pb.HeartbeatRequest(), timeout=5)).stage == 1
        codes = [await outcome(c) for c in calls]
    assert sorted(codes, key=str) == sorted(
        [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2 + [grpc.StatusCode.DEADLINE_EXCEEDED] * 3, key=str
    )
    assert [r for r, _ in refused].count("busy") == 2 and [r for r, _ in refused].count("stalled") == 3
    assert sink.messages == 0


async def test_the_cap_per_caller_spans_its_connections_and_slots_come_back(server) -> None:
    address, sink, refused = server
    channels = [connection(address) for _ in range(3)]
    stubs = [StageClient(ch) for ch in channels]
    # 2 streams on each of 3 connections from one caller (this host): the caller's cap of 4 stops the fifth
    calls = [stubs[i % 3].Forward() for i in range(6)]
    await asyncio.sleep(0.3)
    codes = [await outcome(c) for c in calls]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2 and "caller limit" in refused[0][1]
    # every slot is free again: a stream that sends its messages in time goes through
    ack = await stubs[0].Forward(iter([b"", b""]), timeout=5)
    assert ack.ok and sink.messages == 2
    for ch in channels:
        await ch.close()


async def test_a_paced_stream_may_last_longer_than_the_idle_limit(server) -> None:
    address, sink, _ = server

    async def slow():
        for _ in range(4):
            await asyncio.sleep(0.5)
            yield b""

    async with connection(address) as ch:
        assert (await StageClient(ch).Forward(slow(), timeout=10)).ok
    assert sink.messages == 4
