"""The gRPC servicer on a real in-process server, with a fake participant: validation, routing to the part
that owns a call, status codes and the rejection metric."""

from __future__ import annotations

import asyncio
import contextlib
import time
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
from node.stage.service import MAX_STEP, NodeStatus, StageService, attempt_ceiling
from node.stage.weights import FetchLimits
from node.topology import route_for
from node.transport.channels import GRPC_OPTIONS
from node.transport.server import StageServer
from node.transport.stage_rpc import StageClient
from node.wire.quantize import SCALE_NAME, dequantize_blockwise, quantize_blockwise
from node.wire.tensors import TensorAssembler, encode_stream

CFG = build_config(overrides={"num_stages": 4, "train": {"microbatches_per_step": 2, "microbatch_size": 2,
                                                         "seq_len": 8}})  # fmt: skip
SHAPE = (2, 8, CFG.model.d_model)


class FakeRuntime:
    def __init__(self, committed_step: int = 4) -> None:
        self.committed_step, self.last_grad_norm, self.attempt = committed_step, 0.25, 0
        self.prepared = False


class FakeParticipant:
    def __init__(self) -> None:
        self.seat = Seat(1, FakeRuntime())
        self.config = CFG
        self.activation_shape = SHAPE
        self.max_activation_bytes = 4 * 2 * 8 * CFG.model.d_model
        self.forwarded: list[int] = []
        self.aborted: list[tuple[int, int]] = []
        self.after_commit: list = []
        self.snapshots = 0  # calls of snapshot_committed (each clones the weights on the compute thread)
        self.weights = {"w.a": torch.arange(6.0), "w.b": torch.ones(2, 3)}

    async def on_forward(self, meta, x) -> None:
        if meta.step != 4:
            raise StepError(Reject.STALE_STEP, f"step {meta.step} is not 4")
        self.forwarded.append(meta.microbatch)
        self.received = x

    async def abort(self, step: int, attempt: int) -> None:
        self.aborted.append((step, attempt))

    async def prepare(self, step: int, attempt: int, shares=None) -> float:
        return 2.0

    async def snapshot_committed(self):
        self.snapshots += 1
        await asyncio.sleep(0.05)  # while it runs, other callers arrive
        rt = self.seat.runtime
        return rt.committed_step, rt.last_grad_norm, {k: v.clone() for k, v in self.weights.items()}

    async def snapshot_full(self):
        state = {f"w.{k}": v.clone() for k, v in self.weights.items()}
        state["meta.lr_scale"] = torch.tensor(1.1, dtype=torch.float64)
        return self.seat.runtime.committed_step, state

    async def wait_committed(self, step: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.seat.runtime.committed_step < step and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.seat.runtime.committed_step >= step

    def commit_one(self) -> None:
        self.seat.runtime.committed_step += 1
        for hook in self.after_commit:
            hook(self.seat.runtime.committed_step)


@contextlib.asynccontextmanager
async def serving(limits: FetchLimits = FetchLimits()):
    participant, metrics = FakeParticipant(), StageMetrics()
    copies = Stage0Copies(CFG, None, None, None, TimingOptions(), metrics, None)
    status = lambda: NodeStatus(1, "peer-1", "online", 42)  # noqa: E731
    service = StageService(participant, copies, None, status, metrics, fetch_limits=limits)
    server = StageServer(service)
    address = await server.start("127.0.0.1", 0)
    channels: list[grpc.aio.Channel] = []

    def client() -> StageClient:  # a caller of its own (its own connection)
        channels.append(grpc.aio.insecure_channel(address, options=GRPC_OPTIONS))
        return StageClient(channels[-1])

    try:
        yield SimpleNamespace(
            stub=client(),
            client=client,
            participant=participant,
            metrics=metrics,
            service=service,
            copies=copies,
            address=address,
        )
    finally:
        for channel in channels:
            await channel.close(grace=None)
        await server.stop(grace=0)


@pytest.fixture
async def served():
    async with serving() as s:
        yield s


def meta(mb: int = 0, step: int = 4) -> pb.MicrobatchMeta:
    return pb.MicrobatchMeta(step=step, microbatch=mb, route=route_for(mb, 4), hop=1, attempt=1)


def rejected(metrics: StageMetrics, reason: Reject) -> float:
    return metrics.registry.get_sample_value("swarm_node_rejected_messages_total", {"reason": reason.value})


async def test_a_valid_activation_reaches_the_participant(served) -> None:
    ack = await served.stub.Forward(encode_stream(meta(1), [("", torch.zeros(SHAPE))]))
    assert ack.ok and served.participant.forwarded == [1]


async def test_an_int8_activation_arrives_dequantized_and_bad_scales_are_refused(served) -> None:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    codes, scales = quantize_blockwise(x)
    assert (await served.stub.Forward(encode_stream(meta(1), [("", codes), (SCALE_NAME, scales)]))).ok
    got = served.participant.received
    assert got.dtype == torch.float32 and torch.equal(got, dequantize_blockwise(codes, scales))
    for bad, reason in [
        ([("", codes), (SCALE_NAME, -scales)], Reject.BAD_DTYPE),  # a negative scale
        ([("", codes), (SCALE_NAME, scales[:-1])], Reject.BAD_DTYPE),  # one block without its scale
        ([("", x.bfloat16()), (SCALE_NAME, scales)], Reject.BAD_DTYPE),  # scales with float "codes"
        ([("", codes)], Reject.BAD_DTYPE),  # codes without scales: int8 is no activation type
        ([("", codes), ("other", scales)], Reject.BAD_STREAM),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.stub.Forward(encode_stream(meta(0), bad))
        assert err.value.details().startswith(reason.value), err.value.details()
    assert served.participant.forwarded == [1] and served.service.refusals.total == 5


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
    assert rejected(served.metrics, reason) == 1.0 and served.service.refusals.total == 1
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
    nudges: list[int] = []
    served.service.nudged = lambda: nudges.append(1)
    await served.stub.Heartbeat(pb.HeartbeatRequest(sender_stage=0))
    assert nudges == []  # a plain heartbeat
    await served.stub.Heartbeat(pb.HeartbeatRequest(sender_stage=0, refresh=True))
    assert nudges == [1]  # a nudge: re-read the DHT now


# ---- sane ranges ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda stub, a: stub.Prepare(pb.PrepareRequest(step=4, attempt=a)),
        lambda stub, a: stub.Commit(pb.CommitRequest(step=4, attempt=a, clip_coef=1.0)),
        lambda stub, a: stub.Abort(pb.AbortRequest(step=4, attempt=a)),
        lambda stub, a: stub.Forward(encode_stream(pb.MicrobatchMeta(
            step=4, microbatch=0, route=route_for(0, 4), hop=1, attempt=a), [("", torch.zeros(SHAPE))])),
    ],
)  # fmt: skip
# The third value is taken when the test runs, not at collection: a long suite would reach it otherwise.
@pytest.mark.parametrize("attempt", [2**63, 2**64 - 1, lambda: attempt_ceiling(time.time()) + 2_000_000_000])
async def test_attempts_beyond_the_wall_clock_are_refused(served, call, attempt) -> None:
    attempt = attempt() if callable(attempt) else attempt
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(served.stub, attempt)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("out_of_range: attempt")
    assert rejected(served.metrics, Reject.OUT_OF_RANGE) == 1.0
    assert served.participant.aborted == [] and served.participant.forwarded == []


