"""DHT records: what a stage daemon announces about itself, with explicit (de)serialization.

All stages of a swarm live under one DHT key, ``swarm-node:<swarm>:stages``, one subkey per peer, so one
lookup returns the whole swarm. Every record expires about twice its refresh period after it was stored;
a record that fails validation is ignored by readers (and counted), never trusted.

Suspicions live under ``swarm-node:<swarm>:suspicions``: one subkey per (observer, dead peer), written by the
observer and expiring on their own.

Two shapes of subkey: without credentials (insecure) a record's subkey is its peer id (a suspicion's is
``observer/dead``); with credentials it is the owner's ``[owner:<OpenSSH key>]`` (a suspicion's is
``[owner:...]/dead``), the record is signed with that key and carries the owner's certificate (``cert``),
which :mod:`node.dht.auth` checks.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_STEP = 2**40  # no swarm commits more steps; a record claiming more is forged or broken
StageNumber = Annotated[int, Field(ge=0, le=4096, strict=True)]
SnapshotStep = Annotated[int, Field(ge=1, le=MAX_STEP, strict=True)]
MAX_EPOCH = 2**62
MAX_CERT = 4096  # bytes of a DER node certificate (about 0.8 kB in practice)
_R = TypeVar("_R", bound=BaseModel)
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


class RecordError(ValueError):
    """A DHT record that does not parse or validate."""


class StageState(enum.StrEnum):
    JOINING = "joining"  # started, not yet serving the swarm
    ONLINE = "online"  # serving and training
    WAITING = "waiting"  # alive but blocked on a missing neighbour
    RECOVERING = "recovering"  # rebuilding its weights
    SPARE = "spare"  # a replacement node waiting for a vacant stage
    HANDING_OVER = "handing_over"  # preempted: takes no new steps, hands its exact state to a successor
    OFFLINE = "offline"  # exited cleanly


SERVING_STATES = frozenset({StageState.ONLINE, StageState.WAITING})  # a peer that takes the swarm's traffic


class RecoveryRecord(BaseModel):
    """The last recovery a stage went through, as shown by ``status``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field(min_length=1, max_length=32)
    step: int = Field(ge=0, le=MAX_STEP, strict=True)
    seconds: float = Field(ge=0, le=1e9, allow_inf_nan=False)
    sources: list[str] = Field(default_factory=list, max_length=8)


def _node_defaults_to(field: str) -> Callable[[Any], Any]:
    """A before-validator: a record built without ``node`` names its node by ``field`` (insecure mode)."""

    def fill(data: Any) -> Any:
        if isinstance(data, dict) and not data.get("node") and isinstance(data.get(field), str):
            return {**data, "node": data[field]}
        return data

    return fill


