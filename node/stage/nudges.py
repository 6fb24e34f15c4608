"""The waiting side of nudges: a heartbeat with ``refresh`` wakes every poll loop of this node at once.

Another node that stores a change this node waits for (a stage handed over, served again, a peer reported
dead) nudges it (``Presence.nudge``). The DHT stays the one source of truth: a nudge only says when to look,
so a lost or forged one costs at most a poll period or one extra read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import grpc

from node.metrics import StageMetrics
from node.wire.records import StageRecord

logger = logging.getLogger(__name__)

NUDGE_MIN_SECONDS = 0.05  # nudges closer together than this are dropped: a peer cannot make us hammer the DHT


class Nudges:
    """Wakes :meth:`pause` on every nudge taken, and remembers whether the view was read since (:attr:`pending`)."""

    def __init__(self, metrics: StageMetrics) -> None:
        self.metrics = metrics
        self.taken = 0  # nudges taken
        self._read = 0  # of those, the ones a completed read of the DHT came after
        self._skipped = 0  # the last nudge a pause returned at once for
        self._last = -math.inf
        self._pauses: set[asyncio.Future] = set()

    def nudged(self) -> bool:
        """Another node says the swarm changed (a heartbeat with ``refresh``): wakes every :meth:`pause`, so
        that its caller re-reads the DHT now. Returns False for a nudge dropped as too soon after the last."""
        now = time.monotonic()
        if now - self._last < NUDGE_MIN_SECONDS:
            self.metrics.nudges.labels(result="dropped").inc()
            return False
        self._last = now
        self.taken += 1
        self.metrics.nudges.labels(result="woke").inc()
        for waiter in self._pauses:
            if not waiter.done():
                waiter.set_result(None)
        return True

    def read(self, taken: int) -> None:
        """A read of the DHT completed that started when ``taken`` nudges had been taken."""
        self._read = max(self._read, taken)

    @property
    def pending(self) -> bool:
        """A nudge came after the start of the last completed read of the DHT: the view may miss a change."""
        return self.taken > self._read

    async def pause(self, seconds: float, stopping: asyncio.Event | None = None) -> None:
        """Sleeps ``seconds``, or less if a nudge comes (or ``stopping`` is set) meanwhile: the poll period of
        every loop that waits for the swarm to change. Returns at once if a nudge came since the last read."""
        if self.pending and self.taken != self._skipped:  # once per nudge: a DHT that fails every read must
            self._skipped = self.taken  # not turn a poll into a busy loop
            return
        waiter = asyncio.get_running_loop().create_future()
        self._pauses.add(waiter)
        waits = [waiter] if stopping is None else [waiter, asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pauses.discard(waiter)
            for w in waits:
                w.cancel()


async def send_nudges(channels: Any, request: Any, peers: Iterable[StageRecord], timeout: float) -> None:
    """Sends the nudge ``request`` (a heartbeat with ``refresh``) to each of ``peers`` once, concurrently, through
    ``channels`` (a ``ChannelPool``); a peer that does not answer is only logged."""

    async def one(peer: StageRecord) -> None:
        try:
            await channels.stub(peer).Heartbeat(request, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            logger.debug("could not nudge %s: %s", peer.peer_id, err.code().name)

    targets = {p.peer_id: p for p in peers if p.grpc_address}
    await asyncio.gather(*(one(p) for p in targets.values()))