async def test_a_real_attempt_and_steps_beyond_any_run(served) -> None:
    now_attempt = int(time.time() * 1000) * 1000 + 7  # how stage 0's driver numbers attempts
    assert (await served.stub.Abort(pb.AbortRequest(step=4, attempt=now_attempt))).ok
    assert served.participant.aborted == [(4, now_attempt)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.Abort(pb.AbortRequest(step=MAX_STEP + 1, attempt=1))
    assert err.value.details().startswith("out_of_range: step")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in served.stub.FetchReplica(pb.FetchWeightsRequest(step=2**64 - 1)):
            pass
    assert err.value.details().startswith("out_of_range: step")
    assert rejected(served.metrics, Reject.OUT_OF_RANGE) == 2.0


# ---- rejection logs ---------------------------------------------------------------------------------
async def test_every_rejection_is_counted_but_logged_once_per_reason_and_interval(served, caplog) -> None:
    bad = list(encode_stream(meta(0), [("", torch.zeros(2, 8, 3))]))
    with caplog.at_level("WARNING", logger="node.stage.refusals"):
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError):
                await served.stub.Forward(iter(bad))
    assert rejected(served.metrics, Reject.BAD_SHAPE) == 20.0 and served.service.refusals.total == 20
    lines = [r.getMessage() for r in caplog.records if r.name == "node.stage.refusals"]
    assert len(lines) == 1 and lines[0].startswith("rejected message: bad_shape: shape [2, 8, 3]")
    assert (await served.stub.GetStatus(pb.StatusRequest())).rejected_messages == 20


