"""The CheckFree rebuild: a lost block stage from its live neighbours' committed weights (``checkfree``,
``copy``, ``partner_copy``) or from fresh random weights (``random``), always with a fresh optimizer."""

from __future__ import annotations

import os
import time

import grpc

from node.proto import stage_pb2 as pb
from node.recovery.methods import Recovered, RecoveryContext, SourceLost
from node.recovery.planner import Method, RecoveryPlan
from node.recovery.rebuild import (
    BadSource,
    Fetched,
    SourcesDisagree,
    TensorSpec,
    build_runtime,
    check_source,
    expected_state,
    rebuild_spec,
    state_bytes,
)
from node.wire.tensors import TensorAssembler, WireError


async def fetch_committed(ctx: RecoveryContext, source: int, spec: TensorSpec) -> Fetched:
    """Stage ``source``'s committed step, gradient norm and weights, from its serving peer (FetchWeights),
    checked against ``spec`` (names, shapes, dtypes, finite values; no more bytes than the stage has)."""
    peer = ctx.peer_of(source)
    if peer is None:
        raise SourceLost(f"no live peer for stage {source}")
    limit = state_bytes(spec)
    asm = TensorAssembler(max_tensor_bytes=limit, max_stream_bytes=limit)
    nbytes = 0
    try:
        call = ctx.channels.stub(peer).FetchWeights(
            pb.FetchWeightsRequest(requester_stage=ctx.stage, requester_peer=ctx.presence.me.peer_id),
            timeout=max(ctx.timing.rpc_timeout, 60.0),
        )
        async for message in call:
            asm.feed(message)
            nbytes += len(message)
            ctx.faults.check("fetch", stage=ctx.stage, step=ctx.presence.swarm_committed() + 1)
        tensors = asm.finish()
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            ctx.presence.suspect(peer, f"FetchWeights failed: {err.code().name}")
        raise SourceLost(f"fetching stage {source} from {peer.peer_id}: {err.code().name}") from None
    except WireError as err:
        raise SourceLost(f"stage {source} ({peer.peer_id}) sent a bad weight stream: {err}", peer.peer_id) from None
    if asm.meta is None:
        raise SourceLost(f"stage {source} sent a weight stream without its step and gradient norm", peer.peer_id)
    fetched = Fetched(source, int(asm.meta.step), float(asm.meta.grad_norm), tensors, nbytes)
    try:
        check_source(fetched, spec)
    except BadSource as err:
        raise SourceLost(str(err), peer.peer_id) from None
    return fetched


async def check_not_behind_stage0(ctx: RecoveryContext, step: int) -> None:
    """A block stage rebuilt at ``step`` while stage 0 already committed the next step would miss that step:
    fetch again once the neighbours have it too."""
    peer = ctx.presence.peer_of(0)
    if peer is None:
        return
    try:
        status = await ctx.channels.stub(peer).GetStatus(
            pb.StatusRequest(), timeout=ctx.timing.rpc_timeout
        )
    except grpc.aio.AioRpcError:
        return
    if status.committed_step > step:
        raise SourceLost(f"sources are at step {step} but stage 0 committed {status.committed_step}")


class NeighbourRebuild:
    """CheckFree and its ablation baselines (a plug-in for :class:`~node.recovery.replacement.StageBuilder`)."""

    methods = frozenset({Method.CHECKFREE, Method.COPY, Method.PARTNER_COPY, Method.RANDOM})

    def __init__(self, lr_scale: float) -> None:
        self.lr_scale = lr_scale

    async def recover(self, plan: RecoveryPlan, ctx: RecoveryContext, committed: int) -> Recovered:
        started = time.monotonic()
        shapes = expected_state(ctx.config, ctx.stage)  # block stages hold tensors of the same names and shapes
        fetched = [await fetch_committed(ctx, source, shapes) for source in plan.sources]
        fetch_seconds = time.monotonic() - started
        seed = int.from_bytes(os.urandom(7), "little")
        try:
            spec = await ctx.compute.run(rebuild_spec, plan, fetched, committed, self.lr_scale, seed)
        except SourcesDisagree as err:  # a commit was landing while we fetched: fetch again
            raise SourceLost(str(err)) from None
        await check_not_behind_stage0(ctx, spec.committed_step)
        runtime = await ctx.compute.run(build_runtime, ctx.config, ctx.stage, ctx.device, spec)
        return Recovered(
            runtime,
            spec.committed_step,
            self.lr_scale,
            source_grad_norms=[f.grad_norm for f in fetched],
            nbytes=sum(f.nbytes for f in fetched),
            fetch_seconds=fetch_seconds,
        )
