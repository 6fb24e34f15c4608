"""Preemption notices and the pure parsers of the clouds' metadata replies (no I/O here).

Every parser validates the whole reply and raises :class:`MetadataError` on anything that does not follow
the protocol, so a confused or hostile metadata service can never produce a notice by accident.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import enum
import json
import math
import time
from dataclasses import dataclass
from typing import Any

MAX_BODY = 64 * 1024  # every reply we expect is a few hundred bytes
MAX_EVENTS = 64  # Azure Scheduled Events in one document
MAX_FIELD = 256  # ids, types, statuses, times
MAX_DESCRIPTION = 4096
MAX_RESOURCES = 1024  # VMs named in one Azure event (a whole scale-set placement group)
MAX_SKEW = 7 * 24 * 3600.0  # a deadline further than this from now is nonsense (Azure gives up to 7 days)
AWS_REBALANCE_LEAD = 120.0
AWS_ACTIONS = ("terminate", "stop", "hibernate")
AZURE_HARD_EVENTS = ("Preempt", "Terminate")
AZURE_IGNORED_EVENTS = ("Freeze", "Reboot", "Redeploy")


class NoticeKind(enum.StrEnum):
    """How sure the end is."""

    TERMINATE = "terminate"  # hard: the machine goes at the deadline
    REBALANCE = "rebalance"  # soft: elevated risk (AWS rebalance recommendation, GCP live migration)


@dataclass(frozen=True)
class Notice:
    """One warning that this machine is about to be taken away."""

    provider: str  # "aws", "gcp", "azure" or "signal"
    kind: NoticeKind
    deadline: float  # unix time when the machine goes
    received: float  # unix time
    event_id: str | None = None  # Azure EventId
    detail: str = ""

    @property
    def hard(self) -> bool:
        """Whether the machine certainly goes at the deadline."""
        return self.kind is NoticeKind.TERMINATE

    def seconds_left(self, now: float | None = None) -> float:
        """Seconds until the deadline (never negative)."""
        return max(0.0, self.deadline - (time.time() if now is None else now))

    @property
    def key(self) -> tuple[str, str, str | float]:
        """What makes two notices the same: the provider, the kind and the event id or else the deadline."""
        return (self.provider, str(self.kind), self.event_id if self.event_id is not None else self.deadline)


class MetadataError(ValueError):
    """A metadata reply that does not follow the provider's protocol."""


def _check_now(now: float) -> None:
    if not math.isfinite(now) or now <= 0:
        raise ValueError(f"now must be a positive unix time, got {now!r}")


def _check_window(window: float) -> None:
    if not math.isfinite(window) or not 0 < window <= MAX_SKEW:
        raise ValueError(f"window must be a positive number of seconds, got {window!r}")


