"""A node's presence in the swarm: its DHT record, its view of the others, suspicion and heartbeats.

The node announces itself every ``refresh_seconds`` with an expiry of twice that, and reads the whole
swarm back with the same period. A peer whose RPC or heartbeat fails is *suspected* at once: it is left
out of every choice for 3 refresh periods (by then its record has expired if it is really dead), its
record is ignored by everyone (a suspicion, below), and whoever waits on the step in flight is told
(``on_peer_lost``). It also publishes a signed *suspicion* in the DHT: a peer that a
live route neighbour reports dead is left out of every node's view until its record expires, so spares
see the vacancy at once.

Changes that another node waits for are also *pushed*: the node that makes one (a leaving owner naming its
successor, a neighbour reporting a death, a successor serving its stage) sends a heartbeat with ``refresh``
to the nodes that wait, which re-read the DHT at once instead of at their next poll (:meth:`Presence.nudge`,
:class:`~node.stage.nudges.Nudges`). The DHT stays the one source of truth (claims, epochs, fencing): a nudge only says
when to look, so a lost or forged one costs at most a poll period or one extra read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from node import __version__
from node.dht.directory import pick_peer, route_peer
from node.events import EventLog, FailureDetectedEvent
from node.metrics import StageMetrics
from node.options import TimingOptions
from node.proto import stage_pb2 as pb
from node.recovery.planner import declared_dead
from node.stage.compute import Background, BlockingIO
from node.stage.nudges import Nudges, send_nudges
from node.stage.runtime import StepFailed
from node.stage.seat import Seat
from node.stage.stalls import StallWatch
from node.topology import heartbeat_side, neighbour_stages, swap_partner
from node.transport.channels import ChannelPool
from node.wire.records import (
    SERVING_STATES,
    SPEAKING_STATES,
    StageRecord,
    StageState,
    next_epoch,
    same_swarm,
)

logger = logging.getLogger(__name__)
OCCUPYING = SERVING_STATES | {StageState.RECOVERING}


class Directory(Protocol):
    """Blocking access to the swarm's records (:class:`node.dht.directory.SwarmDirectory`)."""

    malformed_seen: int

    def announce(self, record: StageRecord, ttl: float) -> bool: ...

    def report_dead(self, observer: StageRecord, dead_peer_id: str, ttl: float) -> bool: ...

    def records_and_suspicions(self) -> tuple[list[StageRecord], dict[str, set[str]]]: ...


@dataclass
class NodeIdentity:
    """What this node's record says about where it is (filled in as the servers start)."""

    peer_id: str
    fingerprint: str
    num_stages: int
    out_of_order: bool
    node: str = ""  # the name its certificate gives it (--insecure: its peer id)
    grpc_address: str = ""
    metrics_port: int | None = None
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)


