"""DHT records: what a stage daemon announces about itself, with explicit (de)serialization.

All stages of a swarm live under one DHT key, ``swarm-node:<swarm>:stages``, one subkey per peer, so one
lookup returns the whole swarm. Every record expires about twice its refresh period after it was stored;
a record that fails validation is ignored by readers (and counted), never trusted.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


class RecordError(ValueError):
    """A DHT record that does not parse or validate."""


class StageState(enum.StrEnum):
    JOINING = "joining"  # started, not yet serving the swarm
    ONLINE = "online"  # serving and training
    WAITING = "waiting"  # alive but blocked on a missing neighbour
    RECOVERING = "recovering"  # rebuilding its weights
    SPARE = "spare"  # a replacement node waiting for a vacant stage
    OFFLINE = "offline"  # exited cleanly


SERVING_STATES = frozenset({StageState.ONLINE, StageState.WAITING})  # a peer that takes the swarm's traffic


class RecoveryRecord(BaseModel):
    """The last recovery a stage went through, as shown by ``status``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(min_length=1, max_length=32)
    step: int = Field(ge=0)
    seconds: float = Field(ge=0)
    sources: list[str] = Field(default_factory=list, max_length=8)


class StageRecord(BaseModel):
    """A stage daemon's announcement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: int | None = Field(ge=0, le=4096)  # None while a spare waits for a vacant stage
    num_stages: int = Field(ge=2, le=4096)
    peer_id: str = Field(min_length=1, max_length=128)
    grpc_address: str = Field(max_length=300)
    state: StageState
    committed_step: int = Field(ge=0)
    config_fingerprint: str = Field(min_length=1, max_length=64)
    version: str = Field(max_length=32)
    host: str = Field("", max_length=255)
    pid: int | None = Field(None, ge=1)
    metrics_port: int | None = Field(None, ge=1, le=65535)
    last_recovery: RecoveryRecord | None = None
    swap_partner: int | None = Field(None, ge=1, le=4096)  # checkfree+: the stage this one swaps with
    replica_step: int | None = Field(None, ge=0)  # checkfree+: newest copy of stage 0 held here

    def model_post_init(self, _context: Any) -> None:
        if self.state == StageState.SPARE and self.stage is not None:
            raise ValueError("a spare record has no stage")
        if self.stage is None and self.state not in (StageState.SPARE, StageState.OFFLINE):
            raise ValueError(f"a {self.state.value} record needs a stage")
        if self.stage is not None and self.stage >= self.num_stages:
            raise ValueError(f"stage {self.stage} >= num_stages {self.num_stages}")
        m = _ADDRESS.match(self.grpc_address)
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"grpc_address {self.grpc_address!r} is not host:port")

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict for the DHT."""
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, value: Any) -> StageRecord:
        """Parses a DHT value; raises :class:`RecordError` with the first problem."""
        if not isinstance(value, dict):
            raise RecordError(f"record is {type(value).__name__}, not a mapping")
        try:
            return cls.model_validate(value)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            raise RecordError(f"{where}: {first['msg']}") from None


def same_swarm(
    records: Iterable[StageRecord],
    *,
    fingerprint: str,
    num_stages: int,
    states: frozenset[StageState] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> list[StageRecord]:
    """The records of this swarm's configuration (and of ``states``, if given), without the peers in
    ``exclude`` (this node itself, peers under suspicion)."""
    return [
        r
        for r in records
        if r.config_fingerprint == fingerprint
        and r.num_stages == num_stages
        and (states is None or r.state in states)
        and r.peer_id not in exclude
    ]


def stages_key(swarm: str) -> str:
    """The DHT key holding every stage record of swarm ``swarm``."""
    return f"swarm-node:{swarm}:stages"


def parse_stage_records(raw: Any) -> tuple[list[StageRecord], int]:
    """Parses the value of :func:`stages_key` as returned by ``DHT.get(latest=True)``.

    Returns (valid records, count of malformed ones). ``raw`` is the DHT's ValueWithExpiration whose
    value maps subkey → ValueWithExpiration(record dict); anything else counts as malformed.
    """
    if raw is None:
        return [], 0
    entries = getattr(raw, "value", raw)
    if not isinstance(entries, dict):
        return [], 1
    records, bad = [], 0
    for subkey, item in entries.items():
        try:
            rec = StageRecord.from_wire(getattr(item, "value", item))
            if subkey != rec.peer_id:
                raise RecordError(f"subkey {subkey!r} does not match peer_id {rec.peer_id!r}")
            records.append(rec)
        except RecordError:
            bad += 1
    records.sort(key=lambda r: (-1 if r.stage is None else r.stage, r.peer_id))
    return records, bad
