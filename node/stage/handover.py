"""The leaving side of a handoff: a preempted node gives its stage's exact state to a successor.

On a hard notice the daemon finishes the step in flight and takes no other (stage 0's driver starts none; a
block stage still prepares and commits the step stage 0 has under way, and refuses ``Prepare`` once its state
is sealed for the successor, see ``Handoffs.seal``) and hands over:

1. the seat is marked ``handing_over`` and the node announces its stage ``handing_over``, naming a waiting
   spare its ``successor`` (the lowest peer id; another if that one goes): the named spare takes the stage at
   once, without the claim's settle period, and other spares leave it alone; with no spare named, spares claim
   it as they claim any vacant stage (lowest peer id wins). Stage 0 stops sending it new work;
2. the winner plans ``handoff`` and fetches the full state with ``FetchWeights(full_state=True)``; the service
   serves it once no prepared step waits for its commit or abort;
3. the successor serves the stage under a newer claim epoch; this node sees that claim (it is fenced in)
   and stops serving.

If nobody takes the stage in time (the notice less a margin for a clean exit and the time parking takes), the
node leaves its full state with a serving route neighbour (``ParkState``); the neighbour announces it in its
record (``parked_stage``, ``parked_step``), and the node that takes the vacant stage later restores that exact
copy (method ``handoff`` from the neighbour, with its staleness in steps). Only if nothing could be parked
does the swarm recover the stage as from a death (CheckFree, or a checkpoint). The daemon acknowledges the
notice (Azure) and exits 0 either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from node.events import EventLog, HandedOverEvent, NoticeEvent
from node.metrics import StageMetrics
from node.preemption.notice import Notice
from node.proto import stage_pb2 as pb
from node.recovery.handoff import choose_successor, max_state_bytes, successor_pending
from node.recovery.rebuild import expected_state
from node.security.authz import route_neighbours
from node.stage.compute import Background
from node.stage.handoffs import EncodedState, Handoffs
from node.stage.participant import PipelineParticipant
from node.stage.presence import Presence
from node.stage.seat import Seat
from node.transport.channels import ChannelPool
from node.wire.records import StageRecord, StageState

logger = logging.getLogger(__name__)
EXIT_MARGIN_SECONDS = 3.0  # left of the notice for the clean exit (announce offline, stop serving)
POLL_SECONDS = 0.2
PARK_BYTES_PER_SECOND = 50 * 2**20  # a conservative rate to a neighbour, to keep time back for parking


class Handover:
    """Hands ``seat``'s stage over to a successor, or parks its state on a route neighbour (see the module
    docstring)."""

    def __init__(
        self,
        seat: Seat,
        presence: Presence,
        participant: PipelineParticipant,
        channels: ChannelPool,
        metrics: StageMetrics,
        events: EventLog,
        full_stream: Callable[[], Awaitable[tuple[int, Iterable[bytes]]]] | None = None,
        seal: Callable[[], bool] | None = None,
    ) -> None:
        """``full_stream``: (committed step, the full state as messages), e.g. ``Handoffs.full_stream``, which
        serves a stream pre-staged on a soft notice; by default a snapshot encoded as it is sent. ``seal``:
        ``Handoffs.seal`` (no step is prepared from then on; False while one is); by default, no step is prepared."""
        self.seat, self.presence, self.participant, self.channels = seat, presence, participant, channels
        self.metrics, self.events = metrics, events
        self.full_stream = full_stream or self._snapshot_stream
        self.seal = seal or (lambda: seat.runtime is not None and not seat.runtime.prepared)

    def park_seconds(self) -> float:
        """Time kept back from the notice to park the state if no successor comes: its size at a modest rate."""
        spec = expected_state(self.participant.config, self.seat.stage)
        return 1.0 + max_state_bytes(spec) / PARK_BYTES_PER_SECOND

    async def run(self, notice: Notice, stopping: asyncio.Event) -> StageRecord | None:
        """Returns the successor's record once it serves the stage, or None when the notice ran out first."""
        seat, presence = self.seat, self.presence
        stage = seat.stage
        assert stage is not None and seat.runtime is not None
        seat.handing_over = True
        presence.successor = choose_successor(presence.members(None))
        await presence.announce(StageState.HANDING_OVER)
        await self._tell_successors()
        window = max(0.0, notice.seconds_left() - EXIT_MARGIN_SECONDS)
        logger.warning(
            "%s notice (%s): handing stage %d over at step %d; %.0f s to find a successor",
            notice.provider, notice.kind, stage, seat.committed_step, window,
        )  # fmt: skip
        started = time.monotonic()
        successor = await self._successor(stopping, started + window - self.park_seconds())
        if successor is None and stopping.is_set():  # told to stop at once (a second signal): no handover
            logger.warning("stopping before anyone took stage %d", stage)
            return None
        parked_on = None
        if successor is None:
            successor = await self._replica_carries_on(last_chance=True)
        if successor is None:
            # up to the notice's end: the machine may go a little later, so a late attempt is still worth it
            parked_on = await self._park(stage, time.monotonic() + max(0.5, notice.seconds_left() - 0.1))
        seconds = time.time() - notice.received
        to_replica = successor is not None and successor.epoch == seat.epoch  # a successor's claim is newer
        result = (("to_replica" if to_replica else "handed_over") if successor
                  else "parked" if parked_on is not None else "missed_deadline")  # fmt: skip
        self.metrics.handoffs.labels(result=result).inc()
        if successor is not None:
            self.metrics.handoff_seconds.observe(seconds)
            logger.warning("stage %d handed over to %s%s in %.1f s", stage, successor.peer_id,
                           " (a replica of it: no state moved)" if to_replica else "", seconds)  # fmt: skip
        elif parked_on is None:
            logger.warning("nobody took stage %d within the notice; leaving it to recovery", stage)
        self.events.emit(
            HandedOverEvent(
                stage=stage,
                step=seat.committed_step,
                to=successor.peer_id if successor else None,
                to_replica=to_replica,
                seconds=seconds,
                parked_on=parked_on,
            )
        )
        return successor

    async def _successor(self, stopping: asyncio.Event, until: float) -> StageRecord | None:
        """Waits for a serving record of this stage by a newer epoch (the successor), until ``until``."""
        stage = self.seat.stage
        presence = self.presence
        while not stopping.is_set() and time.monotonic() < until:
            await presence.try_refresh()
            if (successor := presence.newer_claim() or await self._replica_carries_on()) is not None:
                return successor
            others = presence.members(None)
            named = presence.successor
            # none named yet, or the named spare has gone or took another stage: name another
            if (named is None or not successor_pending(others, stage, named)) and (other := choose_successor(others)):
                presence.successor = other
                await presence.announce()
                await self._tell_successors()
            await presence.nudges.pause(POLL_SECONDS, stopping)  # the successor's nudge, once it serves, wakes it
        return None

    async def _replica_carries_on(self, last_chance: bool = False) -> StageRecord | None:
        """Another replica of this stage that carries it on, so that no state has to move: one whose committed
        step is past this node's (stage 0 trains on without this node: the step in flight is settled here and
        no new one comes), or, as a ``last_chance`` before parking, one that holds every step committed here
        once this node is sealed. Its heartbeat reply says so (same peer and stage): a record can be a period
        old."""
        seat, presence = self.seat, self.presence
        others = [r for r in presence.replicas_of(seat.stage) if r.peer_id != presence.me.peer_id]
        if not others or (last_chance and not self.seal()):
            return None
        request = pb.HeartbeatRequest(sender_stage=seat.stage, sender_peer=presence.me.peer_id,
                                      committed_step=seat.committed_step)  # fmt: skip
        needed = seat.committed_step + (0 if last_chance else 1)
        for peer in others:
            try:
                reply = await self.channels.stub(peer).Heartbeat(request, timeout=presence.timing.heartbeat_timeout)
            except grpc.aio.AioRpcError:
                continue
            if (reply.peer_id, reply.stage) == (peer.peer_id, seat.stage) and reply.committed_step >= needed:
                return peer
        return None

    async def _tell_successors(self) -> None:
        """Nudges the named successor (with none named, every spare: they claim the stage as a vacancy) and
        stage 0 (it stops sending work here): both re-read the DHT now rather than at their next poll."""
        presence = self.presence
        spares = [r for r in presence.spares() if presence.successor in (None, r.peer_id)]
        await presence.nudge([*spares, *presence.replicas_of(0)])

    async def _snapshot_stream(self) -> tuple[int, Iterable[bytes]]:
        step, state = await self.participant.snapshot_full()
        meta = pb.MicrobatchMeta(step=step, sender_stage=self.seat.stage, sender_peer=self.presence.me.peer_id)
        return step, EncodedState(meta, state)

    async def _park(self, stage: int, until: float) -> int | None:
        """Leaves the full state with the first serving route neighbour that takes it; returns that stage."""
        seat, cfg = self.seat, self.participant.config
        while not self.seal() and seat.runtime is not None and time.monotonic() < until:
            await asyncio.sleep(0.05)  # the step in flight is settled (committed or aborted) first
        if seat.runtime is None or not self.seal():
            return None
        step, chunks = await self.full_stream()
        # block stages first: stage 0 carries the most state and work already
        for neighbour in sorted(route_neighbours(stage, cfg.num_stages, cfg.out_of_order), key=lambda n: (n == 0, n)):
            peer = self.presence.peer_of(neighbour)
            remaining = until - time.monotonic()
            if peer is None or remaining <= 0:
                continue
            try:
                await self.channels.stub(peer).ParkState(iter(chunks), timeout=remaining)
            except grpc.aio.AioRpcError as err:
                logger.warning("stage %d could not park its state on stage %d: %s", stage, neighbour, err.code().name)
                continue
            logger.warning("nobody took stage %d in time: its state at step %d is parked on stage %d", stage, step,
                           neighbour)  # fmt: skip
            return neighbour
        return None