# ---- FetchWeights: one snapshot per committed step, one stream at a time -----------------------------
async def _fetch(stub, rpc: str = "FetchWeights", step: int = 0, read_delay: float = 0.0):
    asm = TensorAssembler(max_tensor_bytes=1 << 30, max_stream_bytes=1 << 30)
    async for message in getattr(stub, rpc)(pb.FetchWeightsRequest(step=step), timeout=30):
        asm.feed(message)
        await asyncio.sleep(read_delay)
    return asm.meta, asm.finish()


async def test_callers_of_one_step_share_one_snapshot_and_a_commit_drops_it(served) -> None:
    p = served.participant
    got = await asyncio.gather(*(_fetch(served.client()) for _ in range(3)))
    assert p.snapshots == 1  # three callers, one copy of the weights
    for meta_, tensors in got:
        assert (meta_.step, meta_.grad_norm, meta_.sender_peer) == (4, 0.25, "peer-1")
        assert all(torch.equal(tensors[k], v) for k, v in p.weights.items())
    assert served.service.weights._snapshot is not None  # kept for the next caller of step 4
    p.weights["w.a"] += 1
    p.commit_one()
    assert served.service.weights._snapshot is None  # the stage moved on: the copy is dropped at once
    meta_, tensors = await _fetch(served.stub)
    assert p.snapshots == 2 and meta_.step == 5 and torch.equal(tensors["w.a"], torch.arange(6.0) + 1)
    p.seat.runtime = FakeRuntime(5)  # a rollback installs another runtime at the same step number
    await _fetch(served.stub)
    assert p.snapshots == 3


async def test_export_gives_exactly_the_step_asked_for_waiting_for_its_commit(served) -> None:
    p = served.participant
    meta_, tensors = await _fetch(served.stub, "ExportWeights", step=4)  # the committed step: at once
    assert meta_.step == 4 and torch.equal(tensors["w.a"], p.weights["w.a"])
    ahead = asyncio.ensure_future(_fetch(served.client(), "ExportWeights", step=5))
    await asyncio.sleep(0.2)
    assert not ahead.done()  # step 5 is not committed yet: the call waits for it
    p.weights["w.a"] = torch.arange(6.0) * 2
    p.commit_one()
    meta_, tensors = await ahead
    assert meta_.step == 5 and torch.equal(tensors["w.a"], torch.arange(6.0) * 2)
    with pytest.raises(grpc.aio.AioRpcError) as past:
        await _fetch(served.stub, "ExportWeights", step=4)
    assert past.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "past 4" in past.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await served.stub.ExportWeights(pb.FetchWeightsRequest(step=9), timeout=0.5).read()
    assert late.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert p.seat.runtime.committed_step == 5  # nothing an exporter asks changes the stage


