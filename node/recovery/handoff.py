"""The ``handoff`` recovery method: take over a stage from its preempted owner with the owner's exact state.

A node that gets a preemption notice announces its stage ``handing_over``: it takes no new steps (it refuses
``Prepare``), finishes the step it may have prepared, and then serves its full state (weights, AdamW moments
and step counts, lr scale, last gradient norm, committed step) through ``FetchWeights(full_state=True)`` to
the node that claimed the stage. The planner picks this method for a stage whose owner is handing over,
under every strategy and for every stage (stage 0 included: its data position is its committed step).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable

import grpc
import torch

from node.proto import stage_pb2 as pb
from node.recovery.methods import Recovered, RecoveryContext, SourceLost
from node.recovery.planner import Method, RecoveryPlan
from node.recovery.rebuild import BadSource, TensorSpec, check_weights, expected_state, state_bytes
from node.stage.runtime import StageRuntime
from node.wire.records import CLAIMING_STATES, SERVING_STATES, StageRecord, StageState
from node.wire.tensors import TensorAssembler, WireError

logger = logging.getLogger(__name__)

HANDING_OVER = frozenset({StageState.HANDING_OVER})
META_TENSORS = ("meta.lr_scale", "meta.last_grad_norm")
BUSY_RETRY_SECONDS = 0.05  # asking again an owner that settles a prepared step (one cheap refusal per retry)


def check_handoff(meta: pb.MicrobatchMeta | None, tensors: dict[str, torch.Tensor], spec: TensorSpec, source: str):
    """A handed-over state is usable: weights that fit the stage, finite optimizer state, a positive lr scale
    and a finite, non-negative last gradient norm. Returns (committed step, lr scale, last gradient norm)."""
    if meta is None:
        raise BadSource(f"{source} handed over a state without its committed step")
    for name in META_TENSORS:
        if name not in tensors or tensors[name].numel() != 1:
            raise BadSource(f"{source} handed over a state without {name}")
    lr_scale, norm = (float(tensors[name]) for name in META_TENSORS)
    if not (math.isfinite(lr_scale) and lr_scale > 0):
        raise BadSource(f"{source} handed over lr scale {lr_scale}")
    if not (math.isfinite(norm) and norm >= 0):
        raise BadSource(f"{source} handed over a last gradient norm of {norm}")
    check_weights({k[2:]: v for k, v in tensors.items() if k.startswith("w.")}, spec, source)
    for name, t in tensors.items():
        if not name.startswith(("w.", "opt.", "meta.")):
            raise BadSource(f"{source} handed over an unknown tensor {name!r}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadSource(f"{source}: {name} holds NaN or Inf")
    return meta.step, lr_scale, norm


def max_state_bytes(spec: TensorSpec) -> int:
    """Size limit of a stage's full state: weights and two AdamW moments, plus step counters."""
    return 3 * state_bytes(spec) + (1 << 20)


def largest_state_bytes(cfg) -> int:
    """Byte limit of any stage's full state (a parked state, a neighbour snapshot): the largest stage's."""
    return max(max_state_bytes(expected_state(cfg, s)) for s in range(cfg.num_stages))


def parked_state_served(
    parked: tuple[int, int] | None, records: Iterable[StageRecord], owner: str | None = None
) -> StageRecord | None:
    """The record that makes a parked state unneeded, if ``records`` (the other peers of this swarm, suspects
    left out) hold one; None: keep it. ``parked`` is (stage, committed step) of the state a preempted
    neighbour left here. Its stage is served again when a peer serves it (``online``/``waiting``, so its
    recovery is over: a node that took the parked copy only serves once it loaded it) and that peer is at or
    past the parked step, or has gone through a recovery (a rebuild by another method when the holder was
    unreachable). A peer that serves the stage behind the parked step without any recovery (a fresh start
    that has not caught up) does not count: the copy may still be wanted. Nor does ``owner``, the peer that
    parked the state: a view older than the park may still show it serving."""
    if parked is None:
        return None
    stage, step = parked
    return next(
        (
            r
            for r in records
            if r.stage == stage
            and r.peer_id != owner
            and r.state in SERVING_STATES
            and (r.committed_step >= step or r.last_recovery is not None)
        ),
        None,
    )


def soft_noticed(records: Iterable[StageRecord]) -> frozenset[int]:
    """Stages whose owner announces a soft preemption notice (``soft_notice``): spares stand by for them."""
    return frozenset(r.stage for r in records if r.soft_notice and r.stage is not None)


def choose_successor(records: Iterable[StageRecord]) -> str | None:
    """The spare a leaving node names to take its stage: the lowest peer id among the waiting spares of its
    swarm (``records``: the other peers of this swarm), or None (then spares claim the stage as any vacancy)."""
    spares = sorted(r.peer_id for r in records if r.state == StageState.SPARE)
    return spares[0] if spares else None


def named_successor(vacant: list[int], records: Iterable[StageRecord], me: str) -> tuple[int | None, set[int]]:
    """For a spare ``me``: (a vacant stage whose leaving owner names ``me`` its successor, which ``me`` takes
    at once; the vacant stages named for another spare that still waits or claims, which ``me`` leaves to it).
    A stage named for a spare whose record is gone is an ordinary vacancy again."""
    records = list(records)
    mine, reserved = None, set()
    for r in records:
        if r.state != StageState.HANDING_OVER or r.stage not in vacant or r.successor is None:
            continue
        if r.successor == me:
            mine = r.stage if mine is None else min(mine, r.stage)
        elif successor_pending(records, r.stage, r.successor):
            reserved.add(r.stage)
    return mine, reserved