class Notices:
    """What a preemption notice does to a node (``PreemptionWatcher`` calls :meth:`on_notice`): a hard one makes
    a node that serves a stage leave (:attr:`leaving`: the daemon stops taking steps, then :meth:`hand_over`,
    then exits; a spare, a node still building its stage, or a second notice stops at once); a soft one makes
    it prepare: it pre-stages its full state and announces ``soft_notice`` so that spares stand by for it."""

    def __init__(
        self,
        seat: Seat,
        presence: Presence,
        handoffs: Handoffs,
        metrics: StageMetrics,
        events: EventLog,
        background: Background,
        stopping: asyncio.Event,
    ) -> None:
        self.seat, self.presence, self.handoffs, self.metrics, self.events = seat, presence, handoffs, metrics, events
        self.background, self.stopping = background, stopping
        self.leaving = asyncio.Event()
        self.notice: Notice | None = None

    def on_notice(self, notice: Notice) -> None:
        """Called on the event loop for every notice."""
        self.metrics.notices.labels(provider=notice.provider, kind=notice.kind.value).inc()
        self.events.emit(
            NoticeEvent(
                stage=self.seat.stage, provider=notice.provider, kind=notice.kind.value,
                seconds_left=notice.seconds_left(),
            )
        )  # fmt: skip
        if not notice.hard:
            # stand by: pre-stage the full state (a stage still being built: from its first commit on), and
            # announce the notice so that spares stand by for this stage
            logger.warning("%s warns of a preemption (%s); carrying on, prepared to hand over", notice.provider,
                           notice.kind)  # fmt: skip
            if self.seat.stage is not None and not self.handoffs.prestaging:
                self.handoffs.prestage()
                self.background.spawn(self.presence.announce())
            return
        if self.notice is not None or not self.seat.ready:
            self.stopping.set()
            return
        self.notice = notice
        self.leaving.set()

    async def hand_over(self, participant: PipelineParticipant, channels: ChannelPool, watcher: Any) -> None:
        """Hands the stage over (or gives up when the notice runs out), then acknowledges the notice (Azure)."""
        assert self.notice is not None
        await Handover(
            self.seat, self.presence, participant, channels, self.metrics, self.events,
            full_stream=self.handoffs.full_stream, seal=self.handoffs.seal,
        ).run(self.notice, self.stopping)  # fmt: skip
        await watcher.acknowledge(self.notice)
