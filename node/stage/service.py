"""The gRPC ``Stage`` service: validates every message, then hands it to the part that owns it.

Nothing from the network reaches the stage's state before it has been checked: stream structure and
byte limits (in the decoder), route and hop, tensor dtype, shape and finiteness, then step, attempt and
microbatch (in the runtime). A refused message gets a gRPC status whose details start with the reason
code, is counted (:class:`node.stage.refusals.Refusals`), and changes nothing.

Steps and attempts must be in a sane range: no step beyond ``MAX_STEP``, and no attempt beyond what stage 0's
driver could have made by now (it numbers attempts from the wall clock in milliseconds × 1000), with
``ATTEMPT_CLOCK_SLACK_SECONDS`` for clock differences. A forged huge attempt would otherwise make this stage
refuse every real one.

Weight streams (``FetchWeights``, ``ExportWeights``, ``FetchReplica``) are served by
:class:`~node.stage.weights.WeightStreams`, one at a time and bounded in time.

The service depends on the pipeline participant, the stage-0 copy store and (``--recovery checkpoint``)
the checkpoint keeper; ``status`` describes the node for ``Heartbeat`` and ``GetStatus``, and
``GetStatus(swarm=True)`` also returns the presence's view of the swarm (for ``swarm-node status --peer``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from node.checkpoint.keeper import CheckpointKeeper
from node.metrics import StageMetrics
from node.proto import stage_pb2 as pb
from node.proto import stage_pb2_grpc
from node.recovery.neighbour_snapshots import SnapshotStore
from node.recovery.stage0_copies import Stage0Copies
from node.stage.handoffs import Handoffs
from node.stage.participant import PipelineParticipant
from node.stage.refusals import Refusals
from node.stage.runtime import Reject, StepError
from node.stage.weights import FetchLimits, WeightStreams
from node.topology import check_route
from node.wire.quantize import SCALE_NAME, dequantize_blockwise
from node.wire.records import StageRecord, stages_key
from node.wire.tensors import WireError, decode_stream, encode_stream

logger = logging.getLogger(__name__)

MAX_STEP = 1 << 48  # far beyond any run; steps stay exact as floats and in int64
ATTEMPT_CLOCK_SLACK_SECONDS = 3600.0

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def replica_route_problem(meta: pb.MicrobatchMeta, me: str) -> str | None:
    """Why a microbatch's replica routing does not fit this node (None: it does, or it names no replicas)."""
    hops = len(meta.route)
    if meta.route_peers and len(meta.route_peers) != hops:
        return f"{len(meta.route_peers)} route peers for a route of {hops} hops"
    if meta.prev_microbatch and len(meta.prev_microbatch) != hops:
        return f"{len(meta.prev_microbatch)} previous microbatches for a route of {hops} hops"
    if meta.route_peers and meta.route_peers[meta.hop] != me:
        return f"microbatch {meta.microbatch} was routed to replica {meta.route_peers[meta.hop]}, not this one"
    if meta.prev_microbatch and not -1 <= meta.prev_microbatch[meta.hop] < meta.microbatch:
        return f"previous microbatch {meta.prev_microbatch[meta.hop]} of {meta.microbatch} is not below it"
    return None


def shares_problem(shares: list[tuple[str, list[int]]], num_microbatches: int) -> str | None:
    """Why the replica shares of a Prepare are malformed (None: they partition the step's microbatches)."""
    if not shares:
        return None
    peers = [peer for peer, _ in shares]
    if len(set(peers)) != len(peers) or not all(peers):
        return "replica shares name a peer twice (or none)"
    every = sorted(mb for _, mbs in shares for mb in mbs)
    if every != list(range(num_microbatches)) or any(mbs != sorted(mbs) for _, mbs in shares):
        return "replica shares do not split the step's microbatches"
    return None


