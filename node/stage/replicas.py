"""A replica's life while it serves a block stage: keeping up with its co-replicas, and moving where it is
needed (``--placement throughput``).

- :meth:`ReplicaWatch.keep_up`: a replica that lags another replica of its stage (it missed a commit: it
  joined while the stage committed another step, or a commit did not reach it) copies the stage again,
  between steps.
- :meth:`ReplicaWatch.watch_placement`: every two refresh periods, asks :func:`node.stage.placement.move_stage`
  whether this node should leave its stage (to refill a vacant stage, or to lift the slowest stage by a clear
  margin); once three checks in a row name the same move it sets :attr:`ReplicaWatch.moving`, and the daemon
  moves it between steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from node.recovery.methods import RecoveryContext, SourceLost
from node.recovery.planner import Method, RecoveryPlan
from node.recovery.replica import ReplicaCopy, behind
from node.stage.participant import PipelineParticipant
from node.stage.placement import move_stage
from node.stage.presence import Presence
from node.stage.seat import Seat
from node.wire.records import StageState

logger = logging.getLogger(__name__)
MOVE_CHECK_PERIODS = 2  # refresh periods between placement checks
# checks in a row that must name the same move: a record that reached this node late (a peer that has just
# joined a stage, a replica catching up) must not make it leave a stage on a view that is already outdated
MOVE_CONFIRMATIONS = 3


class ReplicaWatch:
    """Runs beside a served block stage (see the module docstring). ``context(stage)`` builds the recovery
    context a copy needs."""

    def __init__(
        self,
        seat: Seat,
        presence: Presence,
        participant: PipelineParticipant,
        context: Callable[[int], RecoveryContext],
        period: float,
    ) -> None:
        self.seat, self.presence, self.participant = seat, presence, participant
        self.context, self.period = context, period
        self.moving = asyncio.Event()
        self.move_to: int | None = None

    async def keep_up(self) -> None:
        """Copies the stage again once this replica has lagged another for two refresh periods."""
        lagging = 0
        while True:
            await asyncio.sleep(self.period)
            rt, stage = self.seat.runtime, self.seat.stage
            if rt is None or stage is None or rt.prepared:
                continue
            lagging = lagging + 1 if behind(stage, rt.committed_step, self.presence.members()) else 0
            if lagging < 2:  # a commit may still be on its way here
                continue
            lagging = 0
            plan = RecoveryPlan(stage, Method.REPLICA, (stage,), "this replica lags the stage's others")
            await self.presence.announce(StageState.JOINING)  # its source serves copies to joiners only
            try:
                recovered = await ReplicaCopy().recover(plan, self.context(stage), rt.committed_step)
            except SourceLost as err:
                logger.warning("could not catch up with stage %d's replicas: %s", stage, err)
                await self.presence.announce(StageState.ONLINE)
                continue
            if self.seat.runtime is rt and self.seat.stage == stage:
                await self.participant.install(recovered.runtime)
                logger.info("replica of stage %d caught up at step %d", stage, recovered.step)
            await self.presence.announce(StageState.ONLINE)

    async def watch_placement(self) -> None:
        """Sets :attr:`moving` (with :attr:`move_to`) once :func:`move_stage` says this node should move."""
        seen: list[int | None] = []
        while not self.moving.is_set():
            await asyncio.sleep(MOVE_CHECK_PERIODS * self.period)
            me = self.presence.record()
            # compared with the others' records as the DHT has them: this node's own, not its live step
            announced = next((r for r in self.presence.view if r.peer_id == me.peer_id), None)
            if announced is not None:
                me = me.model_copy(update={"committed_step": announced.committed_step})
            target = move_stage(self.presence.members(None), me, me.num_stages)
            seen = [*seen, target][-MOVE_CONFIRMATIONS:]
            if target is not None and seen == [target] * MOVE_CONFIRMATIONS:
                logger.warning("leaving stage %s for stage %d, where the swarm needs throughput", me.stage, target)
                self.move_to = target
                self.moving.set()