class StageRecord(BaseModel):
    """A stage daemon's announcement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: int | None = Field(ge=0, le=4096, strict=True)  # None while a spare waits for a vacant stage
    num_stages: int = Field(ge=2, le=4096, strict=True)
    peer_id: str = Field(min_length=1, max_length=128)
    grpc_address: str = Field(max_length=300)
    state: StageState
    committed_step: int = Field(ge=0, le=MAX_STEP, strict=True)
    config_fingerprint: str = Field(min_length=1, max_length=64)
    version: str = Field(max_length=32)
    host: str = Field("", max_length=255)
    pid: int | None = Field(None, ge=1, le=2**31, strict=True)
    metrics_port: int | None = Field(None, ge=1, le=65535, strict=True)
    last_recovery: RecoveryRecord | None = None
    swap_partner: int | None = Field(None, ge=1, le=4096, strict=True)  # checkfree+: the stage this one swaps with
    replica_step: int | None = Field(None, ge=0, le=MAX_STEP, strict=True)  # checkfree+: newest stage-0 copy held
    # the full state a preempted neighbour left here (no successor in time), and its committed step
    parked_stage: int | None = Field(None, ge=0, le=4096, strict=True)
    parked_step: int | None = Field(None, ge=0, le=MAX_STEP, strict=True)
    # --recovery ladder: the neighbour snapshots held here, as (stage, committed step) pairs
    snapshots: list[tuple[StageNumber, SnapshotStep]] = Field(default_factory=list, max_length=4)
    # a soft preemption notice (rebalance recommendation, live migration) is active: spares stand by for the stage
    soft_notice: bool = Field(False, strict=True)
    # handing over: the spare this node names to take its stage (it claims at once, with no rivals to wait for)
    successor: str | None = Field(None, min_length=1, max_length=128)
    # microbatches per second this peer computes (forward and backward), measured: stage 0 routes by it
    throughput: float | None = Field(None, ge=0, le=1e9, allow_inf_nan=False)
    # the node's name: its certificate's CN with credentials, else its peer id (the default)
    node: str = Field("", min_length=1, max_length=128)
    cert: bytes | None = Field(None, max_length=MAX_CERT, strict=True)  # the node certificate (DER), with credentials
    # the claim this node holds its stage by: each claim of a stage takes a higher epoch, and a peer that sees a
    # higher epoch for its own stage stops serving it (fencing)
    epoch: int = Field(0, ge=0, le=MAX_EPOCH, strict=True)

    _fill_node = model_validator(mode="before")(_node_defaults_to("peer_id"))

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
        """A msgpack-friendly dict for the DHT (the certificate stays bytes)."""
        return _to_wire(self)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict for people (``status --json``): the wire dict without the certificate."""
        return self.model_dump(mode="json", exclude={"cert"})

    @classmethod
    def from_wire(cls, value: Any) -> StageRecord:
        """Parses a DHT value; raises :class:`RecordError` with the first problem."""
        return _from_wire(cls, value)