def successor_pending(records: Iterable[StageRecord], stage: int, successor: str) -> bool:
    """Whether the spare named to take ``stage`` may still do so: it waits as a spare, or is taking ``stage``."""
    return any(
        r.peer_id == successor and (r.state == StageState.SPARE or (r.stage == stage and r.state in CLAIMING_STATES))
        for r in records
    )


def standby_order(vacant: list[int], records: Iterable[StageRecord]) -> list[int]:
    """The vacant stages in the order a spare claims them: those whose owner warned of its preemption (a soft
    notice, or already handing over) first, then the rest; lowest first within each group (every spare
    computes the same order from the same view, so rival claims meet on one stage)."""
    records = list(records)
    warned = soft_noticed(records) | {r.stage for r in records if r.state == StageState.HANDING_OVER}
    return sorted(vacant, key=lambda s: (s not in warned, s))


async def fetch_full_state(
    ctx: RecoveryContext,
    peer: StageRecord,
    request: pb.FetchWeightsRequest,
    limit: int,
    retry_seconds: float,
    what: str,
    retry: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.RESOURCE_EXHAUSTED,),
) -> tuple[pb.MicrobatchMeta | None, dict[str, torch.Tensor], int]:
    """A full stage state streamed by ``FetchWeights(request)`` from ``peer``: (meta, tensors, bytes). Codes in
    ``retry`` (``busy``: a prepared step is still being committed or aborted there) are asked again for up to
    ``retry_seconds``; anything else is :class:`SourceLost`."""
    deadline = time.monotonic() + retry_seconds
    while True:
        asm, nbytes = TensorAssembler(max_tensor_bytes=limit, max_stream_bytes=limit), 0
        try:
            async for message in ctx.channels.stub(peer).FetchWeights(request, timeout=ctx.timing.rpc_timeout):
                asm.feed(message)
                nbytes += len(message)
            return asm.meta, asm.finish(), nbytes
        except grpc.aio.AioRpcError as err:
            if err.code() in retry and time.monotonic() < deadline:
                await asyncio.sleep(BUSY_RETRY_SECONDS)
                continue
            stage = request.requester_stage
            raise SourceLost(f"{what} of stage {stage} from {peer.peer_id}: {err.code().name}") from None
        except WireError as err:
            raise SourceLost(f"{peer.peer_id} sent a bad {what} stream: {err}", peer.peer_id) from None


async def load_full_state(
    ctx: RecoveryContext,
    stage: int,
    state: dict[str, torch.Tensor],
    step: int,
    lr_scale: float,
    norm: float,
    source: str,
) -> StageRuntime:
    """The runtime of ``stage`` at committed ``step`` from a full state (weights and AdamW state), built on the
    compute thread; a state that does not load is :class:`SourceLost` naming ``source``."""

    def build() -> StageRuntime:
        runtime = StageRuntime(
            ctx.config, stage, ctx.device, lr_scale=lr_scale, committed_step=step, last_grad_norm=norm
        )
        runtime.load_full_state(state)
        return runtime

    try:
        return await ctx.compute.run(build)
    except (RuntimeError, ValueError, KeyError) as err:  # e.g. optimizer state of the wrong shape
        raise SourceLost(f"the state of stage {stage} from {source} cannot be loaded: {err}", source) from None


class Handoff:
    """Carries out :attr:`Method.HANDOFF` plans. ``retry_seconds``: how long to keep asking an owner that is
    still finishing a prepared step (it answers ``busy`` meanwhile)."""

    methods = frozenset({Method.HANDOFF})

    def __init__(self, retry_seconds: float = 30.0) -> None:
        self.retry_seconds = retry_seconds

    @staticmethod
    def owner(ctx: RecoveryContext, stage: int) -> StageRecord | None:
        """The node handing ``stage`` over (the newest claim, if the view holds several)."""
        leaving = [
            r for r in ctx.presence.members(HANDING_OVER) if r.stage == stage and r.peer_id not in ctx.distrusted
        ]
        return max(leaving, key=lambda r: r.epoch, default=None)

    async def recover(self, plan: RecoveryPlan, ctx: RecoveryContext, committed: int) -> Recovered:
        stage, started = plan.stage, time.monotonic()
        parked = plan.sources[0] != stage  # the owner is gone: it left its state on this route neighbour
        peer = ctx.peer_of(plan.sources[0]) if parked else self.owner(ctx, stage)
        if peer is None:
            raise SourceLost(f"the state of stage {stage} is no longer on stage {plan.sources[0]}")
        spec = expected_state(ctx.config, stage)
        limit = max_state_bytes(spec)
        me = ctx.presence.me.peer_id
        request = pb.FetchWeightsRequest(requester_stage=stage, requester_peer=me, full_state=not parked, parked=parked)
        meta, tensors, nbytes = await fetch_full_state(ctx, peer, request, limit, self.retry_seconds, "handoff")
        try:
            step, lr_scale, norm = check_handoff(meta, tensors, spec, f"the owner of stage {stage}")
        except BadSource as err:
            raise SourceLost(str(err), peer.peer_id) from None
        fetch_seconds = time.monotonic() - started
        state = {k: v for k, v in tensors.items() if not k.startswith("meta.")}
        if parked and committed > step:  # a parked state the swarm moved past: stale, the stage joins at its step
            step, stale = committed, committed - step
        else:
            stale = 0

        runtime = await load_full_state(ctx, stage, state, step, lr_scale, norm, peer.peer_id)
        if step != committed:
            logger.warning("stage %d handed over at step %d; the swarm is at %d", stage, step, committed)
        # audit=False: the state is the owner's own, exactly; saving it first would only delay serving the stage
        return Recovered(
            runtime, step, lr_scale, nbytes=nbytes, fetch_seconds=fetch_seconds, stale_steps=stale, audit=False
        )
