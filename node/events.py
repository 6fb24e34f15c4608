"""Every event a daemon (or ``swarm-node local``) writes to ``--events-file``, as typed models.

An events file is JSON lines, one event per line, each with ``event`` (its kind), ``time`` (Unix seconds)
and ``pid`` (the writer). Daemons sharing one file append whole lines with one ``O_APPEND`` write each, so
lines never mix. Readers (``local``, ``bench``, the tests) parse lines back into these models with
:func:`read_events`; a line that does not parse is skipped and counted, never trusted.

``python -m node.events`` prints the table of events and fields that the README shows;
``python -m node.events --write-readme`` puts it into README.md between its ``events`` markers.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Iterable
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

logger = logging.getLogger(__name__)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    time: float = Field(default_factory=time.time, description="Unix time it was written")
    pid: int = Field(default_factory=os.getpid, description="process that wrote it")


class AttemptEvent(_Event):
    """Stage 0 starts an attempt at a step (a replay is a new attempt of the same step)."""

    event: Literal["attempt"] = "attempt"
    step: int = Field(description="the step being attempted, counted from 1")
    attempt: int


class StepEvent(_Event):
    """Stage 0 committed a step on every stage."""

    event: Literal["step"] = "step"
    step: int = Field(description="committed step, counted from 1")
    loss: float = Field(description="mean training loss of the step's microbatches")
    seconds: float = Field(description="from the attempt's start to the commit")
    prepare_seconds: float | None = Field(
        None, description="of which the prepare round (with several replicas: their partial-gradient exchange)"
    )
    tokens: int
    attempt: int
    grad_norm: float = Field(description="global gradient norm before clipping")
    stage_grad_norms: list[float] = Field(description="each stage's gradient norm before clipping")
    assignment: dict[str, list[list[int]]] | None = Field(
        None, description="stages served by several replicas: each replica's microbatches, in summation order"
    )


class AbortEvent(_Event):
    """Stage 0 aborted an attempt; the step is replayed with a higher attempt on the same data."""

    event: Literal["abort"] = "abort"
    step: int = Field(description="committed step the aborted attempt started from")
    attempt: int
    reason: str


class DoneEvent(_Event):
    """Stage 0 reached ``--steps``."""

    event: Literal["done"] = "done"
    step: int


class FailureDetectedEvent(_Event):
    """A node found a peer dead (a failed RPC or heartbeat)."""

    event: Literal["failure_detected"] = "failure_detected"
    stage: int | None = Field(description="the dead peer's stage")
    peer: str = Field(description="the dead peer's id")
    by: int | None = Field(description="the stage that noticed")
    why: str


class RecoveryEvent(_Event):
    """A node took over a stage; ``method`` says how its state was rebuilt."""

    event: Literal["recovery"] = "recovery"
    stage: int
    step: int = Field(description="committed step the rebuilt stage starts from")
    method: str = Field(description="a planner method: fresh, checkfree, copy, random, partner_copy, "
                        "embedding_replica, checkpoint, handoff, resume, replica, snapshot")
    sources: list[int] = Field(description="stages whose state was fetched")
    source_grad_norms: list[float]
    bytes_fetched: int
    rebuild_seconds: float
    fetch_seconds: float
    lr_scale: float = Field(description="learning-rate multiplier of the rebuilt stage's optimizer")
    stale_steps: int = Field(
        0, description="a parked state or a neighbour snapshot: steps the swarm committed since it was taken"
    )


class UnrecoverableEvent(_Event):
    """A stage cannot be rebuilt with the chosen strategy; training stops."""

    event: Literal["unrecoverable"] = "unrecoverable"
    stage: int | None
    reason: str


class FencedEvent(_Event):
    """A node saw its stage claimed by a newer epoch (it had been declared dead) and stopped serving it."""

    event: Literal["fenced"] = "fenced"
    stage: int
    epoch: int = Field(description="the claim this node held the stage by")
    by: str = Field(description="the peer that holds the stage now")
    by_epoch: int


class NoticeEvent(_Event):
    """A preemption notice: from the cloud's metadata service, or a SIGTERM/SIGINT."""

    event: Literal["notice"] = "notice"
    stage: int | None = Field(description="None: a spare")
    provider: str = Field(description="aws, gcp, azure or signal")
    kind: str = Field(description="terminate (the machine goes) or rebalance (a warning)")
    seconds_left: float = Field(description="until the machine goes, as the notice says")


class HandedOverEvent(_Event):
    """A preempted node handed its stage over and stopped serving it (``to`` None: nobody took it in time)."""

    event: Literal["handed_over"] = "handed_over"
    stage: int
    step: int = Field(description="committed step of the state handed over")
    to: str | None = Field(description="the successor's peer id")
    to_replica: bool = Field(False, description="the successor is another replica of the stage: no state moved")
    parked_on: int | None = Field(None, description="no successor in time: the neighbour stage given the state")
    seconds: float = Field(description="from the notice to the successor serving (or giving up)")


class CheckpointEvent(_Event):
    """A checkpoint became durable (``--recovery checkpoint``)."""

    event: Literal["checkpoint"] = "checkpoint"
    stage: int
    step: int
    write_seconds: float
    bytes: int


class SnapshotEvent(_Event):
    """Stage 0 sealed a swarm snapshot (``--snapshot-to``): every stage's part of this step is durable."""

    event: Literal["snapshot"] = "snapshot"
    step: int
    bytes: int = Field(description="all stages' parts together")
    seconds: float = Field(description="from stage 0's commit to the sealed manifest")


