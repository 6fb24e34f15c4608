"""Announcing a stage in the DHT and reading the swarm back; peer choice is a pure function."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import hivemind
from hivemind.utils import get_dht_time

from node.wire.records import SERVING_STATES, StageRecord, parse_stage_records, same_swarm, stages_key

logger = logging.getLogger(__name__)

class SwarmDirectory:
    """Blocking DHT access for one swarm (run it off the event loop)."""

    def __init__(self, dht: hivemind.DHT, swarm: str) -> None:
        self.dht = dht
        self.key = stages_key(swarm)
        self.malformed_seen = 0

    def announce(self, record: StageRecord, ttl: float) -> bool:
        """Stores ``record`` under the swarm key; it expires ``ttl`` seconds from now."""
        return bool(self.dht.store(self.key, record.to_wire(), get_dht_time() + ttl, subkey=record.peer_id))

    def records(self) -> list[StageRecord]:
        """Every valid, unexpired stage record of the swarm; malformed ones are counted and skipped."""
        raw = self.dht.get(self.key, latest=True)
        records, bad = parse_stage_records(raw)
        if bad:
            self.malformed_seen += bad
            logger.warning("ignored %d malformed stage record(s) in the DHT", bad)
        return records


def pick_peer(
    records: Iterable[StageRecord],
    stage: int,
    *,
    fingerprint: str,
    num_stages: int,
    exclude: frozenset[str] = frozenset(),
) -> StageRecord | None:
    """The peer to talk to for ``stage``: serving, same config, most committed steps, then lowest peer id."""
    candidates = [
        r
        for r in same_swarm(
            records, fingerprint=fingerprint, num_stages=num_stages, states=SERVING_STATES, exclude=exclude
        )
        if r.stage == stage
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (-r.committed_step, r.peer_id))
