"""A node taking over a stage: claim a vacant stage (``--stage auto``), then (re)build its state.

Claiming has no central arbiter: a spare announces itself ``recovering`` for the lowest vacant stage, waits
one DHT refresh period so that rival claims become visible, and keeps the stage only if
:func:`~node.recovery.planner.claim_winner` names it (lowest peer id among claimants); the others go back
to being spares. Every node, including one started with an explicit ``--stage``, then builds its state by
the plan of :func:`~node.recovery.planner.plan_recovery`, carried out by the recovery method that handles
the plan's method (:mod:`node.recovery.methods`); a fresh swarm gets the seed's weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from node.events import EventLog, RecoveryEvent
from node.metrics import StageMetrics
from node.options import RecoveryStrategy
from node.recovery.handoff import named_successor, standby_order
from node.recovery.methods import Recovered, RecoveryContext, RecoveryMethod, SourceLost, Unrecoverable
from node.recovery.planner import (
    EXACT,
    LOSSY,
    Method,
    RecoveryPlan,
    claim_settle_seconds,
    claim_winner,
    live_stages,
    plan_recovery,
    vacant_stages,
)
from node.stage.placement import join_stage
from node.stage.presence import Presence
from node.stage.runtime import StageRuntime
from node.stage.seat import Seat
from node.wire.records import RecoveryRecord, StageState, current_epochs

logger = logging.getLogger(__name__)
FRESH_VIEW_SECONDS = 0.2  # a view read this recently is fresh enough to plan a recovery from
VACANCY_CONFIRM_SECONDS = 0.5  # a stage found vacant is read again this much later before a claim
UNRECOVERABLE_PATIENCE_SECONDS = 15.0  # how long a stage that looks lost must stay unseen before training stops


class StageTaken(RuntimeError):
    """The stage this node was to build turned out to be served by another peer: it waits as a spare."""


async def claim_vacant_stage(presence: Presence, seat: Seat, stopping: asyncio.Event, join: bool = False) -> bool:
    """Waits as a spare until a stage is vacant and this node wins the claim (``seat.stage``, returns False).
    With ``join`` (``--placement throughput``), once the swarm trains and no stage is vacant, it joins the
    block stage with the least throughput as a replica instead (``seat.stage``, returns True)."""
    settle = presence.timing.refresh_seconds  # a rival's claim is one DHT store away: visible within a period
    poll = min(0.5, presence.timing.refresh_seconds)
    me = presence.me
    spare_since: float | None = None  # when this node's spare record went out
    while not stopping.is_set():
        try:
            await presence.refresh()
            vacant = vacant_stages(
                presence.view, fingerprint=me.fingerprint, num_stages=me.num_stages, suspects=presence.suspected()
            )
        except Exception:  # no view this round: claim nothing on a stale one
            vacant = []
        named, reserved = named_successor(vacant, presence.view, me.peer_id)
        if named is not None:  # a leaving owner hands its stage to this node: nobody else claims it
            seat.stage, seat.epoch = named, presence.claim_epoch(named)
            await presence.announce(StageState.RECOVERING)
            logger.info("taking over stage %d, which its leaving owner hands to this node", named)
            return False
        # stages warned of a preemption first; a stage named for another waiting spare is left to it
        vacant = standby_order([s for s in vacant if s not in reserved], presence.members(None))
        if vacant:
            seat.stage, seat.epoch = vacant[0], presence.claim_epoch(vacant[0])
            rivals_settle = claim_settle_seconds(presence.members(None), me.peer_id, settle)
            await presence.announce(StageState.RECOVERING)
            logger.info("claiming vacant stage %d", seat.stage)
            await asyncio.sleep(rivals_settle)
            await presence.try_refresh()
            winner = claim_winner(presence.view, seat.stage, fingerprint=me.fingerprint, num_stages=me.num_stages)
            if winner == me.peer_id:
                return False
            logger.info("stage %d went to %s; staying spare", seat.stage, winner)
            seat.stage = None
        elif join and joinable(spare_since, settle) and presence.swarm_committed() > 0:
            # spares started together each see the others' records by now, and spread out over the stages
            pick = join_stage([*presence.members(None), presence.record()], me.peer_id, me.num_stages)
            if pick is not None:
                logger.info("no stage is vacant: joining stage %d, the one with the least throughput", pick)
                seat.stage = pick
                return True
        await presence.announce(StageState.SPARE)
        spare_since = spare_since or time.monotonic()
        await presence.nudges.pause(poll, stopping)  # a leaving owner or a neighbour reporting a death wakes it
    raise asyncio.CancelledError


async def served_epoch(presence: Presence, stage: int, stopping: asyncio.Event) -> int | None:
    """The epoch of the claim by which ``stage`` is served now, or None when it is vacant. Decided on views
    that were read (never the empty view a node starts with, nor a stale one kept after a failed read), and a
    vacancy only when two reads ``VACANCY_CONFIRM_SECONDS`` apart agree: a lookup just after start, or under
    load, can miss a record, and a node that claimed a served stage would fence its live peer."""
    vacant_reads = 0
    while not stopping.is_set():
        try:
            await presence.refresh()
        except Exception as err:  # no view: decide nothing on it
            logger.warning("reading the swarm's records failed (%s); trying again", err)
        else:
            serving = current_epochs(presence.members()).get(stage)
            if serving is not None:
                return serving
            vacant_reads += 1
            if vacant_reads >= 2:
                return None
        await presence.nudges.pause(VACANCY_CONFIRM_SECONDS, stopping)
    raise asyncio.CancelledError


def joinable(spare_since: float | None, settle: float, now: float | None = None) -> bool:
    """A spare joins a served stage only once its own spare record has been out for a refresh period, so that
    spares started at the same moment see each other and :func:`join_stage` spreads them over the stages."""
    return spare_since is not None and (time.monotonic() if now is None else now) - spare_since >= settle


class StageBuilder:
    """Builds the seat's stage by the recovery plan, re-planning with whoever is alive when a source dies."""

    def __init__(
        self,
        ctx: RecoveryContext,
        seat: Seat,
        strategy: RecoveryStrategy,
        methods: Iterable[RecoveryMethod],
        metrics: StageMetrics,
        events: EventLog,
        stopping: asyncio.Event,
        resume_step: int | None = None,
        join_served: bool = False,
        snapshot_every: int = 0,
    ) -> None:
        """``resume_step``: the step of the swarm snapshot a ``--resume`` start takes (the planner's ``resume``);
        ``join_served``: the node joins a stage another peer serves, as a replica (a spare that claimed a vacant
        stage never does: the peer it sees there may be one its neighbours found dead); ``snapshot_every``:
        ``--recovery ladder``'s K, the most steps a neighbour snapshot may be stale."""
        self.join_served, self.snapshot_every = join_served, snapshot_every
        self.ctx, self.seat, self.strategy, self.metrics, self.events = ctx, seat, strategy, metrics, events
        self.resume_step = resume_step
        self.stopping = stopping
        self.methods = {method: m for m in methods for method in m.methods}

    async def build(self) -> Recovered | None:
        """Builds ``seat.runtime`` for ``seat.stage``; returns what a recovery did (None: a fresh start)."""
        ctx = self.ctx
        claimed_at = time.monotonic()
        while not self.stopping.is_set():
            plan, committed = await self._plan()
            if plan.method == Method.UNRECOVERABLE:
                if await self._served_by_another():
                    raise StageTaken(f"stage {ctx.stage} is served by another peer after all")
                if self.stopping.is_set():  # told to stop meanwhile: that is no verdict on the swarm
                    break
                raise Unrecoverable(f"stage {ctx.stage} cannot be rebuilt: {plan.reason}")
            if plan.method == Method.FRESH:
                self.seat.runtime = await ctx.compute.run(StageRuntime, ctx.config, ctx.stage, ctx.device)
                return None
            method = self.methods.get(plan.method)
            if method is None:
                raise Unrecoverable(f"stage {ctx.stage}: no recovery method carries out {plan.method}")
            started = time.monotonic()
            try:
                recovered = await method.recover(plan, ctx, committed)
            except SourceLost as err:
                logger.warning("recovery of stage %d by %s failed (%s); re-planning", ctx.stage, plan.method, err)
                if err.bad_peer is not None:  # never ask it again: another source, or another plan
                    ctx.distrusted.add(err.bad_peer)
                await asyncio.sleep(0.2)
                continue
            if plan.method in LOSSY and (exact := await self._exact_after_all()) is not None:
                # the view the plan was made from missed an exact state (records arrive late under load): a
                # lossy rebuild would set the model back for nothing
                logger.warning("stage %d: %s would be lossy, but %s is possible now; re-planning", ctx.stage,
                               plan.method, exact.method)  # fmt: skip
                continue
            self.seat.runtime = recovered.runtime
            if recovered.report:
                self._record(plan.method, plan.sources, recovered, started, claimed_at)
            return recovered
        raise asyncio.CancelledError

    async def _plan(self) -> tuple[RecoveryPlan, int]:
        """(the plan for this stage from a fresh view of the swarm, the swarm's committed step)."""
        ctx, presence = self.ctx, self.ctx.presence
        await presence.try_refresh(max_age=FRESH_VIEW_SECONDS)  # a spare that just claimed the stage read it
        others = [r for r in presence.members(None) if r.peer_id not in ctx.distrusted]
        me = presence.me
        live = live_stages(others, fingerprint=me.fingerprint, num_stages=me.num_stages)
        committed = presence.committed_known()
        copies = {r.stage: r.replica_step for r in others if r.replica_step is not None and r.stage is not None}
        leaving = frozenset(r.stage for r in others if r.state == StageState.HANDING_OVER and r.stage is not None)
        parked = {
            r.parked_stage: (r.stage, r.parked_step)
            for r in others
            if r.parked_stage is not None and r.parked_step is not None and r.stage is not None
        }
        snapshots: dict[int, tuple[int, int]] = {}
        for r in others:  # the newest snapshot of each stage, and the stage holding it
            for stage, step in r.snapshots if r.stage is not None else ():
                if step > snapshots.get(stage, (None, 0))[1]:
                    snapshots[stage] = (r.stage, step)
        plan = plan_recovery(
            ctx.stage, me.num_stages, live - {ctx.stage}, committed, self.strategy, copies, leaving, parked,
            self.resume_step, served=self.join_served and ctx.stage in live, snapshots=snapshots,
            max_stale=self.snapshot_every,
        )  # fmt: skip
        return plan, committed

    async def _exact_after_all(self) -> RecoveryPlan | None:
        """After a lossy rebuild, before it is installed: a plan from a fresh view that is exact (a handoff,
        a parked state, a replica), if the swarm shows one now."""
        plan, _ = await self._plan()
        return plan if plan.method in EXACT else None

    async def _served_by_another(self) -> bool:
        """Before calling a stage unrecoverable: is it served after all? A view taken just after start can
        miss records (a DHT lookup that found nothing yet), and a served stage's record shows up within one
        record lifetime (2 refresh periods), or a few seconds more when its node or the DHT is slowed down by
        load, so a node never stops the swarm over a stage that is alive."""
        presence = self.ctx.presence
        deadline = time.monotonic() + max(3 * presence.timing.refresh_seconds, UNRECOVERABLE_PATIENCE_SECONDS)
        while not self.stopping.is_set():
            await presence.try_refresh()
            if any(r.stage == self.ctx.stage for r in presence.members()):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(0.5, presence.timing.refresh_seconds))
        return False

    def _record(
        self, method: Method, sources: tuple[int, ...], r: Recovered, started: float, claimed_at: float
    ) -> None:
        """A completed recovery: the DHT record's ``last_recovery``, metrics, the event and a log line."""
        rebuild_seconds = time.monotonic() - started
        self.seat.last_recovery = RecoveryRecord(
            method=method.value, step=r.step, seconds=time.monotonic() - claimed_at, sources=[str(s) for s in sources]
        )
        self.metrics.recoveries.labels(method=method.value).inc()
        self.metrics.recovery_fetched_bytes.inc(r.nbytes)
        self.metrics.rebuild_seconds.observe(rebuild_seconds)
        self.metrics.recovery_seconds.observe(self.seat.last_recovery.seconds)
        self.events.emit(
            RecoveryEvent(
                stage=self.ctx.stage,
                step=r.step,
                method=method.value,
                sources=list(sources),
                source_grad_norms=r.source_grad_norms,
                bytes_fetched=r.nbytes,
                rebuild_seconds=rebuild_seconds,
                fetch_seconds=r.fetch_seconds,
                lr_scale=r.lr_scale,
                stale_steps=r.stale_steps,
            )
        )
        logger.warning(
            "stage %d rebuilt at step %d by %s from %s (%d bytes, %.2fs)",
            self.ctx.stage,
            r.step,
            method.value,
            list(sources),
            r.nbytes,
            rebuild_seconds,
        )
