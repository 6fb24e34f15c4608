"""The ``replica`` recovery method: join a stage that another peer serves, with an exact copy of its state.

The joiner asks a live replica of the stage for its full state (weights, AdamW moments and step counts, lr
scale, last gradient norm, committed step) with ``FetchWeights(replica=True)``, served between steps. It then
serves the stage at that committed step; stage 0 routes microbatches to it from the next step on (a replica
whose committed step lags the stage's others is left out and copies again: :func:`behind`).
"""

from __future__ import annotations

import asyncio
import time

import grpc

from node.proto import stage_pb2 as pb
from node.recovery.handoff import check_handoff, max_state_bytes
from node.recovery.methods import Recovered, RecoveryContext, SourceLost
from node.recovery.planner import Method, RecoveryPlan
from node.recovery.rebuild import BadSource, expected_state
from node.stage.runtime import StageRuntime
from node.wire.records import StageRecord
from node.wire.tensors import TensorAssembler, WireError

BUSY_RETRY_SECONDS = 30.0  # a source with a prepared step answers busy until it commits or aborts


def behind(stage: int, committed: int, peers: list[StageRecord]) -> bool:
    """Whether this replica of ``stage`` (at ``committed``) lags another live replica of it: it then copies
    again, since stage 0 routes only to replicas at its committed step."""
    return stage != 0 and any(r.stage == stage and r.committed_step > committed for r in peers)


class ReplicaCopy:
    """Carries out :attr:`Method.REPLICA` plans."""

    methods = frozenset({Method.REPLICA})

    @staticmethod
    def source(ctx: RecoveryContext, stage: int) -> StageRecord | None:
        """The live replica to copy: the most committed steps, then the lowest peer id."""
        peers = [r for r in ctx.presence.replicas_of(stage) if r.peer_id not in ctx.distrusted]
        return min(peers, key=lambda r: (-r.committed_step, r.peer_id), default=None)

    async def recover(self, plan: RecoveryPlan, ctx: RecoveryContext, committed: int) -> Recovered:
        stage, started = plan.stage, time.monotonic()
        peer = self.source(ctx, stage)
        if peer is None:
            raise SourceLost(f"no live replica of stage {stage} to copy")
        spec = expected_state(ctx.config, stage)
        limit = max_state_bytes(spec)
        request = pb.FetchWeightsRequest(requester_stage=stage, requester_peer=ctx.presence.me.peer_id, replica=True)
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        while True:
            asm, nbytes = TensorAssembler(max_tensor_bytes=limit, max_stream_bytes=limit), 0
            try:
                async for message in ctx.channels.stub(peer).FetchWeights(request, timeout=ctx.timing.rpc_timeout):
                    asm.feed(message)
                    nbytes += len(message)
                meta, tensors = asm.meta, asm.finish()
                break
            except grpc.aio.AioRpcError as err:
                # busy: a prepared step waits for its commit; permission denied: the source has not yet seen
                # this node's record that claims to join the stage
                retry = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED)
                if err.code() in retry and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    continue
                raise SourceLost(f"copy of stage {stage} from {peer.peer_id}: {err.code().name}") from None
            except WireError as err:
                raise SourceLost(f"{peer.peer_id} sent a bad copy: {err}", peer.peer_id) from None
        try:
            step, lr_scale, norm = check_handoff(meta, tensors, spec, f"replica {peer.peer_id} of stage {stage}")
        except BadSource as err:
            raise SourceLost(str(err), peer.peer_id) from None
        state = {k: v for k, v in tensors.items() if not k.startswith("meta.")}

        def build() -> StageRuntime:
            runtime = StageRuntime(
                ctx.config, stage, ctx.device, lr_scale=lr_scale, committed_step=step, last_grad_norm=norm
            )
            runtime.load_full_state(state)
            return runtime

        try:
            runtime = await ctx.compute.run(build)
        except (RuntimeError, ValueError, KeyError) as err:
            raise SourceLost(f"the copy of stage {stage} cannot be loaded: {err}", peer.peer_id) from None
        return Recovered(runtime, step, lr_scale, nbytes=nbytes, fetch_seconds=time.monotonic() - started, audit=False)