async def test_streams_are_served_one_at_a_time(served) -> None:
    active, peak = 0, 0
    send = served.service.weights.send

    async def counting(context, chunks, rpc):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await send(context, chunks, rpc)
        finally:
            active -= 1

    served.service.weights.send = counting
    served.participant.weights = {f"w.{i}": torch.full((1 << 18,), float(i)) for i in range(4)}  # 4 MiB
    got = await asyncio.gather(*(_fetch(served.client(), read_delay=0.001) for _ in range(3)))
    assert peak == 1 and len(got) == 3 and served.participant.snapshots == 1


async def test_a_caller_over_the_wait_limits_is_told_busy() -> None:
    async with serving(FetchLimits(wait_seconds=0.3, max_waiting=1, stall_seconds=10)) as s:
        s.participant.weights = {"w.big": torch.zeros(8 << 20)}  # 32 MiB: more than the flow-control window
        stalled = s.client().FetchWeights(pb.FetchWeightsRequest(), timeout=30)
        await stalled.read()  # then reads nothing more: it holds the turn
        waiting = asyncio.create_task(_fetch(s.client()))
        await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a second one waiting is over max_waiting
            await _fetch(s.client())
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.details().startswith("busy")
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the waiting one gives up after wait_seconds
            await waiting
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert rejected(s.metrics, Reject.BUSY) == 2.0 and s.participant.snapshots == 1
        stalled.cancel()


async def test_a_stalled_reader_loses_its_stream_and_the_next_caller_is_served() -> None:
    async with serving(FetchLimits(wait_seconds=5, stall_seconds=0.5)) as s:
        s.participant.weights = {"w.big": torch.ones(8 << 20)}
        stalled = s.client().FetchWeights(pb.FetchWeightsRequest(), timeout=30)
        await stalled.read()
        started = time.monotonic()
        meta_, tensors = await _fetch(s.client())  # waits for its turn: the stalled one is cut off
        assert meta_.step == 4 and torch.equal(tensors["w.big"], torch.ones(8 << 20))
        assert time.monotonic() - started < 4.0
        assert s.participant.snapshots == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await stalled.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "fell behind" in err.value.details()
        assert not s.service.weights.weights_turn._lock.locked()


async def test_fetch_replica_is_served_one_at_a_time_too() -> None:
    async with serving(FetchLimits(wait_seconds=0.3, max_waiting=0, stall_seconds=10)) as s:
        s.copies.copy_for = lambda step: (pb.MicrobatchMeta(step=3), {"w.x": torch.zeros(8 << 20)})
        stalled = s.client().FetchReplica(pb.FetchWeightsRequest(step=3), timeout=30)
        await stalled.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _fetch(s.client(), "FetchReplica", step=3)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stalled.cancel()
        await asyncio.sleep(0.2)
        meta_, tensors = await _fetch(s.client(), "FetchReplica", step=3)
        assert meta_.step == 3 and meta_.sender_peer == "peer-1" and tensors["w.x"].numel() == 8 << 20


@pytest.mark.parametrize("rpc", ["Prepare", "Commit", "Abort", "Rollback", "Heartbeat", "GetStatus", "FetchWeights"])
@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x08" + b"\x80" * 10, b"\x0c"])  # garbage, bad varint, end group
async def test_a_request_that_does_not_parse_is_invalid_argument_and_counted(served, rpc: str, raw: bytes) -> None:
    async with grpc.aio.insecure_channel(served.address, options=GRPC_OPTIONS) as channel:
        ident = lambda b: b  # noqa: E731
        method = f"/swarm_node.v1.Stage/{rpc}"
        if rpc == "FetchWeights":
            call = channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)(raw)
            pending = call.read()
        else:
            pending = channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)(raw)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pending
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("bad_message")
    assert rejected(served.metrics, Reject.BAD_MESSAGE) == 1.0 and served.service.refusals.total == 1
    assert served.participant.aborted == []


