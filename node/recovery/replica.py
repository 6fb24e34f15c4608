"""The ``replica`` recovery method: join a stage that another peer serves, with an exact copy of its state.

The joiner asks a live replica of the stage for its full state (weights, AdamW moments and step counts, lr
scale, last gradient norm, committed step) with ``FetchWeights(replica=True)``, served between steps. It then
serves the stage at that committed step; stage 0 routes microbatches to it from the next step on (a replica
whose committed step lags the stage's others is left out and copies again: :func:`behind`).
"""

from __future__ import annotations

import time

import grpc

from node.proto import stage_pb2 as pb
from node.recovery.handoff import check_handoff, fetch_full_state, load_full_state, max_state_bytes
from node.recovery.methods import Recovered, RecoveryContext, SourceLost
from node.recovery.planner import Method, RecoveryPlan
from node.recovery.rebuild import BadSource, expected_state
from node.wire.records import StageRecord

RETRY_SECONDS = 30.0  # a source with a prepared step answers busy until it commits or aborts


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
        # permission denied: the source has not yet seen this node's record that claims to join the stage
        retry = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED)
        meta, tensors, nbytes = await fetch_full_state(ctx, peer, request, limit, RETRY_SECONDS, "copy", retry)
        try:
            step, lr_scale, norm = check_handoff(meta, tensors, spec, f"replica {peer.peer_id} of stage {stage}")
        except BadSource as err:
            raise SourceLost(str(err), peer.peer_id) from None
        state = {k: v for k, v in tensors.items() if not k.startswith("meta.")}
        runtime = await load_full_state(ctx, stage, state, step, lr_scale, norm, peer.peer_id)
        return Recovered(runtime, step, lr_scale, nbytes=nbytes, fetch_seconds=time.monotonic() - started, audit=False)
