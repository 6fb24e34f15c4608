"""The commit coordinator's peer RPCs over gRPC: each call goes to the stage's serving peer per the DHT."""

from __future__ import annotations

import time
from typing import Any

import grpc

from node.options import TimingOptions
from node.proto import stage_pb2 as pb
from node.stage.coordinator import PeerError, Shares
from node.stage.presence import Presence
from node.stage.runtime import Reject
from node.transport.channels import ChannelPool

ABORT_SECONDS = 2.0  # an abort is best effort: a stage that misses it refuses the old attempt later


class GrpcPeers:
    """:class:`~node.stage.coordinator.PeerRPC` over the Stage service."""

    def __init__(self, presence: Presence, channels: ChannelPool, timing: TimingOptions) -> None:
        self.presence, self.channels, self.timing = presence, channels, timing

    async def _call(
        self, stage: int, rpc: str, request: Any, seconds: float | None = None, peer_id: str = ""
    ) -> tuple[Any, str]:
        """``rpc`` on ``stage``'s serving peer, or on its replica ``peer_id`` when given."""
        deadline = time.monotonic() + (seconds or self.timing.rpc_timeout)
        if peer_id:
            peer = self.presence.member(peer_id, lately=True) or self.presence.leaving_peer(stage)
            if peer is None or peer.peer_id != peer_id or peer.stage != stage:
                raise PeerError(stage, f"{rpc}: replica {peer_id} is gone")
        else:
            peer = await self.presence.resolve(stage, deadline, leaving_ok=True)
        if "epoch" in request.DESCRIPTOR.fields_by_name:  # control requests name the claim they address
            request.stage, request.epoch = stage, peer.epoch
        stub = self.channels.stub(peer)
        try:
            reply = await getattr(stub, rpc)(request, timeout=max(0.1, deadline - time.monotonic()))
        except grpc.aio.AioRpcError as err:
            # a claim-epoch mismatch is a view out of date on one side, not a refusal of the step: re-read, retry
            mismatch = (err.details() or "").startswith((Reject.STALE_EPOCH.value, Reject.FENCED.value))
            if mismatch:
                await self.presence.try_refresh()
            refused = err.code() == grpc.StatusCode.FAILED_PRECONDITION and not mismatch
            raise PeerError(stage, f"{rpc}: {err.code().name} {err.details()}", refused=refused) from None
        return reply, peer.peer_id

    async def prepare(
        self, stage: int, step: int, attempt: int, peer: str = "", shares: Shares | None = None
    ) -> float:
        request = pb.PrepareRequest(step=step, attempt=attempt)
        for peer_id, mbs in shares or ():
            request.shares.add(peer_id=peer_id, microbatches=mbs)
        reply, _ = await self._call(stage, "Prepare", request, peer_id=peer)
        return reply.grad_norm_sq

    async def commit(
        self, stage: int, step: int, attempt: int, global_norm: float, clip_coef: float, peer: str = ""
    ) -> tuple[int, str]:
        request = pb.CommitRequest(step=step, attempt=attempt, global_grad_norm=global_norm, clip_coef=clip_coef)
        reply, answered = await self._call(stage, "Commit", request, peer_id=peer)
        return reply.committed_step, answered

    async def abort(self, stage: int, step: int, attempt: int, peer: str = "") -> None:
        request = pb.AbortRequest(step=step, attempt=attempt, reason="replay")
        await self._call(stage, "Abort", request, ABORT_SECONDS, peer_id=peer)

    async def rollback(self, stage: int, step: int, attempt: int) -> tuple[int, str]:
        request = pb.RollbackRequest(step=step, attempt=attempt, sender_peer=self.presence.me.peer_id)
        reply, peer = await self._call(stage, "Rollback", request)
        return reply.committed_step, peer

    async def checkpoint_steps(self, stage: int) -> list[int]:
        reply, _ = await self._call(stage, "GetStatus", pb.StatusRequest())
        return list(reply.checkpoint_steps)
