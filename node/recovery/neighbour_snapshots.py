"""Neighbour snapshots (``--recovery ladder``): the rung between an exact copy and a CheckFree average.

Every ``--snapshot-neighbour-every`` K committed steps, each stage sends its full state (weights, AdamW state,
lr scale, last gradient norm) to its *snapshot holder*, the next stage on the route
(:func:`~node.topology.snapshot_holder`), in the background, through ``ParkState`` with ``meta.snapshot``.
The holder keeps the newest snapshot of each stage it holds for and announces them in its record
(``snapshots``). When the stage's last peer dies with no notice, the node that claims it restores that
snapshot (method ``snapshot``): at most K steps stale, with no swarm-wide rollback, and the stage joins at
the swarm's committed step, its staleness in steps reported. The planner
(:func:`~node.recovery.planner.usable_snapshot`) never takes a snapshot the swarm has not committed, nor one
staler than K.

- :class:`SnapshotSender`: the sending side, a hook after each commit (one snapshot in flight at a time; a
  commit that finds the previous one still being sent skips its turn).
- :class:`SnapshotStore`: the holding side, for the ``Stage`` service (``ParkState``, ``FetchWeights``).
- :class:`SnapshotRestore`: the recovery method.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from node.config import SwarmConfig
from node.events import EventLog, NeighbourSnapshotEvent
from node.metrics import StageMetrics
from node.options import TimingOptions
from node.proto import stage_pb2 as pb
from node.recovery.handoff import check_handoff, fetch_full_state, load_full_state, max_state_bytes
from node.recovery.methods import Recovered, RecoveryContext, SourceLost
from node.recovery.planner import Method, RecoveryPlan
from node.recovery.rebuild import BadSource, expected_state
from node.stage.compute import Background, Compute
from node.stage.presence import Presence
from node.stage.refusals import Refusals
from node.stage.runtime import Reject, StageRuntime
from node.stage.seat import Seat
from node.topology import snapshot_holder
from node.transport.channels import ChannelPool
from node.wire.records import SERVING_STATES
from node.wire.tensors import encode_stream

logger = logging.getLogger(__name__)
Send = Callable[[Any, Iterable[bytes], str], Awaitable[None]]  # (context, chunks, rpc)


@dataclass(frozen=True)
class HeldSnapshot:
    stage: int
    step: int  # the committed step the state is of
    sender: str  # the peer id that sent it
    tensors: dict[str, torch.Tensor]


class SnapshotSender:
    """Sends this stage's full state to its snapshot holder after every K-th commit (``after_commit``)."""

    def __init__(
        self,
        config: SwarmConfig,
        every: int,
        seat: Seat,
        compute: Compute,
        presence: Presence,
        channels: ChannelPool,
        timing: TimingOptions,
        metrics: StageMetrics,
        events: EventLog,
    ) -> None:
        self.config, self.every, self.seat, self.compute = config, every, seat, compute
        self.presence, self.channels, self.timing, self.metrics = presence, channels, timing, metrics
        self.events = events
        self.background = Background()
        self._sending: asyncio.Task | None = None

    def sends(self) -> bool:
        """Whether this node sends its stage's snapshots: of several replicas, only the lowest peer id does."""
        stage, me = self.seat.stage, self.presence.me.peer_id
        mates = [r.peer_id for r in self.presence.members(SERVING_STATES) if r.stage == stage]
        return all(me <= peer for peer in mates)

    def after_commit(self, committed: int) -> None:
        """Called on the event loop right after a commit: takes the snapshot on the compute thread, submitted
        now so that it runs before the next step can touch a parameter, and sends it in the background."""
        rt = self.seat.runtime
        if committed % self.every or rt is None or self.seat.stage is None or not self.sends():
            return
        if self._sending is not None and not self._sending.done():
            self.metrics.neighbour_snapshots.labels(result="skipped").inc()
            logger.info("neighbour snapshot of step %d skipped: the previous one is still being sent", committed)
            return
        started = time.monotonic()
        future = self.compute.submit(rt.handover_state)
        self._sending = self.background.spawn(self._send(rt.stage, committed, future, started))

    async def _send(self, stage: int, step: int, future: Awaitable[dict[str, torch.Tensor]], started: float) -> None:
        state = await future
        holder_stage = snapshot_holder(stage, self.config.num_stages)
        holder = self.presence.peer_of(holder_stage)
        if holder is None:
            self.metrics.neighbour_snapshots.labels(result="failed").inc()
            logger.warning("no peer of stage %d to hold stage %d's snapshot of step %d", holder_stage, stage, step)
            return
        meta = pb.MicrobatchMeta(step=step, sender_stage=stage, sender_peer=self.presence.me.peer_id, snapshot=True)
        chunks = await asyncio.to_thread(lambda: list(encode_stream(meta, list(state.items()))))
        try:
            await self.channels.stub(holder).ParkState(iter(chunks), timeout=self.timing.rpc_timeout)
        except grpc.aio.AioRpcError as err:
            self.metrics.neighbour_snapshots.labels(result="failed").inc()
            logger.warning("stage %d could not leave its snapshot of step %d on stage %d: %s", stage, step,
                           holder_stage, err.code().name)  # fmt: skip
            return
        nbytes, seconds = sum(len(c) for c in chunks), time.monotonic() - started
        self.metrics.neighbour_snapshots.labels(result="ok").inc()
        self.metrics.neighbour_snapshot_bytes.inc(nbytes)
        self.metrics.neighbour_snapshot_seconds.observe(seconds)
        self.events.emit(NeighbourSnapshotEvent(stage=stage, step=step, holder=holder_stage, bytes=nbytes,
                                                seconds=seconds))  # fmt: skip

    async def close(self) -> None:
        self.background.cancel_all()


