"""The gRPC servicer on a real in-process server, with a fake participant: validation, routing to the part
that owns a call, status codes and the rejection metric."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
import torch

from node.config import build_config
from node.metrics import StageMetrics
from node.options import TimingOptions
from node.proto import stage_pb2 as pb
from node.recovery.stage0_copies import Stage0Copies
from node.stage.runtime import Reject, StepError
from node.stage.seat import Seat
from node.stage.service import NodeStatus, StageService
from node.topology import route_for
from node.transport.channels import ChannelPool
from node.transport.server import StageServer
from node.wire.tensors import encode_stream

CFG = build_config(overrides={"num_stages": 4, "train": {"microbatches_per_step": 2, "microbatch_size": 2,
                                                         "seq_len": 8}})  # fmt: skip
SHAPE = (2, 8, CFG.model.d_model)


class FakeParticipant:
    def __init__(self) -> None:
        self.seat = Seat(1, SimpleNamespace(committed_step=4, last_grad_norm=0.25))
        self.config = CFG
        self.activation_shape = SHAPE
        self.max_activation_bytes = 4 * 2 * 8 * CFG.model.d_model
        self.forwarded: list[int] = []

    async def on_forward(self, meta, x) -> None:
        if meta.step != 4:
            raise StepError(Reject.STALE_STEP, f"step {meta.step} is not 4")
        self.forwarded.append(meta.microbatch)


@pytest.fixture
async def served():
    participant, metrics = FakeParticipant(), StageMetrics()
    copies = Stage0Copies(CFG, None, None, None, TimingOptions(), metrics, None)
    service = StageService(participant, copies, None, lambda: NodeStatus(1, "peer-1", "online", 42), metrics)
    server, channels = StageServer(service), ChannelPool()
    address = await server.start("127.0.0.1", 0)
    yield SimpleNamespace(stub=channels.stub(address), participant=participant, metrics=metrics, service=service)
    await channels.close()
    await server.stop(grace=0)


def meta(mb: int = 0, step: int = 4) -> pb.MicrobatchMeta:
    return pb.MicrobatchMeta(step=step, microbatch=mb, route=route_for(mb, 4), hop=1, attempt=1)


def rejected(metrics: StageMetrics, reason: Reject) -> float:
    return metrics.registry.get_sample_value("swarm_node_rejected_messages_total", {"reason": reason.value})


async def test_a_valid_activation_reaches_the_participant(served) -> None:
    ack = await served.stub.Forward(encode_stream(meta(1), [("", torch.zeros(SHAPE))]))
    assert ack.ok and served.participant.forwarded == [1]


@pytest.mark.parametrize(
    ("message", "tensor", "code", "reason"),
    [
        (meta(0), torch.zeros(2, 8, 3), grpc.StatusCode.INVALID_ARGUMENT, Reject.BAD_SHAPE),
        (meta(0), torch.full(SHAPE, float("nan")), grpc.StatusCode.INVALID_ARGUMENT, Reject.NON_FINITE),
        (meta(0), torch.zeros(2, 8, 64, dtype=torch.int64), grpc.StatusCode.INVALID_ARGUMENT, Reject.BAD_DTYPE),
        (meta(7), torch.zeros(SHAPE), grpc.StatusCode.INVALID_ARGUMENT, Reject.BAD_MICROBATCH),
        (pb.MicrobatchMeta(step=4, route=[0, 2, 1, 3, 0], hop=1), torch.zeros(SHAPE), None, Reject.BAD_ROUTE),
        (meta(0, step=2), torch.zeros(SHAPE), grpc.StatusCode.FAILED_PRECONDITION, Reject.STALE_STEP),
    ],
)
async def test_bad_messages_are_refused_with_their_reason_and_counted(served, message, tensor, code, reason) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Forward(encode_stream(message, [("", tensor)]))
    assert err.value.details().startswith(reason.value)
    assert code is None or err.value.code() == code
    assert rejected(served.metrics, reason) == 1.0 and served.service.rejected_total == 1
    assert served.participant.forwarded == []


async def test_a_node_without_a_stage_is_not_ready(served) -> None:
    served.participant.seat.runtime = None
    for call in (served.stub.Prepare(pb.PrepareRequest(step=4, attempt=1)), served.stub.Abort(pb.AbortRequest())):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not_ready" in err.value.details()


async def test_rollback_without_checkpoints_and_copies_on_a_non_holder_are_refused(served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Rollback(pb.RollbackRequest(step=0, attempt=9))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no_checkpoint" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.PushReplica(encode_stream(pb.MicrobatchMeta(step=3), [("w.x", torch.zeros(2))]))
    assert "bad_route" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in served.stub.FetchReplica(pb.FetchWeightsRequest(step=3)):
            pass
    assert "unknown_step" in err.value.details()


async def test_status_and_heartbeat_describe_the_node(served) -> None:
    status = await served.stub.GetStatus(pb.StatusRequest())
    got = (status.stage, status.peer_id, status.state, status.committed_step, status.pid)
    assert got == (1, "peer-1", "online", 4, 42)
    assert status.last_grad_norm == 0.25 and list(status.checkpoint_steps) == []
    beat = await served.stub.Heartbeat(pb.HeartbeatRequest(sender_stage=0))
    assert (beat.stage, beat.peer_id, beat.committed_step) == (1, "peer-1", 4)