def all_finite(x: torch.Tensor) -> bool:
    """NaN/Inf anywhere make the sum non-finite; only then (or on overflow) pay for the exact check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def attempt_ceiling(now: float) -> int:
    """The largest attempt a stage 0 could send at wall-clock time ``now`` (see the driver's numbering)."""
    return int((now + ATTEMPT_CLOCK_SLACK_SECONDS) * 1000) * 1000


def range_problem(step: int, attempt: int | None = None, now: float | None = None) -> str | None:
    """Why ``step``/``attempt`` cannot come from this swarm (None when they can)."""
    if step > MAX_STEP:
        return f"step {step} is beyond any run (at most {MAX_STEP})"
    if attempt is not None:
        ceiling = attempt_ceiling(time.time() if now is None else now)
        if attempt > ceiling:
            return f"attempt {attempt} is ahead of the wall clock (at most {ceiling} now)"
    return None


@dataclass(frozen=True)
class NodeStatus:
    """What Heartbeat and GetStatus report about this node."""

    stage: int | None
    peer_id: str
    state: str
    pid: int


class StageService(stage_pb2_grpc.StageServicer):
    """Server side of one stage daemon."""

    def __init__(
        self,
        participant: PipelineParticipant,
        copies: Stage0Copies,
        checkpoints: CheckpointKeeper | None,
        status: Callable[[], NodeStatus],
        metrics: StageMetrics,
        fetch_limits: FetchLimits = FetchLimits(),
        superseded: Callable[[int], None] = lambda epoch: None,
        nudged: Callable[[], object] | None = None,
    ) -> None:
        """``nudged``: a heartbeat asks this node to re-read the DHT now (``Nudges.nudged``)."""
        self.participant, self.copies, self.checkpoints = participant, copies, checkpoints
        self.superseded = superseded  # a control request addressed this stage by a newer claim epoch
        self.nudged = nudged
        self.status, self.metrics, self.fetch_limits = status, metrics, fetch_limits
        self.refusals = Refusals(metrics)
        self.weights = WeightStreams(participant, self.refusals, status, fetch_limits)
        self.handoffs = Handoffs(participant, self.refusals, self.weights.send, status)
        self.snapshots = SnapshotStore(participant.config, participant.seat, self.refusals, self.weights.send, metrics)

    async def _reject(self, context: grpc.aio.ServicerContext, reason: Reject, message: str) -> None:
        await self.refusals.refuse(context, reason, message)

    async def bad_message(self, context: grpc.aio.ServicerContext, message: str) -> None:
        """Refuses a request that does not parse as its RPC's message (see ``add_stage_service``)."""
        await self.refusals.refuse(context, Reject.BAD_MESSAGE, message)

    async def _in_range(self, context, step: int, attempt: int | None = None) -> bool:
        problem = range_problem(step, attempt)
        if problem is not None:
            await self._reject(context, Reject.OUT_OF_RANGE, problem)
            return False
        return True

    async def _addressed(self, context, request) -> bool:
        """A control request names the stage and claim epoch it addresses (epoch 0: not given). An epoch above
        this node's claim means another peer has taken the stage over: this node stops serving it
        (``superseded``) and refuses; one below means the sender's view is out of date: refused, changes nothing."""
        if not request.epoch:
            return True
        seat = self.participant.seat
        if request.stage != seat.stage:
            await self._reject(context, Reject.BAD_ROUTE, f"addressed to stage {request.stage}, this is {seat.stage}")
        elif request.epoch > seat.epoch:
            self.superseded(request.epoch)
            await self._reject(context, Reject.FENCED, f"stage {seat.stage} is held by epoch {request.epoch} now")
        elif request.epoch < seat.epoch:
            await self._reject(context, Reject.STALE_EPOCH, f"epoch {request.epoch} < this claim's {seat.epoch}")
        return request.epoch == seat.epoch

    async def _control(self, context, request) -> bool:
        """Whether a control request may proceed: this node holds a stage, the request addresses it, and its
        step and attempt are in range."""
        return (
            await self._ready(context)
            and await self._addressed(context, request)
            and await self._in_range(context, request.step, request.attempt)
        )

    async def _ready(self, context: grpc.aio.ServicerContext) -> bool:
        if not self.participant.seat.ready:
            await self._reject(context, Reject.NOT_READY, "this node holds no stage yet (spare or rebuilding)")
            return False
        return True

    async def _decode(self, request_iterator, context, limit: int):
        try:
            return await decode_stream(request_iterator, max_tensor_bytes=limit, max_stream_bytes=limit)
        except WireError as err:
            reason = Reject(err.reason) if err.reason in Reject._value2member_map_ else Reject.BAD_STREAM
            await self._reject(context, reason, str(err))
            return None, {}

    async def _receive(
        self, request_iterator, context, direction: str
    ) -> tuple[pb.MicrobatchMeta, torch.Tensor] | None:
        p = self.participant
        if not await self._ready(context):
            return None
        started = time.perf_counter()
        meta, tensors = await self._decode(request_iterator, context, p.max_activation_bytes)
        cfg = p.config
        if meta is None:
            await self._reject(context, Reject.BAD_STREAM, "first chunk carries no microbatch metadata")
            return None
        if not await self._in_range(context, meta.step, meta.attempt):
            return None
        if meta.microbatch >= cfg.train.microbatches_per_step:
            await self._reject(context, Reject.BAD_MICROBATCH, f"microbatch {meta.microbatch} >= microbatches per step")
            return None
        problem = check_route(
            list(meta.route), meta.hop, p.seat.stage, meta.microbatch, cfg.num_stages, cfg.out_of_order
        )
        if problem is not None:
            await self._reject(context, Reject.BAD_ROUTE, problem)
            return None
        problem = replica_route_problem(meta, self.status().peer_id)
        if problem is not None:
            await self._reject(context, Reject.BAD_ROUTE, problem)
            return None
        if sorted(tensors) not in ([""], ["", SCALE_NAME]):
            await self._reject(context, Reject.BAD_STREAM, f"expected one activation tensor, got {sorted(tensors)}")
            return None
        x = tensors[""]
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if SCALE_NAME in tensors:  # blockwise int8 (wire_dtype int8)
            try:
                x = dequantize_blockwise(x, tensors[SCALE_NAME])
            except ValueError as err:
                await self._reject(context, Reject.BAD_DTYPE, f"int8 activation: {err}")
                return None
        if x.dtype not in ACTIVATION_DTYPES:
            await self._reject(context, Reject.BAD_DTYPE, f"activation dtype {x.dtype} is not a float type")
            return None
        if tuple(x.shape) != p.activation_shape:
            await self._reject(
                context, Reject.BAD_SHAPE, f"shape {list(x.shape)} != expected {list(p.activation_shape)}"
            )
            return None
        if not all_finite(x):
            await self._reject(context, Reject.NON_FINITE, "tensor holds NaN or Inf")
            return None
        # timed here and not by the sender, whose call lasts until this node has also queued and computed
        self.metrics.transfer_seconds.labels(direction=direction).observe(time.perf_counter() - started)
        self.metrics.bytes_received.labels(direction=direction).inc(nbytes)
        return meta, x

    async def Forward(self, request_iterator, context) -> pb.Ack:
        return await self._tensor_call(request_iterator, context, "forward", self.participant.on_forward)

    async def Backward(self, request_iterator, context) -> pb.Ack:
        return await self._tensor_call(request_iterator, context, "backward", self.participant.on_backward)

    async def _tensor_call(self, request_iterator, context, direction: str, handler) -> pb.Ack:
        got = await self._receive(request_iterator, context, direction)
        if got is None:
            return pb.Ack(ok=False)
        try:
            await handler(*got)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.Ack(ok=True)

    async def Prepare(self, request: pb.PrepareRequest, context) -> pb.PrepareReply:
        if not await self._control(context, request):
            return pb.PrepareReply()
        handoffs = self.handoffs
        if handoffs.sealed:  # the state has gone to a successor: a step prepared now would commit without it
            await self._reject(context, Reject.DRAINING, "this node has handed its stage over; replay the step")
        shares = [(share.peer_id, list(share.microbatches)) for share in request.shares]
        problem = shares_problem(shares, self.participant.config.train.microbatches_per_step)
        if problem is not None:
            await self._reject(context, Reject.BAD_ROUTE, problem)
        handoffs.preparing += 1  # a leaving node finishes this step before its state goes (Handoffs.seal)
        try:
            norm_sq = await self.participant.prepare(request.step, request.attempt, shares)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        finally:
            handoffs.preparing -= 1
        return pb.PrepareReply(
            stage=self.participant.seat.stage,
            grad_norm_sq=norm_sq,
            microbatches=self.participant.config.train.microbatches_per_step,
        )

    async def Commit(self, request: pb.CommitRequest, context) -> pb.CommitReply:
        if not await self._control(context, request):
            return pb.CommitReply()
        try:
            committed = await self.participant.commit(request.step, request.attempt, request.clip_coef)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.CommitReply(stage=self.participant.seat.stage, committed_step=committed)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.Ack:
        if not await self._control(context, request):
            return pb.Ack()
        await self.participant.abort(request.step, request.attempt)
        return pb.Ack(ok=True)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        self.refusals.log.flush()  # heartbeats are regular: the summary of held-back lines is not left waiting
        if request.refresh and self.nudged is not None:
            self.nudged()
        me = self.status()
        return pb.HeartbeatReply(
            stage=me.stage or 0,
            peer_id=me.peer_id,
            state=me.state,
            committed_step=self.participant.seat.committed_step,
        )

    async def FetchWeights(self, request: pb.FetchWeightsRequest, context):
        if not await self._ready(context):
            return
        if request.parked:
            await self.handoffs.give_back(request, context)
            return
        if request.snapshot:
            await self.snapshots.give_back(request, context)
            return
        async with self.weights.turn(context, "FetchWeights"):
            if not await self._ready(context):  # the stage may have been lost while this call waited
                return
            if request.full_state:
                await self.handoffs.hand_over(request, context)
            elif request.replica:
                await self.weights.copy_to_replica(request, context)
            else:
                await self.weights.send_committed(context, "FetchWeights")
        return
        yield  # an async generator (as interceptors expect of a server stream), writing with context.write

    async def ExportWeights(self, request: pb.FetchWeightsRequest, context):
        if await self._ready(context) and await self._in_range(context, request.step):
            await self.weights.export(request, context)
        return
        yield  # an async generator, as FetchWeights

    async def PushGradients(self, request_iterator, context) -> pb.Ack:
        """A co-replica's partial gradient for the step in flight (kept until this replica's Prepare)."""
        p = self.participant
        if not await self._ready(context):
            return pb.Ack()
        spec = p.runtime.gradient_spec()
        limit = sum(math.prod(shape) * 4 for shape, _ in spec.values()) + (1 << 20)
        meta, tensors = await self._decode(request_iterator, context, limit)
        if meta is None or meta.sender_stage != p.seat.stage or not meta.sender_peer:
            await self._reject(context, Reject.BAD_STREAM, "a partial gradient must come from a replica of this stage")
        if not await self._in_range(context, meta.step, meta.attempt):
            return pb.Ack()
        if meta.microbatch >= p.config.train.microbatches_per_step:
            await self._reject(context, Reject.BAD_MICROBATCH, f"first microbatch {meta.microbatch} out of range")
        for name, t in tensors.items():
            if name not in spec or (tuple(t.shape), t.dtype) != spec[name]:
                await self._reject(context, Reject.BAD_SHAPE, f"partial gradient {name!r} does not fit this stage")
            if not all_finite(t):
                await self._reject(context, Reject.NON_FINITE, f"partial gradient {name!r} holds NaN or Inf")
        if meta.step != p.committed_step:
            await self._reject(context, Reject.STALE_STEP, f"partial gradient of step {meta.step}")
        kept = await p.gradients.put(meta.step, meta.attempt, meta.sender_peer, meta.microbatch, tensors)
        if not kept:
            await self._reject(context, Reject.STALE_ATTEMPT, f"partial gradient of an old attempt {meta.attempt}")
        return pb.Ack(ok=True)

    async def ParkState(self, request_iterator, context) -> pb.Ack:
        """Keeps the full state of a route neighbour whose owner is leaving with nobody to hand it to, or
        (``meta.snapshot``) the periodic snapshot of a stage this one holds snapshots for."""
        meta, tensors = await self._decode(request_iterator, context, self.handoffs.park_limit())
        if meta is not None and meta.snapshot:
            await self.snapshots.keep(meta, tensors, context)
        else:
            await self.handoffs.keep(meta, tensors, context)
        return pb.Ack(ok=True)

    async def PushReplica(self, request_iterator, context) -> pb.Ack:
        copies, seat = self.copies, self.participant.seat
        if not copies.holds_copies(seat.stage):
            await self._reject(context, Reject.BAD_ROUTE, f"stage {seat.stage} does not hold stage-0 copies")
        meta, tensors = await self._decode(request_iterator, context, copies.max_bytes)
        if meta is None or meta.sender_stage != 0:
            await self._reject(context, Reject.BAD_STREAM, "a stage-0 copy must come from stage 0 with its step")
        if not await self._in_range(context, meta.step, meta.attempt):
            return pb.Ack()
        if seat.ready and meta.step + 1 < seat.committed_step:
            await self._reject(context, Reject.STALE_STEP, f"copy for step {meta.step + 1} is older than ours")
        if not all(all_finite(t) for t in tensors.values() if t.is_floating_point()):
            await self._reject(context, Reject.NON_FINITE, "stage-0 copy holds NaN or Inf")
        copies.store(meta, tensors)
        return pb.Ack(ok=True)

    async def FetchReplica(self, request: pb.FetchWeightsRequest, context):
        if not await self._in_range(context, request.step):
            return
        async with self.weights.turn(context, "FetchReplica", replica=True):
            found = self.copies.copy_for(request.step)
            if found is None:
                await self._reject(context, Reject.UNKNOWN_STEP, f"no stage-0 copy at or before step {request.step}")
            meta, tensors = found
            me = self.status()
            meta.sender_stage, meta.sender_peer = me.stage or 0, me.peer_id
            await self.weights.send(context, encode_stream(meta, tensors.items()), "FetchReplica")
        return
        yield  # an async generator, writing with context.write

    async def GetStatus(self, request: pb.StatusRequest, context) -> pb.StageStatus:
        self.refusals.log.flush()
        me, seat = self.status(), self.participant.seat
        return pb.StageStatus(
            stage=me.stage or 0,
            peer_id=me.peer_id,
            state=me.state,
            committed_step=seat.committed_step,
            last_grad_norm=seat.runtime.last_grad_norm if seat.runtime is not None else 0.0,
            rejected_messages=self.refusals.total,
            pid=me.pid,
            checkpoint_steps=sorted(self.checkpoints.durable_steps) if self.checkpoints is not None else [],
            swarm=self._swarm_name(),
            records=self._swarm_view() if request.swarm else [],
        )

    def _swarm_name(self) -> str:
        """The swarm this node announces into (empty when its directory does not say)."""
        presence = getattr(self.participant, "presence", None)
        key = getattr(getattr(presence, "directory", None), "key", "")
        swarm = key.removeprefix("swarm-node:").removesuffix(":stages") if isinstance(key, str) else ""
        return swarm if swarm and stages_key(swarm) == key else ""

    def _swarm_view(self) -> list[str]:
        """``GetStatus(swarm=True)``: the records this node last read from the DHT, as JSON (``status --peer``)."""
        presence = getattr(self.participant, "presence", None)
        view: list[StageRecord] = list(getattr(presence, "view", None) or [])
        return [json.dumps(r.to_json(), separators=(",", ":")) for r in view]

    async def Rollback(self, request: pb.RollbackRequest, context) -> pb.RollbackReply:
        if not await self._ready(context) or not await self._addressed(context, request):
            return pb.RollbackReply()
        if self.checkpoints is None:
            await self._reject(
                context,
                Reject.NO_CHECKPOINT,
                f"stage {self.participant.seat.stage} keeps no checkpoints (no --recovery checkpoint)",
            )
            return pb.RollbackReply()
        if not await self._in_range(context, request.step, request.attempt):
            return pb.RollbackReply()
        try:
            committed = await self.checkpoints.rollback(request.step, request.attempt)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.RollbackReply(stage=self.participant.seat.stage, committed_step=committed)