def _text(body: bytes, what: str) -> str:
    if not isinstance(body, bytes | bytearray):
        raise MetadataError(f"{what}: the body is {type(body).__name__}, not bytes")
    if len(body) > MAX_BODY:
        raise MetadataError(f"{what}: the body is {len(body)} bytes, more than {MAX_BODY}")
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise MetadataError(f"{what}: the body is not UTF-8 ({e.reason})") from None


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    text = _text(body, what)
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:  # also numbers too long to convert
        raise MetadataError(f"{what}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise MetadataError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _string(doc: dict[str, Any], field: str, what: str, limit: int = MAX_FIELD, required: bool = True) -> str:
    if field not in doc:
        if required:
            raise MetadataError(f"{what}: missing field {field!r}")
        return ""
    value = doc[field]
    if not isinstance(value, str):
        raise MetadataError(f"{what}: {field!r} is {type(value).__name__}, not a string")
    if len(value) > limit:
        raise MetadataError(f"{what}: {field!r} is {len(value)} characters, more than {limit}")
    return value


def _checked_deadline(deadline: float, now: float, what: str) -> float:
    if not math.isfinite(deadline) or abs(deadline - now) > MAX_SKEW:
        raise MetadataError(f"{what}: the time {deadline!r} is absurdly far from now ({now:.0f})")
    return deadline


def _iso_time(value: str, now: float, what: str) -> float:
    """An ISO 8601 UTC time as IMDS writes it ("2026-12-02T08:22:00Z")."""
    if not value[:1].isdigit() or "T" not in value:  # a whole date-time, not a bare date
        raise MetadataError(f"{what}: cannot parse the time {value!r}")
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        raise MetadataError(f"{what}: cannot parse the time {value!r}") from None
    if stamp.tzinfo is None:  # IMDS always speaks UTC; a missing "Z" must not shift the deadline by hours
        stamp = stamp.replace(tzinfo=dt.UTC)
    return _checked_deadline(stamp.timestamp(), now, what)


def _rfc1123_time(value: str, now: float, what: str) -> float:
    """An RFC 1123 date as Azure writes it ("Mon, 19 Sep 2016 18:29:47 GMT")."""
    try:
        stamp = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise MetadataError(f"{what}: cannot parse the time {value!r}") from None
    if stamp is None:
        raise MetadataError(f"{what}: cannot parse the time {value!r}")
    if stamp.tzinfo is None:  # "-0000" means UTC with no claim about local time
        stamp = stamp.replace(tzinfo=dt.UTC)
    return _checked_deadline(stamp.timestamp(), now, what)


def parse_aws_instance_action(body: bytes, now: float) -> Notice:
    """``/latest/meta-data/spot/instance-action``: ``{"action": "terminate"|"stop"|"hibernate", "time": ISO}``.

    Always a hard notice whose deadline is ``time``."""
    _check_now(now)
    what = "AWS instance-action"
    doc = _json_object(body, what)
    action = _string(doc, "action", what)
    if action not in AWS_ACTIONS:
        raise MetadataError(f"{what}: unknown action {action!r}")
    deadline = _iso_time(_string(doc, "time", what), now, what)
    return Notice("aws", NoticeKind.TERMINATE, deadline, now, detail=action)


def parse_aws_rebalance(body: bytes, now: float) -> Notice:
    """``/latest/meta-data/events/recommendations/rebalance``: ``{"noticeTime": ISO}``; a soft notice."""
    _check_now(now)
    what = "AWS rebalance recommendation"
    doc = _json_object(body, what)
    notice_time = _string(doc, "noticeTime", what)
    _iso_time(notice_time, now, what)  # validated, not used: the recommendation carries no deadline
    # By convention the earliest the machine can go: an interruption notice gives two minutes, and none has come yet.
    return Notice("aws", NoticeKind.REBALANCE, now + AWS_REBALANCE_LEAD, now, detail=f"noticeTime {notice_time}")


def _gcp_word(body: bytes, what: str) -> str:
    word = _text(body, what).strip()
    if len(word) > MAX_FIELD:
        raise MetadataError(f"{what}: {len(word)} characters where one word was expected")
    return word


def parse_gcp_preempted(body: bytes, now: float, window: float) -> Notice | None:
    """``instance/preempted``: ``TRUE`` is a hard notice due ``window`` seconds from now, ``FALSE`` is none."""
    _check_now(now)
    _check_window(window)
    what = "GCP preempted"
    word = _gcp_word(body, what)
    if word == "FALSE":
        return None
    if word == "TRUE":
        return Notice("gcp", NoticeKind.TERMINATE, now + window, now, detail="preempted")
    raise MetadataError(f"{what}: expected TRUE or FALSE, got {word[:40]!r}")


def parse_gcp_maintenance(body: bytes, now: float, window: float) -> Notice | None:
    """``instance/maintenance-event``: ``NONE``, ``TERMINATE_ON_HOST_MAINTENANCE`` (hard) or
    ``MIGRATE_ON_HOST_MAINTENANCE`` (soft: a live migration pauses the machine but keeps it)."""
    _check_now(now)
    _check_window(window)
    what = "GCP maintenance-event"
    word = _gcp_word(body, what)
    if word == "NONE":
        return None
    if word == "TERMINATE_ON_HOST_MAINTENANCE":
        return Notice("gcp", NoticeKind.TERMINATE, now + window, now, detail=word)
    if word == "MIGRATE_ON_HOST_MAINTENANCE":
        return Notice("gcp", NoticeKind.REBALANCE, now + window, now, detail=word)
    raise MetadataError(f"{what}: unknown value {word[:40]!r}")


def parse_azure_events(body: bytes, now: float, resource: str | None = None) -> tuple[int, list[Notice]]:
    """``/metadata/scheduledevents``: the DocumentIncarnation and a hard notice for each ``Preempt`` or
    ``Terminate`` event (deadline ``NotBefore``, or now when it is empty; ``event_id`` the EventId).

    Events go to every VM of an availability set or scale-set placement group: with ``resource`` (this VM's
    name), events whose ``Resources`` name other VMs only are left out. Freeze, Reboot, Redeploy and unknown
    types are validated and ignored."""
    _check_now(now)
    what = "Azure scheduled events"
    doc = _json_object(body, what)
    if "DocumentIncarnation" not in doc:
        raise MetadataError(f"{what}: missing field 'DocumentIncarnation'")
    incarnation = doc["DocumentIncarnation"]
    if not isinstance(incarnation, int) or isinstance(incarnation, bool) or not 0 <= incarnation < 2**63:
        raise MetadataError(f"{what}: DocumentIncarnation {incarnation!r} is not a non-negative integer")
    events = doc.get("Events")
    if not isinstance(events, list):
        raise MetadataError(f"{what}: 'Events' is {type(events).__name__}, not a list")
    if len(events) > MAX_EVENTS:
        raise MetadataError(f"{what}: {len(events)} events, more than {MAX_EVENTS}")
    notices: list[Notice] = []
    seen: set[str] = set()
    for i, event in enumerate(events):
        where = f"{what}, event {i}"
        if not isinstance(event, dict):
            raise MetadataError(f"{where}: {type(event).__name__}, not an object")
        event_id = _string(event, "EventId", where)
        if not event_id.strip():
            raise MetadataError(f"{where}: empty EventId")
        if event_id in seen:
            raise MetadataError(f"{where}: EventId {event_id!r} appears twice")
        seen.add(event_id)
        event_type = _string(event, "EventType", where)
        status = _string(event, "EventStatus", where, required=False)
        not_before = _string(event, "NotBefore", where, required=False)
        _string(event, "Description", where, limit=MAX_DESCRIPTION, required=False)
        resources = event.get("Resources", [])
        if not isinstance(resources, list) or len(resources) > MAX_RESOURCES:
            raise MetadataError(f"{where}: 'Resources' is not a list of at most {MAX_RESOURCES} names")
        if not all(isinstance(r, str) and len(r) <= MAX_FIELD for r in resources):
            raise MetadataError(f"{where}: 'Resources' holds something other than short strings")
        if event_type not in AZURE_HARD_EVENTS:
            continue  # Freeze, Reboot, Redeploy (and types added later) leave the machine to us
        if resource is not None and resources and resource not in resources:
            continue  # another VM of the same availability set or placement group
        deadline = _rfc1123_time(not_before, now, where) if not_before.strip() else now
        detail = f"{event_type} ({status})" if status else event_type
        notices.append(Notice("azure", NoticeKind.TERMINATE, deadline, now, event_id=event_id, detail=detail))
    return incarnation, notices
