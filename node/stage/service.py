"""The gRPC ``Stage`` service: validates every message, then hands it to the part that owns it.

Nothing from the network reaches the stage's state before it has been checked: stream structure and
byte limits (in the decoder), route and hop, tensor dtype, shape and finiteness, then step, attempt and
microbatch (in the runtime). A refused message gets a gRPC status whose details start with the reason
code, is counted in ``swarm_node_rejected_messages_total{reason=...}``, and changes nothing.

The service depends on the pipeline participant, the stage-0 copy store and (``--recovery checkpoint``)
the checkpoint keeper; ``status`` describes the node for ``Heartbeat`` and ``GetStatus``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from node.checkpoint.keeper import CheckpointKeeper
from node.metrics import StageMetrics
from node.proto import stage_pb2 as pb
from node.proto import stage_pb2_grpc
from node.recovery.stage0_copies import Stage0Copies
from node.stage.participant import PipelineParticipant
from node.stage.runtime import Reject, StepError
from node.topology import check_route
from node.wire.tensors import WireError, decode_stream, encode_stream

logger = logging.getLogger(__name__)

STATUS_FOR: dict[Reject, grpc.StatusCode] = {
    Reject.STALE_STEP: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.UNKNOWN_STEP: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.STALE_ATTEMPT: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.NOT_READY: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.INCOMPLETE: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.NO_CHECKPOINT: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    Reject.OVERSIZE: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def all_finite(x: torch.Tensor) -> bool:
    """NaN/Inf anywhere make the sum non-finite; only then (or on overflow) pay for the exact check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


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
    ) -> None:
        self.participant, self.copies, self.checkpoints = participant, copies, checkpoints
        self.status, self.metrics = status, metrics
        self.rejected_total = 0

    async def _reject(self, context: grpc.aio.ServicerContext, reason: Reject, message: str) -> None:
        self.metrics.rejected.labels(reason=reason.value).inc()
        self.rejected_total += 1
        logger.warning("rejected message: %s: %s", reason.value, message)
        await context.abort(STATUS_FOR.get(reason, grpc.StatusCode.INVALID_ARGUMENT), f"{reason.value}: {message}")

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
        if meta.microbatch >= cfg.train.microbatches_per_step:
            await self._reject(context, Reject.BAD_MICROBATCH, f"microbatch {meta.microbatch} >= microbatches per step")
            return None
        problem = check_route(
            list(meta.route), meta.hop, p.seat.stage, meta.microbatch, cfg.num_stages, cfg.out_of_order
        )
        if problem is not None:
            await self._reject(context, Reject.BAD_ROUTE, problem)
            return None
        if list(tensors) != [""]:
            await self._reject(context, Reject.BAD_STREAM, f"expected one activation tensor, got {len(tensors)}")
            return None
        x = tensors[""]
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
        self.metrics.bytes_received.labels(direction=direction).inc(x.numel() * x.element_size())
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
        if not await self._ready(context):
            return pb.PrepareReply()
        try:
            norm_sq = await self.participant.prepare(request.step, request.attempt)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.PrepareReply(
            stage=self.participant.seat.stage,
            grad_norm_sq=norm_sq,
            microbatches=self.participant.config.train.microbatches_per_step,
        )

    async def Commit(self, request: pb.CommitRequest, context) -> pb.CommitReply:
        if not await self._ready(context):
            return pb.CommitReply()
        try:
            committed = await self.participant.commit(request.step, request.attempt, request.clip_coef)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.CommitReply(stage=self.participant.seat.stage, committed_step=committed)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.Ack:
        if not await self._ready(context):
            return pb.Ack()
        await self.participant.abort(request.step, request.attempt)
        return pb.Ack(ok=True)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
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
        step, norm, state = await self.participant.snapshot_committed()
        me = self.status()
        meta = pb.MicrobatchMeta(step=step, sender_stage=me.stage, sender_peer=me.peer_id, grad_norm=norm)
        for chunk in encode_stream(meta, list(state.items())):
            yield chunk

    async def PushReplica(self, request_iterator, context) -> pb.Ack:
        copies, seat = self.copies, self.participant.seat
        if not copies.holds_copies(seat.stage):
            await self._reject(context, Reject.BAD_ROUTE, f"stage {seat.stage} does not hold stage-0 copies")
        meta, tensors = await self._decode(request_iterator, context, copies.max_bytes)
        if meta is None or meta.sender_stage != 0:
            await self._reject(context, Reject.BAD_STREAM, "a stage-0 copy must come from stage 0 with its step")
        if seat.ready and meta.step + 1 < seat.committed_step:
            await self._reject(context, Reject.STALE_STEP, f"copy for step {meta.step + 1} is older than ours")
        if not all(all_finite(t) for t in tensors.values() if t.is_floating_point()):
            await self._reject(context, Reject.NON_FINITE, "stage-0 copy holds NaN or Inf")
        copies.store(meta, tensors)
        return pb.Ack(ok=True)

    async def FetchReplica(self, request: pb.FetchWeightsRequest, context):
        found = self.copies.copy_for(request.step)
        if found is None:
            await self._reject(context, Reject.UNKNOWN_STEP, f"no stage-0 copy at or before step {request.step}")
            return
        meta, tensors = found
        me = self.status()
        meta.sender_stage, meta.sender_peer = me.stage or 0, me.peer_id
        for chunk in encode_stream(meta, tensors.items()):
            yield chunk

    async def GetStatus(self, request: pb.StatusRequest, context) -> pb.StageStatus:
        me, seat = self.status(), self.participant.seat
        return pb.StageStatus(
            stage=me.stage or 0,
            peer_id=me.peer_id,
            state=me.state,
            committed_step=seat.committed_step,
            last_grad_norm=seat.runtime.last_grad_norm if seat.runtime is not None else 0.0,
            rejected_messages=self.rejected_total,
            pid=me.pid,
            checkpoint_steps=sorted(self.checkpoints.durable_steps) if self.checkpoints is not None else [],
        )

    async def Rollback(self, request: pb.RollbackRequest, context) -> pb.RollbackReply:
        if not await self._ready(context):
            return pb.RollbackReply()
        if self.checkpoints is None:
            await self._reject(
                context,
                Reject.NO_CHECKPOINT,
                f"stage {self.participant.seat.stage} keeps no checkpoints (no --recovery checkpoint)",
            )
            return pb.RollbackReply()
        try:
            committed = await self.checkpoints.rollback(request.step, request.attempt)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.RollbackReply(stage=self.participant.seat.stage, committed_step=committed)