class SnapshotStore:
    """Keeps the newest neighbour snapshot of each stage this node holds for, and serves it back to the node
    that takes that stage. ``send`` streams chunks to a caller (the service's, with its stall limits)."""

    def __init__(self, config: SwarmConfig, seat: Seat, refusals: Refusals, send: Send, metrics: StageMetrics):
        self.config, self.seat, self.refusals, self.send, self.metrics = config, seat, refusals, send, metrics
        self.held: dict[int, HeldSnapshot] = {}

    def steps(self) -> list[tuple[int, int]]:
        """(stage, committed step) of every snapshot held, for this node's record."""
        return sorted((h.stage, h.step) for h in self.held.values())

    async def keep(self, meta: pb.MicrobatchMeta, tensors: dict[str, torch.Tensor], context) -> None:
        """Keeps a snapshot decoded from ``ParkState(meta.snapshot)``, if this stage holds that stage's
        snapshots, it is of a step this stage has committed or is committing, and no newer one is held."""
        seat, refuse = self.seat, self.refusals.refuse
        stage = meta.sender_stage
        if seat.stage is None:
            await refuse(context, Reject.NOT_READY, "this node holds no stage")
        if not 0 <= stage < self.config.num_stages or snapshot_holder(stage, self.config.num_stages) != seat.stage:
            await refuse(context, Reject.BAD_ROUTE, f"stage {seat.stage} does not hold stage {stage}'s snapshots")
        if meta.step > seat.committed_step + 1:  # the sender may commit a moment before this stage does
            await refuse(context, Reject.UNKNOWN_STEP, f"a snapshot of step {meta.step}, but this stage is at "
                                                       f"{seat.committed_step}")  # fmt: skip
        held = self.held.get(stage)
        if held is not None and held.step >= meta.step:
            await refuse(context, Reject.STALE_STEP, f"holds stage {stage}'s snapshot of step {held.step} already")
        try:
            step, _, _ = check_handoff(meta, tensors, expected_state(self.config, stage), f"stage {stage}'s snapshot")
        except BadSource as err:
            await refuse(context, Reject.BAD_STREAM, str(err))
        self.held[stage] = HeldSnapshot(stage, step, meta.sender_peer, tensors)
        self.metrics.neighbour_snapshots_held.set(len(self.held))

    async def give_back(self, request: pb.FetchWeightsRequest, context) -> None:
        """The snapshot of ``request.requester_stage``, to the node that takes that stage."""
        held = self.held.get(request.requester_stage)
        if held is None:
            await self.refusals.refuse(
                context, Reject.UNKNOWN_STEP, f"no snapshot of stage {request.requester_stage} held here"
            )
        meta = pb.MicrobatchMeta(step=held.step, sender_stage=held.stage, sender_peer=held.sender, snapshot=True)
        await self.send(context, encode_stream(meta, list(held.tensors.items())), "FetchWeights")


class SnapshotRestore:
    """Carries out :attr:`Method.SNAPSHOT` plans: the lost stage's newest snapshot from its holder."""

    methods = frozenset({Method.SNAPSHOT})

    async def recover(self, plan: RecoveryPlan, ctx: RecoveryContext, committed: int) -> Recovered:
        stage, started = plan.stage, time.monotonic()
        if not plan.sources:  # the seed's initial state: the snapshot of step 0 that every node can build
            runtime = await ctx.compute.run(
                lambda: StageRuntime(ctx.config, stage, ctx.device, committed_step=committed)
            )
            logger.warning("stage %d restored to the seed's initial state (%d steps stale)", stage, committed)
            return Recovered(runtime, committed, 1.0, stale_steps=committed)
        peer = ctx.peer_of(plan.sources[0])
        if peer is None:
            raise SourceLost(f"no peer of stage {plan.sources[0]} holds stage {stage}'s snapshot any more")
        spec = expected_state(ctx.config, stage)
        me = ctx.presence.me.peer_id
        request = pb.FetchWeightsRequest(requester_stage=stage, requester_peer=me, snapshot=True)
        meta, tensors, nbytes = await fetch_full_state(ctx, peer, request, max_state_bytes(spec), 0.0, "snapshot")
        try:
            step, lr_scale, norm = check_handoff(meta, tensors, spec, f"stage {stage}'s snapshot on {peer.peer_id}")
        except BadSource as err:
            raise SourceLost(str(err), peer.peer_id) from None
        if step > committed:  # never a step the swarm has not committed (its view moved back meanwhile)
            raise SourceLost(f"stage {stage}'s snapshot is of step {step}, past the swarm's {committed}")
        state = {k: v for k, v in tensors.items() if not k.startswith("meta.")}
        runtime = await load_full_state(ctx, stage, state, committed, lr_scale, norm, peer.peer_id)
        logger.warning("stage %d restored from its snapshot of step %d (%d steps stale)", stage, step,
                       committed - step)  # fmt: skip
        return Recovered(
            runtime, committed, lr_scale, nbytes=nbytes, fetch_seconds=time.monotonic() - started,
            stale_steps=committed - step,
        )  # fmt: skip