class SuspicionRecord(BaseModel):
    """An observer's claim that peer ``dead`` stopped answering; it expires on its own (the DHT's expiry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    observer: str = Field(min_length=1, max_length=128)  # the observer's peer id
    dead: str = Field(min_length=1, max_length=128)  # the suspected peer's id
    node: str = Field("", min_length=1, max_length=128)  # the observer's node name (as in StageRecord)
    cert: bytes | None = Field(None, max_length=MAX_CERT, strict=True)  # the observer's certificate (DER)

    _fill_node = model_validator(mode="before")(_node_defaults_to("observer"))

    def to_wire(self) -> dict[str, Any]:
        return _to_wire(self)

    @classmethod
    def from_wire(cls, value: Any) -> SuspicionRecord:
        return _from_wire(cls, value)


def _to_wire(record: BaseModel) -> dict[str, Any]:
    wire = record.model_dump(mode="json", exclude={"cert"})
    wire["cert"] = getattr(record, "cert", None)
    return wire


def _from_wire(cls: type[_R], value: Any) -> _R:
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


CLAIMING_STATES = frozenset({StageState.JOINING, StageState.RECOVERING})  # taking a stage, not serving it yet
HOLDING_STATES = SERVING_STATES | CLAIMING_STATES  # a record that claims a stage
# a record whose node speaks for its stage: a node handing its stage over still does (it finishes the step in
# flight) until its successor serves by a newer epoch
SPEAKING_STATES = HOLDING_STATES | {StageState.HANDING_OVER}


def current_epochs(records: Iterable[StageRecord]) -> dict[int, int]:
    """Stage -> the highest epoch a serving record holds it by: the current owner's claim (a claim still
    being rebuilt does not count until it serves: it may yet back off)."""
    out: dict[int, int] = {}
    for r in records:
        if r.stage is not None and r.state in SERVING_STATES:
            out[r.stage] = max(out.get(r.stage, 0), r.epoch)
    return out


def next_epoch(records: Iterable[StageRecord], stage: int, now_ms: int) -> int:
    """The epoch of a new claim of ``stage``: above every claim seen, and at least the wall clock in ms (so
    it outranks a claim whose record has already expired from the DHT, as attempts do)."""
    seen = max((r.epoch for r in records if r.stage == stage), default=0)
    return min(MAX_EPOCH, max(seen + 1, now_ms))


def stages_key(swarm: str) -> str:
    """The DHT key holding every stage record of swarm ``swarm``."""
    return f"swarm-node:{swarm}:stages"


def suspicions_key(swarm: str) -> str:
    """The DHT key holding every suspicion record of swarm ``swarm``."""
    return f"swarm-node:{swarm}:suspicions"


# ---- subkeys ---------------------------------------------------------------------------------------
_OWNER = re.compile(rb"\[owner:(ssh-rsa [A-Za-z0-9+/=]{1,2048})\](?:/([A-Za-z0-9._-]{1,128}))?")
SubkeyCheck = Callable[[Any, "StageRecord | SuspicionRecord"], None]


def owner_subkey(public_key: bytes, dead: str | None = None) -> bytes:
    """The signed subkey of a record owned by OpenSSH RSA key ``public_key`` (hivemind's ``[owner:...]``
    marker, which its ``RSASignatureValidator`` looks for); a suspicion appends ``/dead``."""
    subkey = b"[owner:" + public_key + b"]"
    return subkey if dead is None else subkey + b"/" + dead.encode()


def split_owner_subkey(subkey: Any) -> tuple[bytes, str | None]:
    """(owner's OpenSSH key, suspected peer or None) of a signed subkey; :class:`RecordError` otherwise."""
    m = _OWNER.fullmatch(subkey) if isinstance(subkey, bytes) else None
    if m is None:
        raise RecordError("subkey is not [owner:<ssh-rsa key>] (/dead)")
    return m.group(1), None if m.group(2) is None else m.group(2).decode()


def insecure_subkey(record: StageRecord | SuspicionRecord) -> str:
    """The subkey of ``record`` without credentials: its peer id (a suspicion: ``observer/dead``)."""
    return record.peer_id if isinstance(record, StageRecord) else f"{record.observer}/{record.dead}"


def check_insecure_subkey(subkey: Any, record: StageRecord | SuspicionRecord) -> None:
    if subkey != insecure_subkey(record):
        raise RecordError(f"subkey {subkey!r} does not match the record ({insecure_subkey(record)!r})")


def _entries(raw: Any, now: float | None) -> tuple[list[tuple[Any, Any]], int]:
    """(subkey, value) of each unexpired entry of a ``DHT.get(latest=True)`` result, and 1 if it was no
    dictionary at all."""
    if raw is None:
        return [], 0
    entries = getattr(raw, "value", raw)
    if not isinstance(entries, dict):
        return [], 1
    out = []
    for subkey, item in entries.items():
        expires = getattr(item, "expiration_time", None)
        if now is not None and expires is not None and expires <= now:
            continue
        out.append((subkey, getattr(item, "value", item)))
    return out, 0


def parse_stage_records(
    raw: Any, check: SubkeyCheck = check_insecure_subkey, now: float | None = None
) -> tuple[list[StageRecord], int]:
    """Parses the value of :func:`stages_key` as returned by ``DHT.get(latest=True)``.

    Returns (valid records, count of malformed ones). ``raw`` is the DHT's ValueWithExpiration whose
    value maps subkey → ValueWithExpiration(record dict); anything else counts as malformed. ``check``
    raises :class:`RecordError` when a record does not belong under its subkey (by default the insecure
    shape: subkey = peer id); entries that expired by DHT time ``now`` (if given) are left out.
    """
    entries, bad = _entries(raw, now)
    records = []
    for subkey, value in entries:
        try:
            rec = StageRecord.from_wire(value)
            check(subkey, rec)
            records.append(rec)
        except RecordError:
            bad += 1
    records.sort(key=lambda r: (-1 if r.stage is None else r.stage, r.peer_id))
    return records, bad


def parse_suspicions(
    raw: Any, check: SubkeyCheck = check_insecure_subkey, now: float | None = None
) -> tuple[dict[str, set[str]], int]:
    """Parses the value of :func:`suspicions_key`: (dead peer id -> observer peer ids, malformed count)."""
    entries, bad = _entries(raw, now)
    dead: dict[str, set[str]] = {}
    for subkey, value in entries:
        try:
            rec = SuspicionRecord.from_wire(value)
            check(subkey, rec)
        except RecordError:
            bad += 1
            continue
        dead.setdefault(rec.dead, set()).add(rec.observer)
    return dead, bad
