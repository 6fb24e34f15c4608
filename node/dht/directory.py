"""Announcing a stage in the DHT and reading the swarm back; peer choice is a pure function."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import hivemind
from cryptography.hazmat.primitives import serialization
from hivemind.utils import get_dht_time

from node.dht.auth import CertBinding, openssh, peer_id_of
from node.security.keys import NodeCredentials
from node.wire.records import (
    SERVING_STATES,
    SPEAKING_STATES,
    StageRecord,
    StageState,
    SubkeyCheck,
    SuspicionRecord,
    check_insecure_subkey,
    current_epochs,
    insecure_subkey,
    owner_subkey,
    parse_stage_records,
    parse_suspicions,
    same_swarm,
    stages_key,
    suspicions_key,
)

logger = logging.getLogger(__name__)


class SwarmDirectory:
    """Blocking DHT access for one swarm (run it off the event loop).

    Without ``credentials`` records are unsigned and keyed by peer id (insecure mode). With them, this node's
    records carry its name and certificate and are stored under its ``[owner:...]`` subkey, so the DHT signs
    them; it can store its own records only, and reads back only records bound to swarm certificates
    (checked by the DHT's validators and again here).
    """

    def __init__(self, dht: hivemind.DHT, swarm: str, credentials: NodeCredentials | None = None) -> None:
        self.dht = dht
        self.key = stages_key(swarm)
        self.suspicions_key = suspicions_key(swarm)
        self.credentials = credentials
        self.malformed_seen = 0
        self._lock = threading.Lock()
        self._check: SubkeyCheck = check_insecure_subkey
        self._owner, self._peer_id, self._cert_der = b"", "", b""
        if credentials is not None:
            self._check = CertBinding(credentials.ca_pem).check
            key = credentials.certificate.public_key()
            self._owner = openssh(key)  # type: ignore[arg-type]  # node keys are RSA (NodeCredentials.load)
            self._peer_id = peer_id_of(key)  # type: ignore[arg-type]
            self._cert_der = credentials.certificate.public_bytes(serialization.Encoding.DER)

    # ---- writing ----------------------------------------------------------------------------------------
    def announce(self, record: StageRecord, ttl: float) -> bool:
        """Stores ``record`` under the swarm key; it expires ``ttl`` seconds from now. With credentials only this
        node's own record can be stored (another peer's is refused here: False); it gets this node's name and
        certificate."""
        if self.credentials is None:
            return self._store(self.key, record.to_wire(), insecure_subkey(record), ttl)
        if record.peer_id != self._peer_id:
            logger.debug("not storing the record of peer %s: this node may store its own only", record.peer_id)
            return False
        record = record.model_copy(update={"node": self.credentials.name, "cert": self._cert_der})
        return self._store(self.key, record.to_wire(), owner_subkey(self._owner), ttl)

    def report_dead(self, observer: StageRecord, dead_peer_id: str, ttl: float) -> bool:
        """Publishes ``observer``'s suspicion that ``dead_peer_id`` is dead, for ``ttl`` seconds (one subkey per
        observer and dead peer, so it expires on its own). With credentials the observer must be this node."""
        if self.credentials is None:
            claim = SuspicionRecord(observer=observer.peer_id, dead=dead_peer_id)
            return self._store(self.suspicions_key, claim.to_wire(), insecure_subkey(claim), ttl)
        if observer.peer_id != self._peer_id:
            logger.debug("not reporting for peer %s: this node reports its own suspicions only", observer.peer_id)
            return False
        claim = SuspicionRecord(
            observer=self._peer_id, dead=dead_peer_id, node=self.credentials.name, cert=self._cert_der
        )
        return self._store(self.suspicions_key, claim.to_wire(), owner_subkey(self._owner, dead_peer_id), ttl)

    def _store(self, key: str, value: dict[str, Any], subkey: Any, ttl: float) -> bool:
        return bool(self.dht.store(key, value, get_dht_time() + ttl, subkey=subkey))

    # ---- reading ----------------------------------------------------------------------------------------
    def records(self) -> list[StageRecord]:
        """Every valid, unexpired stage record of the swarm; malformed ones are counted and skipped."""
        return self._stage_records(self.dht.get(self.key, latest=True))

    def suspicions(self) -> dict[str, set[str]]:
        """Unexpired suspicions: dead peer id -> the peer ids of the observers that report it."""
        return self._suspicions(self.dht.get(self.suspicions_key, latest=True))

    def records_and_suspicions(self) -> tuple[list[StageRecord], dict[str, set[str]]]:
        """:meth:`records` and :meth:`suspicions` with both DHT lookups in flight at once."""
        stages = self.dht.get(self.key, latest=True, return_future=True)
        claims = self.dht.get(self.suspicions_key, latest=True, return_future=True)
        return self._stage_records(stages.result()), self._suspicions(claims.result())

    def _stage_records(self, raw: Any) -> list[StageRecord]:
        records, bad = parse_stage_records(raw, self._check, now=get_dht_time())
        self._count_malformed(bad, "stage record")
        return records

    def _suspicions(self, raw: Any) -> dict[str, set[str]]:
        claims, bad = parse_suspicions(raw, self._check, now=get_dht_time())
        self._count_malformed(bad, "suspicion record")
        return claims

    def _count_malformed(self, bad: int, what: str) -> None:
        if bad:
            with self._lock:
                self.malformed_seen += bad
            logger.warning("ignored %d malformed %s(s) in the DHT", bad, what)

    @property
    def own_peer_id(self) -> str | None:
        """With credentials, the only peer id this node may write records for (its key's); else None."""
        return self._peer_id if self.credentials is not None else None


def pick_peer(
    records: Iterable[StageRecord],
    stage: int,
    *,
    fingerprint: str,
    num_stages: int,
    exclude: frozenset[str] = frozenset(),
) -> StageRecord | None:
    """The peer to talk to for ``stage``: serving, same config, the current claim (highest epoch), most
    committed steps, then lowest peer id."""
    candidates = [
        r
        for r in same_swarm(
            records, fingerprint=fingerprint, num_stages=num_stages, states=SERVING_STATES, exclude=exclude
        )
        if r.stage == stage
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (-r.epoch, -r.committed_step, r.peer_id))


def route_peer(records: Iterable[StageRecord], peer_id: str, stage: int) -> tuple[StageRecord | None, bool]:
    """In ``records`` (one swarm's): (``peer_id``'s record, if it takes ``stage``'s traffic: serving it, or handing
    it over and finishing the step in flight; whether it is *gone* for this step: offline, holding another stage
    (a replica that moved), or fenced off by a newer claim of ``stage`` that serves). (None, False): not there
    yet, e.g. a view that still shows it as the spare it was a moment ago: wait for it."""
    records = list(records)
    record = next((r for r in records if r.peer_id == peer_id), None)
    if record is None or record.stage is None:
        return None, False
    if record.stage != stage or record.state not in SPEAKING_STATES:
        return None, record.stage != stage or record.state == StageState.OFFLINE
    if record.epoch < current_epochs(records).get(stage, 0):
        return None, True
    return record, False
