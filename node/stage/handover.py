"""The leaving side of a handoff: a preempted node gives its stage's exact state to a successor.

On a hard notice the daemon stops taking steps (stage 0's driver finishes the step in flight; a block stage
refuses ``Prepare`` from then on) and hands over:

1. the seat is marked ``handing_over`` and the node announces its stage ``handing_over``: spares see the stage
   vacant and claim it as they claim any vacant stage (lowest peer id wins), and stage 0 stops sending it
   new work;
2. the winner plans ``handoff`` and fetches the full state with ``FetchWeights(full_state=True)``; the service
   serves it once no prepared step waits for its commit or abort;
3. the successor serves the stage under a newer claim epoch; this node sees that claim (it is fenced in)
   and stops serving.

If nobody takes the stage before the notice runs out (less a margin for a clean exit), the node gives up and
exits like any clean exit: the swarm then recovers the stage as from a death (CheckFree, or a checkpoint).
The daemon acknowledges the notice (Azure) and exits 0 either way.
"""

from __future__ import annotations

import asyncio
import logging
import time

from node.events import EventLog, HandedOverEvent
from node.metrics import StageMetrics
from node.preemption.notice import Notice
from node.stage.presence import Presence
from node.stage.seat import Seat
from node.wire.records import StageRecord, StageState

logger = logging.getLogger(__name__)
EXIT_MARGIN_SECONDS = 3.0  # left of the notice for the clean exit (announce offline, stop serving)
POLL_SECONDS = 0.2


class Handover:
    """Hands ``seat``'s stage over to a successor (see the module docstring)."""

    def __init__(self, seat: Seat, presence: Presence, metrics: StageMetrics, events: EventLog) -> None:
        self.seat, self.presence, self.metrics, self.events = seat, presence, metrics, events

    async def run(self, notice: Notice, stopping: asyncio.Event) -> StageRecord | None:
        """Returns the successor's record once it serves the stage, or None when the notice ran out first."""
        seat, presence = self.seat, self.presence
        stage = seat.stage
        assert stage is not None and seat.runtime is not None
        seat.handing_over = True
        await presence.announce(StageState.HANDING_OVER)
        window = max(0.0, notice.seconds_left() - EXIT_MARGIN_SECONDS)
        logger.warning(
            "%s notice (%s): handing stage %d over at step %d; %.0f s to find a successor",
            notice.provider, notice.kind, stage, seat.committed_step, window,
        )  # fmt: skip
        deadline = time.monotonic() + window
        successor = None
        while not stopping.is_set() and time.monotonic() < deadline:
            await presence.try_refresh()
            successor = presence.newer_claim()  # a serving record of this stage by a newer epoch
            if successor is not None:
                break
            await asyncio.sleep(POLL_SECONDS)
        seconds = time.time() - notice.received
        if successor is None and stopping.is_set():  # told to stop at once (a second signal): no handover
            logger.warning("stopping before anyone took stage %d", stage)
            return None
        self.metrics.handoffs.labels(result="handed_over" if successor else "missed_deadline").inc()
        if successor is not None:
            self.metrics.handoff_seconds.observe(seconds)
            logger.warning("stage %d handed over to %s in %.1f s", stage, successor.peer_id, seconds)
        else:
            logger.warning("nobody took stage %d within the notice; leaving it to recovery", stage)
        self.events.emit(
            HandedOverEvent(
                stage=stage,
                step=seat.committed_step,
                to=successor.peer_id if successor else None,
                seconds=seconds,
            )
        )
        return successor