async def test_control_requests_are_checked_against_the_claim_epoch() -> None:
    superseded: list[int] = []
    async with serving() as s:
        s.service.superseded = superseded.append
        s.participant.seat.epoch = 500
        cases = [
            (pb.AbortRequest(step=4, attempt=1, stage=1, epoch=500), None),  # the current claim: applied
            (pb.AbortRequest(step=4, attempt=2), None),  # no epoch given (a tool): applied
            (pb.AbortRequest(step=4, attempt=3, stage=1, epoch=499), Reject.STALE_EPOCH),  # the sender's view is old
            (pb.AbortRequest(step=4, attempt=4, stage=2, epoch=500), Reject.BAD_ROUTE),  # another stage
            (pb.AbortRequest(step=4, attempt=5, stage=1, epoch=501), Reject.FENCED),  # this node was replaced
        ]
        for request, reason in cases:
            if reason is None:
                assert (await s.stub.Abort(request)).ok
                continue
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.stub.Abort(request)
            assert err.value.details().startswith(reason.value), err.value.details()
            assert rejected(s.metrics, reason) == 1.0
        assert s.participant.aborted == [(4, 1), (4, 2)] and superseded == [501]


async def test_a_leaving_stage_finishes_its_step_then_hands_its_full_state_over_and_prepares_no_more(served) -> None:
    seat = served.participant.seat

    async def fetch(stage: int = 1):
        request = pb.FetchWeightsRequest(requester_stage=stage, full_state=True)
        asm = TensorAssembler(1 << 20, 1 << 20)
        async for message in served.stub.FetchWeights(request):
            asm.feed(message)
        return asm.meta, asm.finish()

    async def refused(call) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        return err.value.details().split(":")[0]

    assert await refused(fetch()) == Reject.NOT_READY  # its owner is not leaving
    seat.handing_over = True
    reply = await served.stub.Prepare(pb.PrepareRequest(step=4, attempt=1, stage=1))
    assert reply.grad_norm_sq == 2.0  # the step in flight is still prepared (and committed) here
    seat.runtime.prepared = True  # ... and waits for its commit or abort
    assert await refused(fetch()) == Reject.BUSY
    seat.runtime.prepared = False
    served.service.handoffs.preparing = 1  # being prepared: the same
    assert await refused(fetch()) == Reject.BUSY
    served.service.handoffs.preparing = 0
    assert await refused(fetch(stage=2)) == Reject.BAD_ROUTE
    meta, tensors = await fetch()
    assert meta.step == 4 and torch.equal(tensors["w.w.a"], torch.arange(6.0))
    assert float(tensors["meta.lr_scale"]) == 1.1 and served.service.handoffs.handed_over == [4]
    # the state has gone: a step prepared now would commit without the successor
    assert await refused(served.stub.Prepare(pb.PrepareRequest(step=4, attempt=1))) == Reject.DRAINING


async def test_a_neighbours_parked_state_is_kept_announced_and_given_back_to_its_stage(served) -> None:
    from node.recovery.rebuild import expected_state

    # stage 2's state (this servicer serves stage 1, its route neighbour), as a leaving owner sends it
    spec = expected_state(CFG, 2)
    state = {f"w.{k}": torch.full(shape, 0.5, dtype=dtype) for k, (shape, dtype) in spec.items()}
    state["meta.lr_scale"] = torch.tensor(1.1, dtype=torch.float64)
    state["meta.last_grad_norm"] = torch.tensor(0.3, dtype=torch.float64)
    meta = pb.MicrobatchMeta(step=4, sender_stage=2)
    assert (await served.stub.ParkState(encode_stream(meta, list(state.items())))).ok
    assert served.service.handoffs.parked_at == (2, 4)
    bad = {**state, "meta.lr_scale": torch.tensor(float("nan"), dtype=torch.float64)}
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a state that cannot be stage 2 is refused
        await served.stub.ParkState(encode_stream(meta, list(bad.items())))
    assert err.value.details().startswith("bad_stream") and served.service.handoffs.parked_at == (2, 4)
    asm = TensorAssembler(1 << 24, 1 << 24)
    async for message in served.stub.FetchWeights(pb.FetchWeightsRequest(requester_stage=2, parked=True)):
        asm.feed(message)
    assert asm.meta.step == 4 and torch.equal(asm.finish()["w." + next(iter(spec))], state["w." + next(iter(spec))])
    with pytest.raises(grpc.aio.AioRpcError):  # nothing parked for stage 3
        async for _ in served.stub.FetchWeights(pb.FetchWeightsRequest(requester_stage=3, parked=True)):
            pass


