"""Noticing that this process was frozen (SIGSTOP, a suspended VM, a long swap storm).

A node whose event loop did not run for longer than its DHT record lives was probably found dead by its
neighbours, and the swarm may be rebuilding its stage. For a few refresh periods after such a stall the node
*yields*: it keeps its serving record unannounced, so that its stage looks vacant and the recovery the swarm
started can claim it (a claim by a newer epoch then fences the node). With nobody claiming in time, it
announces itself again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)
STALL_TICK_SECONDS = 0.2  # the watch's sleep: a much longer one means the process was frozen
YIELD_PERIODS = 5  # refresh periods a node back from a stall waits for the claim of its stage


class StallWatch:
    """Measures the event loop's sleeps; a sleep longer than ``record_ttl()`` while ``watched()`` (the node
    holds a stage that can be claimed) starts a yield of ``YIELD_PERIODS`` × ``refresh_seconds()``."""

    def __init__(
        self, record_ttl: Callable[[], float], refresh_seconds: Callable[[], float], watched: Callable[[], bool]
    ) -> None:
        self.record_ttl, self.refresh_seconds, self.watched = record_ttl, refresh_seconds, watched
        self.stalled_at = -math.inf  # when this node last found itself back from a stall

    def yielding(self) -> bool:
        """True for ``YIELD_PERIODS`` refresh periods after a stall."""
        return time.monotonic() - self.stalled_at < YIELD_PERIODS * self.refresh_seconds()

    async def run(self, stopping: asyncio.Event) -> None:
        """Watches until ``stopping``."""
        tick = time.monotonic()
        while not stopping.is_set():
            await asyncio.sleep(STALL_TICK_SECONDS)
            now = time.monotonic()
            if now - tick > self.record_ttl() and self.watched():
                self.stalled_at = now
                logger.warning("this node was frozen for %.1f s: its stage may have been taken over", now - tick)
            tick = now