class LastRecords:
    """The last record read of every peer, kept one record lifetime after it lapsed from the DHT (a newer claim
    of its stage still outranks it; a peer declared dead is forgotten at once)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[StageRecord, float]] = {}  # peer id -> (its last record read, when)

    def read(self, view: list[StageRecord], dead: set[str] | frozenset[str], ttl: float) -> None:
        now = time.monotonic()
        self._last = {p: seen for p, seen in self._last.items() if now - seen[1] < ttl and p not in dead}
        self._last.update((r.peer_id, (r, now)) for r in view)

    def lapsed(self, exclude: set[str] | frozenset[str]) -> list[StageRecord]:
        """The kept records of the peers not in ``exclude`` (those in the view, suspects, this node)."""
        return [r for peer, (r, _) in self._last.items() if peer not in exclude]


class Presence:
    """This node's record, the swarm view, suspicion of dead peers, heartbeats and peer resolution."""

    def __init__(
        self,
        directory: Directory,
        io: BlockingIO,
        seat: Seat,
        me: NodeIdentity,
        timing: TimingOptions,
        channels: ChannelPool,
        metrics: StageMetrics,
        events: EventLog,
        replica_step: Callable[[], int | None] = lambda: None,
        parked: Callable[[], tuple[int, int] | None] = lambda: None,
        soft_notice: Callable[[], bool] = lambda: False,
        stage0_rebuildable: bool = False,
        throughput: Callable[[], float | None] = lambda: None,
        snapshots: Callable[[], list[tuple[int, int]]] = list,
    ) -> None:
        self.directory, self.io, self.seat, self.me = directory, io, seat, me
        self.timing, self.channels, self.metrics, self.events = timing, channels, metrics, events
        self.replica_step = replica_step
        self.parked = parked  # (stage, committed step) of a preempted neighbour's state held here
        self.soft_notice = soft_notice  # a soft preemption notice is active (spares stand by for this stage)
        self.throughput = throughput  # microbatches/s this node computes (measured), for stage 0's routing
        self.snapshots = snapshots  # (stage, committed step) of the neighbour snapshots held here (ladder)
        self.stage0_rebuildable = stage0_rebuildable  # checkfree+, checkpoint, ladder: stage 0 can be rebuilt
        self.successor: str | None = None  # handing over: the spare named to take the stage
        self.stalls = StallWatch(  # back from a stall, the node yields its stage to a claim (see stalls.py)
            lambda: self.record_ttl, lambda: timing.refresh_seconds,
            lambda: seat.stage is not None and bool(seat.stage or self.stage0_rebuildable),
        )  # fmt: skip
        self.state = StageState.JOINING
        self.view: list[StageRecord] = []
        self.suspects: dict[str, float] = {}  # peer id -> when it was found dead (monotonic)
        self.committed_seen = 0  # the highest committed step any record of this swarm has shown (committed_known)
        self.last_alive: dict[str, float] = {}  # peer id -> its last successful heartbeat (monotonic)
        self.missed: dict[str, int] = {}  # peer id -> heartbeats missed in a row
        self.on_peer_lost: list[Callable[[StepFailed], None]] = []
        self.on_fenced: list[Callable[[StageRecord], None]] = []  # another peer holds our stage by a newer claim
        self._reported_dead: set[str] = set()
        self._background = Background()
        self.nudges = Nudges(metrics)  # what other nodes push: poll loops pause on it
        self.read_at = -math.inf  # when the view's DHT read started (monotonic)
        self.lately = LastRecords()  # for members_lately
        self.dead: frozenset[str] = frozenset()  # peers a route neighbour reported dead, as of the last read

    # ---- this node's record -----------------------------------------------------------------------
    def record(self, state: StageState | None = None) -> StageRecord:
        stage, me = self.seat.stage, self.me
        return StageRecord(
            stage=stage,
            num_stages=me.num_stages,
            peer_id=me.peer_id,
            node=me.node or me.peer_id,
            grpc_address=me.grpc_address,
            state=state or self.state,
            committed_step=self.seat.committed_step,
            config_fingerprint=me.fingerprint,
            version=__version__,
            host=me.host,
            pid=me.pid,
            metrics_port=me.metrics_port,
            last_recovery=self.seat.last_recovery,
            swap_partner=None if stage is None else swap_partner(stage, me.num_stages, me.out_of_order),
            replica_step=self.replica_step(),
            epoch=self.seat.epoch if stage is not None else 0,
            parked_stage=parked[0] if (parked := self.parked()) else None,
            parked_step=parked[1] if parked else None,
            soft_notice=self.soft_notice() and stage is not None,
            successor=self.successor if (state or self.state) == StageState.HANDING_OVER else None,
            throughput=self.throughput(),
            snapshots=self.snapshots(),
        )

    async def announce(self, state: StageState | None = None) -> None:
        """Stores this node's record (in ``state``, which becomes the node's state); best effort."""
        if state is not None:
            self.state = state
        if self.seat.stage is None and self.state == StageState.JOINING:
            return  # a --stage auto node has no record until it is a spare (a joining record needs a stage)
        if self.stalls.yielding() and self.state in SERVING_STATES:
            return
        try:
            await self.io.run(self.directory.announce, self.record(), self.record_ttl)
        except Exception:  # the DHT is best effort; the next refresh tries again
            logger.exception("DHT announce failed")

    def announce_soon(self, state: StageState) -> None:
        """Becomes ``state`` now and stores the record in the background (nobody's next move waits for it)."""
        self.state = state
        self._background.spawn(self.announce())

    @property
    def record_ttl(self) -> float:
        return 2 * self.timing.refresh_seconds

    async def refresh(self) -> list[StageRecord]:
        """Reads the swarm's records into :attr:`view`."""
        before = self.directory.malformed_seen
        taken = self.nudges.taken  # those this read will have seen (a nudge during the read may be missed by it)
        started = time.monotonic()
        records, suspicions = await self.io.run(self.directory.records_and_suspicions)
        self.nudges.read(taken)
        self.read_at = started
        self.dead = dead = declared_dead(records, suspicions, self.me.num_stages)
        self.view = [r for r in records if r.peer_id not in dead]
        self.lately.read(self.view, dead, self.record_ttl)
        self.committed_seen = max([self.committed_seen, *(r.committed_step for r in self.members(None))])
        # back from a stall (a frozen process or VM): the swarm may be rebuilding this stage; a claim fences it
        if not self.seat.handing_over and (newer := self.newer_claim(claims=self.stalls.yielding())) is not None:
            for callback in self.on_fenced:
                callback(newer)
        self.metrics.malformed_records.inc(self.directory.malformed_seen - before)
        online = {r.stage for r in self.view if r.state in SERVING_STATES}
        self.metrics.stages_online.set(len(online))
        return self.view

    def newer_claim(self, claims: bool = False) -> StageRecord | None:
        """Another peer serving this node's stage by a higher epoch, if the view holds one: this node then
        stops serving the stage (it was declared dead, and a replacement has taken over). With ``claims``, a
        peer still rebuilding the stage by a higher epoch counts too (:meth:`refresh` asks for that while the
        node is back from a stall, see :class:`~node.stage.stalls.StallWatch`): a node that comes back to find
        its stage claimed yields at once, rather than outliving the claim and undoing the recovery the swarm
        has started. A live node resists claims (the claimant sees it serving and backs off). Stage 0 yields to
        a claim only when ``stage0_rebuildable`` (its claimant could not rebuild it otherwise)."""
        seat = self.seat
        if seat.stage is None or not seat.ready:
            return None
        states = (
            SERVING_STATES | {StageState.RECOVERING} if claims and (seat.stage or self.stage0_rebuildable) else None
        )
        peers = self.members(states) if states is not None else self.members()
        return next((r for r in peers if r.stage == seat.stage and r.epoch > seat.epoch), None)

    def claim_epoch(self, stage: int) -> int:
        """The epoch of this node's claim of ``stage``, from the records it sees (expired ones are gone)."""
        return next_epoch(self.view, stage, int(time.time() * 1000))

    async def try_refresh(self, max_age: float = 0.0) -> None:
        """:meth:`refresh`, keeping the old view when the DHT does not answer. With ``max_age``, a view read
        that recently (and with no nudge since) is kept as it is."""
        if max_age and time.monotonic() - self.read_at < max_age and not self.nudges.pending:
            return
        with contextlib.suppress(Exception):
            await self.refresh()

    async def run_periodic(self, stopping: asyncio.Event) -> None:
        """Announce and refresh every period until ``stopping``."""
        self._background.spawn(self.stalls.run(stopping))
        while not stopping.is_set():
            await self.try_refresh()  # first: a node that was fenced off meanwhile must not announce its stage again
            await self.announce()
            await self.nudges.pause(self.timing.refresh_seconds, stopping)

    # ---- pushed changes ----------------------------------------------------------------------------
    async def nudge(self, peers: Iterable[StageRecord]) -> None:
        """Tells ``peers`` (at once, concurrently) to re-read the DHT: this node just stored a change they wait
        for. Best effort: a peer that does not answer finds the change at its next poll."""
        request = pb.HeartbeatRequest(
            sender_stage=self.seat.stage or 0, sender_peer=self.me.peer_id, committed_step=self.seat.committed_step,
            refresh=True,
        )  # fmt: skip
        others = [p for p in peers if p.peer_id != self.me.peer_id]
        await send_nudges(self.channels, request, others, self.timing.heartbeat_timeout)

    def spares(self) -> list[StageRecord]:
        """The spares of this swarm waiting for a vacant stage."""
        return self.members(frozenset({StageState.SPARE}))

    def waiting_on(self, stage: int) -> list[StageRecord]:
        """The peers that wait for ``stage`` to be served again: stage 0 (it drives the steps), the peers of the
        route neighbour stages, and the other peers of ``stage`` itself (a leaving owner waits for its successor)."""
        stages = {0, stage, *neighbour_stages(stage, self.me.num_stages)}
        return [r for r in self.members(SPEAKING_STATES) if r.stage in stages]

    # ---- the others -------------------------------------------------------------------------------
    def members(self, states: frozenset[StageState] | None = SERVING_STATES) -> list[StageRecord]:
        """Other peers of this swarm in ``states`` (serving, by default), suspects left out."""
        me = self.me
        return same_swarm(
            self.view,
            fingerprint=me.fingerprint,
            num_stages=me.num_stages,
            states=states,
            exclude=self.suspected() | {me.peer_id},
        )

    def members_lately(self) -> list[StageRecord]:
        """Every member of this swarm (any state, suspects left out), including one whose record lapsed from the
        DHT within the last record lifetime and that nobody declared dead (:class:`LastRecords`): who may call
        what (``authz``) must not flip on a node slowed down by load that missed its announce by a moment."""
        current, me = self.members(None), self.me
        lapsed = self.lately.lapsed({r.peer_id for r in current} | self.suspected() | {me.peer_id})
        return current + same_swarm(lapsed, fingerprint=me.fingerprint, num_stages=me.num_stages)

    def suspected(self) -> frozenset[str]:
        """Peers found dead recently; forgiven after 3 refresh periods, by when a dead peer's record expired."""
        now = time.monotonic()
        for peer, since in list(self.suspects.items()):
            if now - since > 3 * self.timing.refresh_seconds:
                del self.suspects[peer]
        return frozenset(self.suspects)

    def peer_of(self, stage: int, exclude: frozenset[str] = frozenset()) -> StageRecord | None:
        """The peer to talk to for ``stage``: serving, most committed steps, then lowest peer id (never this
        node, a suspect or a peer in ``exclude``)."""
        me = self.me
        exclude = exclude | self.suspected() | {me.peer_id}
        return pick_peer(self.view, stage, fingerprint=me.fingerprint, num_stages=me.num_stages, exclude=exclude)

    def member(self, peer_id: str, lately: bool = False) -> StageRecord | None:
        """The live record of ``peer_id`` (None: gone, suspected, or not of this swarm); ``lately``: or its serving
        record that lapsed within a record lifetime (:meth:`members_lately`: a loaded node misses an announce)."""
        peers = self.members_lately() if lately else self.members()
        return next((r for r in peers if r.peer_id == peer_id and r.state in SERVING_STATES), None)

    def replicas_of(self, stage: int, committed_step: int | None = None) -> list[StageRecord]:
        """Every live peer serving ``stage`` (at ``committed_step``, when given), ordered by peer id."""
        peers = [r for r in self.members() if r.stage == stage]
        if committed_step is not None:
            peers = [r for r in peers if r.committed_step == committed_step]
        return sorted(peers, key=lambda r: r.peer_id)

    def swarm_committed(self) -> int:
        """The highest committed step any other live peer of this swarm announces."""
        return max((r.committed_step for r in self.members()), default=0)

    def committed_known(self) -> int:
        """The live peers' committed step, or if none serves, the highest one this node has seen announced:
        a swarm whose peers all went (a teardown, a region lost) has trained, and a spare that sees its stages
        vacant must not take that for a new swarm and start a stage from the seed's initial weights."""
        return self.swarm_committed() or self.committed_seen

    async def serving_peer(self, stage: int) -> str | None:
        """Another live (or rebuilding) peer that holds ``stage``, per a fresh read of the DHT."""
        await self.try_refresh()
        return next((r.peer_id for r in self.members(OCCUPYING) if r.stage == stage), None)

    def suspect(self, peer: StageRecord, why: str) -> None:
        """Marks ``peer`` dead at once (the DHT expiry confirms it) and fails the step in flight."""
        if peer.peer_id in self.suspects:
            return
        self.suspects[peer.peer_id] = time.monotonic()
        self._background.spawn(self.channels.drop(peer))
        if peer.peer_id not in self._reported_dead:
            self._reported_dead.add(peer.peer_id)
            # Everyone ignores a peer its live neighbour reports dead, so spares see the vacancy now rather than
            # when its record expires; a signed suspicion lives as long as a record does.
            self._background.spawn(self._report_dead(peer))
            logger.warning("stage %s peer %s is unreachable (%s)", peer.stage, peer.peer_id, why)
            self.metrics.failures_detected.inc()
            if peer.peer_id in self.last_alive:
                self.metrics.failure_detection_seconds.observe(time.monotonic() - self.last_alive[peer.peer_id])
            self.events.emit(FailureDetectedEvent(stage=peer.stage, peer=peer.peer_id, by=self.seat.stage, why=why))
        self.peer_lost(StepFailed(f"stage {peer.stage} ({peer.peer_id}) lost: {why}"))

    async def _report_dead(self, peer: StageRecord) -> None:
        """Publishes the suspicion of ``peer``, then nudges the spares: one of them may claim its stage now."""
        with contextlib.suppress(Exception):  # the DHT is best effort; the dead record expires anyway
            await self.io.run(self.directory.report_dead, self.record(), peer.peer_id, self.record_ttl)
        await self.nudge(self.spares())

    def peer_lost(self, failure: StepFailed) -> None:
        for callback in self.on_peer_lost:
            callback(failure)

    def route_peer(self, peer_id: str, stage: int) -> tuple[StageRecord | None, bool]:
        """:func:`~node.dht.directory.route_peer` over this node's view (a suspect is gone)."""
        if peer_id in self.suspected() or peer_id in self.dead:  # a neighbour's report, too: its record is gone
            return None, True
        me = self.me
        return route_peer(same_swarm(self.view, fingerprint=me.fingerprint, num_stages=me.num_stages), peer_id, stage)

    def leaving_peer(self, stage: int) -> StageRecord | None:
        """The peer handing ``stage`` over after a preemption notice, if any."""
        return next((r for r in self.members(frozenset({StageState.HANDING_OVER})) if r.stage == stage), None)

    async def resolve(
        self, stage: int, deadline: float, stopping: asyncio.Event | None = None, leaving_ok: bool = False
    ) -> StageRecord:
        """The serving peer of ``stage``, waiting for one (re-reading the DHT) until ``deadline``. With
        ``leaving_ok``, a peer handing the stage over will do when none serves it (the commit's control calls:
        a step it prepared must still be committed or aborted there, and a new one is refused at once)."""
        while True:
            peer = self.peer_of(stage) or (self.leaving_peer(stage) if leaving_ok else None)
            if peer is not None:
                return peer
            if time.monotonic() >= deadline or (stopping is not None and stopping.is_set()):
                raise StepFailed(f"no serving peer for stage {stage}")
            await self.nudges.pause(min(0.2, self.timing.refresh_seconds), stopping)
            await self.try_refresh()

    # ---- heartbeats -------------------------------------------------------------------------------
    async def ping(self, stage: int) -> bool:
        """One heartbeat to every peer of ``stage`` (each replica: a dead one must not wait for its record to
        expire while microbatches are routed to it), or to the peer handing it over when none serves it; True
        when one of them answers."""
        leaving = self.leaving_peer(stage)  # it finishes the step in flight: it must still answer
        peers = self.replicas_of(stage) or ([leaving] if leaving is not None else [])
        if not peers:
            # No serving peer left: a neighbour reported it dead (or its record expired) before our own
            # heartbeats failed. The step in flight cannot finish either way.
            self.peer_lost(StepFailed(f"stage {stage} has no serving peer"))
            return False
        return any(await asyncio.gather(*(self.ping_peer(peer) for peer in peers)))

    async def ping_peer(self, peer: StageRecord) -> bool:
        """One heartbeat to ``peer``; ``suspect_after`` failed or late replies in a row make it suspect."""
        stage = peer.stage
        request = pb.HeartbeatRequest(
            sender_stage=self.seat.stage or 0, sender_peer=self.me.peer_id, committed_step=self.seat.committed_step
        )
        started = time.perf_counter()
        try:
            reply = await self.channels.stub(peer).Heartbeat(request, timeout=self.timing.heartbeat_timeout)
            problem = None
            if reply.peer_id != peer.peer_id or reply.stage != stage:
                # another process answers on the peer's address (a restart, a reused port): the peer is not there
                problem = f"answered by {reply.peer_id[:16]!r} for stage {reply.stage}"
        except grpc.aio.AioRpcError as err:
            problem = err.code().name
        if problem is not None:
            self.missed[peer.peer_id] = missed = self.missed.get(peer.peer_id, 0) + 1
            if missed >= self.timing.suspect_after:
                self.suspect(peer, f"heartbeat: {problem} ({missed} missed)")
            return False
        self.missed.pop(peer.peer_id, None)
        self.last_alive[peer.peer_id] = time.monotonic()
        if self.seat.stage is not None and (side := heartbeat_side(self.seat.stage, stage, self.me.num_stages)):
            self.metrics.heartbeat_rtt.labels(side=side).observe(time.perf_counter() - started)
        return True

    async def run_heartbeats(self, stopping: asyncio.Event) -> None:
        """Pings every peer of the route neighbours (stage 0: of every stage) every ``heartbeat_interval``. A
        block stage with a neighbour missing announces ``waiting``, and ``online`` again once both answer."""
        while not stopping.is_set():
            stage = self.seat.stage
            if stage is not None and self.seat.ready:
                alive = await asyncio.gather(*(self.ping(s) for s in neighbour_stages(stage, self.me.num_stages)))
                if stage != 0 and self.state in SERVING_STATES:
                    wanted = StageState.ONLINE if all(alive) else StageState.WAITING
                    if wanted != self.state:
                        await self.announce(wanted)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.timing.heartbeat_interval)

    def close(self) -> None:
        self._background.cancel_all()