async def test_a_neighbour_snapshot_is_kept_only_from_a_stage_this_one_holds_for_and_newest_first(served) -> None:
    from node.recovery.rebuild import expected_state

    # this servicer serves stage 1, which holds stage 0's snapshots (--recovery ladder)
    def snapshot(stage: int, value: float = 0.5) -> dict[str, torch.Tensor]:
        state = {f"w.{k}": torch.full(shape, value, dtype=dtype) for k, (shape, dtype) in
                 expected_state(CFG, stage).items()}  # fmt: skip
        state["meta.lr_scale"] = torch.tensor(1.0, dtype=torch.float64)
        state["meta.last_grad_norm"] = torch.tensor(0.3, dtype=torch.float64)
        return state

    async def park(stage: int, step: int, state: dict[str, torch.Tensor]) -> str | None:
        m = pb.MicrobatchMeta(step=step, sender_stage=stage, sender_peer="s0", snapshot=True)
        try:
            await served.stub.ParkState(encode_stream(m, list(state.items())))
        except grpc.aio.AioRpcError as err:
            return err.details().split(":")[0]
        return None

    store = served.service.snapshots
    assert await park(0, 4, snapshot(0)) is None and store.steps() == [(0, 4)]
    assert await park(2, 4, snapshot(2)) == Reject.BAD_ROUTE  # stage 2's snapshots are held by stage 3
    assert await park(0, 9, snapshot(0)) == Reject.UNKNOWN_STEP  # a step this stage has not reached
    assert await park(0, 3, snapshot(0)) == Reject.STALE_STEP  # older than the one held
    assert await park(0, 5, snapshot(0, float("nan"))) == Reject.BAD_STREAM
    assert await park(0, 5, snapshot(1)) == Reject.BAD_STREAM  # not stage 0's tensors
    assert store.steps() == [(0, 4)] and not served.service.handoffs.parked_at  # a snapshot is not a park
    assert await park(0, 5, snapshot(0, 0.25)) is None and store.steps() == [(0, 5)]  # the sender's next commit
    asm = TensorAssembler(1 << 26, 1 << 26)
    async for message in served.stub.FetchWeights(pb.FetchWeightsRequest(requester_stage=0, snapshot=True)):
        asm.feed(message)
    got = asm.finish()
    assert asm.meta.step == 5 and asm.meta.snapshot and all(float(t.flatten()[0]) == 0.25 for k, t in got.items()
                                                            if k.startswith("w."))  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError):  # no snapshot of stage 2 here
        async for _ in served.stub.FetchWeights(pb.FetchWeightsRequest(requester_stage=2, snapshot=True)):
            pass


async def test_the_server_announces_the_port_others_reach_it_by_and_owns_its_port() -> None:
    """Behind a port mapping or a proxy the announced port is the outside one. A second server on a port in
    use fails to start (gRPC's default SO_REUSEPORT would let two daemons share it, splitting their callers)."""
    participant, metrics = FakeParticipant(), StageMetrics()
    copies = Stage0Copies(CFG, None, None, None, TimingOptions(), metrics, None)
    service = StageService(participant, copies, None, lambda: NodeStatus(1, "peer-1", "online", 42), metrics)
    plain, mapped, clash = StageServer(service), StageServer(service), StageServer(service)
    try:
        bound = await plain.start("127.0.0.1", 0)
        port = int(bound.rsplit(":", 1)[1])
        assert bound.startswith("127.0.0.1:") and port > 0
        announced = await mapped.start("127.0.0.1", 0, announce_host="203.0.113.7", announce_port=40001)
        assert announced == "203.0.113.7:40001"
        with pytest.raises(OSError, match="cannot bind"):
            await clash.start("127.0.0.1", port)
    finally:
        await plain.stop(0)
        await mapped.stop(0)
