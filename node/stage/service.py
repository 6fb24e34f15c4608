"""The gRPC ``Stage`` service: validates every message, then hands it to the daemon.

Nothing from the network reaches the stage's state before it has been checked: stream structure and
byte limits (in the decoder), route and hop, tensor dtype, shape and finiteness, then step, attempt and
microbatch (in the runtime). A refused message gets a gRPC status whose details start with the reason
code, is counted in ``swarm_node_rejected_messages_total{reason=...}``, and changes nothing.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import grpc
import torch

from node.proto import stage_pb2 as pb
from node.proto import stage_pb2_grpc
from node.recovery.planner import replica_holders
from node.stage.runtime import Reject, StepError
from node.stage.schedule import check_route
from node.wire.tensors import WireError, decode_stream, encode_stream

if TYPE_CHECKING:
    from node.stage.daemon import StageDaemon

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


class StageService(stage_pb2_grpc.StageServicer):
    """Server side of one stage daemon."""

    def __init__(self, daemon: StageDaemon) -> None:
        self.daemon = daemon

    async def _reject(self, context: grpc.aio.ServicerContext, reason: Reject, message: str) -> None:
        self.daemon.metrics.rejected.labels(reason=reason.value).inc()
        self.daemon.rejected_total += 1
        logger.warning("rejected message: %s: %s", reason.value, message)
        await context.abort(STATUS_FOR.get(reason, grpc.StatusCode.INVALID_ARGUMENT), f"{reason.value}: {message}")

    async def _ready(self, context: grpc.aio.ServicerContext) -> bool:
        if self.daemon.runtime is None:
            await self._reject(context, Reject.NOT_READY, "this node holds no stage yet (spare or rebuilding)")
            return False
        return True

    async def _receive(
        self, request_iterator, context, direction: str
    ) -> tuple[pb.MicrobatchMeta, torch.Tensor] | None:
        d = self.daemon
        if not await self._ready(context):
            return None
        limit = d.max_activation_bytes
        started = time.perf_counter()
        try:
            meta, tensors = await decode_stream(request_iterator, max_tensor_bytes=limit, max_stream_bytes=limit)
        except WireError as err:
            reason = Reject(err.reason) if err.reason in Reject._value2member_map_ else Reject.BAD_STREAM
            await self._reject(context, reason, str(err))
            return None
        if meta is None:
            await self._reject(context, Reject.BAD_STREAM, "first chunk carries no microbatch metadata")
            return None
        if meta.microbatch >= d.config.train.microbatches_per_step:
            await self._reject(context, Reject.BAD_MICROBATCH, f"microbatch {meta.microbatch} >= microbatches per step")
            return None
        problem = check_route(list(meta.route), meta.hop, d.stage, meta.microbatch, d.num_stages, d.config.out_of_order)
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
        if tuple(x.shape) != d.activation_shape:
            await self._reject(
                context, Reject.BAD_SHAPE, f"shape {list(x.shape)} != expected {list(d.activation_shape)}"
            )
            return None
        if not all_finite(x):
            await self._reject(context, Reject.NON_FINITE, "tensor holds NaN or Inf")
            return None
        # timed here and not by the sender, whose call lasts until this node has also queued and computed
        d.metrics.transfer_seconds.labels(direction=direction).observe(time.perf_counter() - started)
        d.metrics.bytes_received.labels(direction=direction).inc(x.numel() * x.element_size())
        return meta, x

    async def Forward(self, request_iterator, context) -> pb.Ack:
        got = await self._receive(request_iterator, context, "forward")
        if got is None:
            return pb.Ack(ok=False)
        try:
            await self.daemon.on_forward(*got)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.Ack(ok=True)

    async def Backward(self, request_iterator, context) -> pb.Ack:
        got = await self._receive(request_iterator, context, "backward")
        if got is None:
            return pb.Ack(ok=False)
        try:
            await self.daemon.on_backward(*got)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.Ack(ok=True)

    async def Prepare(self, request: pb.PrepareRequest, context) -> pb.PrepareReply:
        if not await self._ready(context):
            return pb.PrepareReply()
        try:
            norm_sq = await self.daemon.compute(self.daemon.runtime.prepare, request.step, request.attempt)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.PrepareReply(
            stage=self.daemon.stage, grad_norm_sq=norm_sq, microbatches=self.daemon.config.train.microbatches_per_step
        )

    async def Commit(self, request: pb.CommitRequest, context) -> pb.CommitReply:
        if not await self._ready(context):
            return pb.CommitReply()
        try:
            committed = await self.daemon.commit(request.step, request.attempt, request.clip_coef)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.CommitReply(stage=self.daemon.stage, committed_step=committed)

    async def Abort(self, request: pb.AbortRequest, context) -> pb.Ack:
        if not await self._ready(context):
            return pb.Ack()
        await self.daemon.compute(self.daemon.runtime.abort, request.step, request.attempt)
        return pb.Ack(ok=True)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        d = self.daemon
        return pb.HeartbeatReply(
            stage=d.stage or 0,
            peer_id=d.peer_id,
            state=d.state.value,
            committed_step=d.runtime.committed_step if d.runtime is not None else 0,
        )

    async def FetchWeights(self, request: pb.FetchWeightsRequest, context):
        d = self.daemon
        if not await self._ready(context):
            return
        step, norm, state = await d.compute(d.snapshot_committed)
        meta = pb.MicrobatchMeta(step=step, sender_stage=d.stage, sender_peer=d.peer_id, grad_norm=norm)
        tensors = list(state.items())
        for chunk in encode_stream(meta, tensors):
            yield chunk

    async def PushReplica(self, request_iterator, context) -> pb.Ack:
        d = self.daemon
        if not d.config.out_of_order or d.stage not in replica_holders(d.num_stages):
            await self._reject(context, Reject.BAD_ROUTE, f"stage {d.stage} does not hold stage-0 copies")
        try:
            meta, tensors = await decode_stream(
                request_iterator, max_tensor_bytes=d.max_replica_bytes, max_stream_bytes=d.max_replica_bytes
            )
        except WireError as err:
            reason = Reject(err.reason) if err.reason in Reject._value2member_map_ else Reject.BAD_STREAM
            await self._reject(context, reason, str(err))
        if meta is None or meta.sender_stage != 0:
            await self._reject(context, Reject.BAD_STREAM, "a stage-0 copy must come from stage 0 with its step")
        if d.runtime is not None and meta.step + 1 < d.runtime.committed_step:
            await self._reject(context, Reject.STALE_STEP, f"copy for step {meta.step + 1} is older than ours")
        if not all(all_finite(t) for t in tensors.values() if t.is_floating_point()):
            await self._reject(context, Reject.NON_FINITE, "stage-0 copy holds NaN or Inf")
        d.store_replica(meta, tensors)
        return pb.Ack(ok=True)

    async def FetchReplica(self, request: pb.FetchWeightsRequest, context):
        d = self.daemon
        held = sorted(s for s, e in d.replicas.items() if e["tensors"])
        want = request.step or (held[-1] if held else 0)
        usable = [s for s in held if s <= want]
        if not usable:
            await self._reject(context, Reject.UNKNOWN_STEP, f"no stage-0 copy at or before step {want}")
        decision = d.replicas.get(want, {}).get("decision") or (0, 0, 0.0)
        meta = pb.MicrobatchMeta(
            step=usable[-1], attempt=decision[1], grad_norm=decision[2], sender_stage=d.stage, sender_peer=d.peer_id
        )
        for chunk in encode_stream(meta, d.replicas[usable[-1]]["tensors"].items()):
            yield chunk

    async def GetStatus(self, request: pb.StatusRequest, context) -> pb.StageStatus:
        d = self.daemon
        rt = d.runtime
        return pb.StageStatus(
            stage=d.stage or 0,
            peer_id=d.peer_id,
            state=d.state.value,
            committed_step=rt.committed_step if rt is not None else 0,
            last_grad_norm=rt.last_grad_norm if rt is not None else 0.0,
            rejected_messages=d.rejected_total,
            pid=d.pid,
            checkpoint_steps=sorted(d.durable_steps),
        )

    async def Rollback(self, request: pb.RollbackRequest, context) -> pb.RollbackReply:
        if not await self._ready(context):
            return pb.RollbackReply()
        try:
            committed = await self.daemon.rollback(request.step, request.attempt)
        except StepError as err:
            await self._reject(context, err.reason, str(err))
        return pb.RollbackReply(stage=self.daemon.stage, committed_step=committed)