class NeighbourSnapshotEvent(_Event):
    """A stage's neighbour snapshot is held by its snapshot holder (``--recovery ladder``)."""

    event: Literal["neighbour_snapshot"] = "neighbour_snapshot"
    stage: int
    step: int
    holder: int = Field(description="the stage that holds it")
    bytes: int
    seconds: float = Field(description="from the commit to the holder's acknowledgement")


class CheckpointSnapshotEvent(_Event):
    """A stage copied its state to host memory for a checkpoint (the part that blocks training)."""

    event: Literal["checkpoint_snapshot"] = "checkpoint_snapshot"
    stage: int
    step: int
    seconds: float


class RollbackStartEvent(_Event):
    """Stage 0 starts rolling the swarm back to the newest checkpoint every stage has."""

    event: Literal["rollback_start"] = "rollback_start"
    step: int = Field(description="the common checkpoint step")
    from_step: int


class RollbackEvent(_Event):
    """One stage restored its checkpoint of ``step``."""

    event: Literal["rollback"] = "rollback"
    stage: int
    step: int
    from_step: int
    attempt: int


class RolledBackEvent(_Event):
    """Every stage rolled back; training resumes from ``step``."""

    event: Literal["rolled_back"] = "rolled_back"
    step: int
    attempt: int


class EvalEvent(_Event):
    """Stage 0 measured the validation loss of the committed weights."""

    event: Literal["eval"] = "eval"
    step: int
    val_loss: float
    seconds: float


class KilledEvent(_Event):
    """Fault injection: a node is about to be SIGKILLed (by itself, ``phase``; or by ``local``, ``by``)."""

    event: Literal["killed"] = "killed"
    stage: int | None = Field(description="None: an idle spare")
    step: int
    phase: str | None = Field(None, description="forward, backward or fetch: the daemon killed itself there")
    by: str | None = Field(None, description="start, failure-rate or spare: local killed it")


Event = Annotated[
    AttemptEvent
    | StepEvent
    | AbortEvent
    | DoneEvent
    | FailureDetectedEvent
    | RecoveryEvent
    | UnrecoverableEvent
    | FencedEvent
    | NoticeEvent
    | HandedOverEvent
    | CheckpointEvent
    | SnapshotEvent
    | CheckpointSnapshotEvent
    | NeighbourSnapshotEvent
    | RollbackStartEvent
    | RollbackEvent
    | RolledBackEvent
    | EvalEvent
    | KilledEvent,
    Field(discriminator="event"),
]
EVENT_TYPES: tuple[type[_Event], ...] = (
    AttemptEvent,
    StepEvent,
    AbortEvent,
    DoneEvent,
    FailureDetectedEvent,
    RecoveryEvent,
    UnrecoverableEvent,
    FencedEvent,
    NoticeEvent,
    HandedOverEvent,
    CheckpointEvent,
    SnapshotEvent,
    CheckpointSnapshotEvent,
    NeighbourSnapshotEvent,
    RollbackStartEvent,
    RollbackEvent,
    RolledBackEvent,
    EvalEvent,
    KilledEvent,
)
_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
E = TypeVar("E", bound=_Event)


class EventLog:
    """Appends events to a JSON-lines file (or nowhere, when ``path`` is None)."""

    def __init__(self, path: pathlib.Path | None) -> None:
        self.path = path

    def emit(self, event: _Event) -> None:
        """One ``O_APPEND`` write per event, so processes sharing the file never interleave lines."""
        if self.path is None:
            return
        line = event.model_dump_json() + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def parse_event(line: str) -> Event:
    """One line of an events file; raises ``ValueError`` when it is not a known, well-formed event."""
    try:
        return _ADAPTER.validate_json(line)
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"{'.'.join(str(p) for p in first['loc']) or 'event'}: {first['msg']}") from None


def read_events(path: pathlib.Path) -> list[Event]:
    """Every well-formed event of ``path`` in file order ([] when it does not exist yet). A malformed or
    half-written line is skipped: a reader polls the file while daemons append to it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            events.append(parse_event(line))
        except ValueError as err:
            logger.debug("skipped an events line: %s", err)
    return events


def of_type(events: Iterable[object], kind: type[E]) -> list[E]:
    """The events of one kind, in order."""
    return [e for e in events if isinstance(e, kind)]


def dump(event: _Event) -> dict:
    """An event as the plain dict of its JSON line (for run summaries)."""
    return json.loads(event.model_dump_json())


def markdown_table() -> str:
    """The README's table of events: kind, meaning and fields (beyond ``time`` and ``pid``)."""
    rows = ["| event | when | fields |", "|---|---|---|"]
    for cls in EVENT_TYPES:
        kind = cls.model_fields["event"].default
        fields = ", ".join(f"`{name}`" for name in cls.model_fields if name not in ("event", "time", "pid"))
        rows.append(f"| `{kind}` | {(cls.__doc__ or '').strip()} | {fields} |")
    return "\n".join(rows)


README_BEGIN, README_END = "<!-- events:begin -->\n", "<!-- events:end -->"


def write_readme(path: pathlib.Path) -> None:
    """Replaces what stands between README.md's ``events:begin`` and ``events:end`` marker lines."""
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(head + README_BEGIN + markdown_table() + "\n" + README_END + tail, encoding="utf-8")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write-readme"]:
        write_readme(pathlib.Path(__file__).resolve().parents[1] / "README.md")
    else:
        print(markdown_table())
