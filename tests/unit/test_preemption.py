"""Spot-preemption notices: the pure parsers, and the watcher against real local metadata servers (AWS IMDSv2,
GCP, Azure Scheduled Events) on real sockets, including servers that answer garbage or nothing at all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from types import SimpleNamespace

import pytest
import torch

from node.local.metadata import (
    AwsMetadataServer,
    AzureMetadataServer,
    MetadataServer,
    metadata_server,
)
from node.preemption.notice import (
    MetadataError,
    Notice,
    NoticeKind,
    parse_aws_instance_action,
    parse_aws_rebalance,
    parse_azure_events,
    parse_gcp_maintenance,
    parse_gcp_preempted,
)
from node.preemption.providers import AzureProvider, ProviderError
from node.preemption.watcher import MODES, PreemptionWatcher
from node.proto import stage_pb2 as pb
from node.recovery.handoff import (
    choose_successor,
    named_successor,
    parked_state_served,
    soft_noticed,
    standby_order,
)
from node.stage.handoffs import Handoffs
from node.stage.seat import Seat
from node.wire.records import RecordError, RecoveryRecord, StageRecord, StageState
from node.wire.tensors import TensorAssembler

NOW = 1_790_000_000.0  # 2026-09-21T14:13:20Z
POLL = 0.05


@pytest.fixture
def servers() -> Iterator[Callable[[str], MetadataServer]]:
    """Starts local metadata servers and stops them all when the test ends."""
    started: list[MetadataServer] = []

    def start(provider: str) -> MetadataServer:
        server = metadata_server(provider)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class Watching:
    """A watcher running in a task, with what it passed on."""

    def __init__(self, watcher: PreemptionWatcher, notices: list[Notice], errors: list[str]) -> None:
        self.watcher, self.notices, self.errors = watcher, notices, errors


@contextlib.asynccontextmanager
async def watching(mode: str, url: str | None, **kwargs: object) -> AsyncIterator[Watching]:
    notices: list[Notice] = []
    errors: list[str] = []
    options: dict = {"poll_seconds": POLL, "probe_timeout": 0.5, "request_timeout": 1.0, "backoff": (0.05, 0.2)}
    options.update(kwargs)
    watcher = PreemptionWatcher(mode, url, 10.0, notices.append, errors.append, **options)
    stopping = asyncio.Event()
    task = asyncio.create_task(watcher.run(stopping))
    try:
        yield Watching(watcher, notices, errors)
    finally:
        stopping.set()
        await asyncio.wait_for(task, 5)  # returns promptly and without an exception


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Waits for ``predicate``; returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the socket is closed


# The pure parsers


def aws_action(action: str = "terminate", when: str = "2026-09-21T14:15:20Z") -> bytes:
    return f'{{"action": "{action}", "time": "{when}"}}'.encode()


@pytest.mark.timeout(30)
def test_aws_parsers() -> None:
    notice = parse_aws_instance_action(aws_action(), NOW)
    assert notice == Notice("aws", NoticeKind.TERMINATE, NOW + 120, NOW, detail="terminate")
    assert notice.hard and notice.seconds_left(NOW) == 120 and notice.seconds_left(NOW + 500) == 0
    assert parse_aws_instance_action(aws_action("hibernate"), NOW).hard
    assert parse_aws_instance_action(aws_action(when="2026-09-21T14:15:20"), NOW).deadline == NOW + 120  # UTC
    assert parse_aws_instance_action(aws_action(when="2026-09-21T16:15:20+02:00"), NOW).deadline == NOW + 120
    soft = parse_aws_rebalance(b'{"noticeTime": "2026-09-21T14:13:00Z"}', NOW)
    assert soft.kind is NoticeKind.REBALANCE and not soft.hard and soft.deadline == NOW + 120


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"action": "terminate", "time": ',
        b"[]",
        b'"terminate"',
        b'{"time": "2026-09-21T14:15:20Z"}',  # no action
        b'{"action": "terminate"}',  # no time
        aws_action("explode"),
        aws_action("terminate", "soon"),
        aws_action("terminate", "2026-09-21"),  # a date, not a time
        aws_action("terminate", "1999-01-01T00:00:00Z"),  # absurdly far from now
        b'{"action": 1, "time": "2026-09-21T14:15:20Z"}',
        b'{"action": "terminate", "time": 1790000120}',
        b"\xff\xfe",
        b'{"action": "terminate", "time": "' + b"9" * 70_000 + b'"}',
    ],
)
def test_aws_instance_action_rejects(body: bytes) -> None:
    with pytest.raises(MetadataError):
        parse_aws_instance_action(body, NOW)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("body", [b"{}", b'{"noticeTime": 5}', b'{"noticeTime": "yesterday"}', b"null", b"{"])
def test_aws_rebalance_rejects(body: bytes) -> None:
    with pytest.raises(MetadataError):
        parse_aws_rebalance(body, NOW)


@pytest.mark.timeout(30)
def test_gcp_parsers() -> None:
    assert parse_gcp_preempted(b"FALSE", NOW, 30) is None
    hard = parse_gcp_preempted(b"TRUE\n", NOW, 30)
    assert hard is not None and hard.hard and hard.provider == "gcp" and hard.deadline == NOW + 30
    assert parse_gcp_maintenance(b"NONE", NOW, 30) is None
    terminate = parse_gcp_maintenance(b"TERMINATE_ON_HOST_MAINTENANCE", NOW, 30)
    assert terminate is not None and terminate.hard
    migrate = parse_gcp_maintenance(b"MIGRATE_ON_HOST_MAINTENANCE", NOW, 30)
    assert migrate is not None and migrate.kind is NoticeKind.REBALANCE
    for body in (b"", b"true", b"YES", b"{MAYBE", b"TRUE FALSE", b"\xff", b"T" * 300):
        with pytest.raises(MetadataError):
            parse_gcp_preempted(body, NOW, 30)
    for body in (b"", b"none", b"REBOOT", b"[]"):
        with pytest.raises(MetadataError):
            parse_gcp_maintenance(body, NOW, 30)
    with pytest.raises(ValueError):
        parse_gcp_preempted(b"TRUE", NOW, -1)


def azure_doc(*events: dict, incarnation: object = 3) -> bytes:
    return json.dumps({"DocumentIncarnation": incarnation, "Events": list(events)}).encode()


def azure_event(event_type: str = "Preempt", **fields: object) -> dict:
    event = {
        "EventId": f"ID-{event_type}",
        "EventType": event_type,
        "ResourceType": "VirtualMachine",
        "Resources": ["vm-1"],
        "EventStatus": "Scheduled",
        "NotBefore": "Mon, 21 Sep 2026 14:13:50 GMT",
        "Description": "",
        "EventSource": "Platform",
        "DurationInSeconds": -1,
    }
    event.update(fields)
    return event


@pytest.mark.timeout(30)
def test_azure_parser() -> None:
    assert parse_azure_events(azure_doc(), NOW) == (3, [])
    incarnation, notices = parse_azure_events(
        azure_doc(azure_event(), azure_event("Freeze"), azure_event("Reboot"), azure_event("Terminate")), NOW
    )
    assert incarnation == 3
    expected = [("ID-Preempt", True, NOW + 30), ("ID-Terminate", True, NOW + 30)]
    assert [(n.event_id, n.hard, n.deadline) for n in notices] == expected
    assert parse_azure_events(azure_doc(azure_event(NotBefore="")), NOW)[1][0].deadline == NOW  # already started
    assert parse_azure_events(azure_doc(azure_event("LiveMigrate")), NOW)[1] == []  # unknown types are ignored
    # Events reach every VM of an availability set: with our name known, another VM's events are left out.
    assert parse_azure_events(azure_doc(azure_event(Resources=["vm-2"])), NOW, resource="vm-1")[1] == []
    assert len(parse_azure_events(azure_doc(azure_event(Resources=["vm-2", "vm-1"])), NOW, resource="vm-1")[1]) == 1
    assert len(parse_azure_events(azure_doc(azure_event(Resources=[])), NOW, resource="vm-1")[1]) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b'{"Events": []}',
        azure_doc(incarnation="3"),
        azure_doc(incarnation=-1),
        azure_doc(incarnation=True),
        b'{"DocumentIncarnation": 1, "Events": {}}',
        b'{"DocumentIncarnation": 1}',
        azure_doc(azure_event(NotBefore="someday")),
        azure_doc(azure_event(NotBefore="Mon, 19 Sep 2016 18:29:47 GMT")),  # ten years ago
        azure_doc(azure_event(EventId="")),
        azure_doc(azure_event(EventId=7)),
        azure_doc(azure_event(EventId="x" * 1000)),
        azure_doc(azure_event(EventType=None)),
        azure_doc(azure_event(Resources="vm-1")),
        azure_doc(azure_event(), azure_event()),  # the same EventId twice
        azure_doc(*[azure_event(EventId=f"e{i}", EventType="Freeze") for i in range(65)]),
        azure_doc("Preempt"),  # type: ignore[arg-type]
    ],
)
def test_azure_parser_rejects(body: bytes) -> None:
    with pytest.raises(MetadataError):
        parse_azure_events(body, NOW)


@pytest.mark.timeout(30)
def test_modes_are_validated() -> None:
    assert MODES == ("auto", "aws", "gcp", "azure", "signal", "none")
    with pytest.raises(ValueError):
        PreemptionWatcher("ec2", None, 10, lambda n: None)
    with pytest.raises(ValueError):
        PreemptionWatcher("aws", "https://169.254.169.254", 10, lambda n: None)
    with pytest.raises(ValueError):
        PreemptionWatcher("aws", None, -1, lambda n: None)


# The providers against local servers


@pytest.mark.timeout(30)
async def test_aws_notice(servers) -> None:
    server = servers("aws")
    async with watching("aws", server.url) as w:
        await until(lambda: server.paths("GET").count(AwsMetadataServer.ACTION_PATH) >= 3)
        assert w.notices == []
        t0 = time.time()
        server.preempt(notice_seconds=30)
        await until(lambda: w.notices)
        await asyncio.sleep(5 * POLL)  # the notice stays there, poll after poll
    [notice] = w.notices
    assert notice.provider == "aws" and notice.hard and notice.detail == "terminate"
    assert abs(notice.deadline - (t0 + 30)) <= 1.0
    assert w.errors == [] and w.watcher.provider == "aws"


@pytest.mark.timeout(30)
async def test_aws_token_expiry_takes_a_new_token(servers) -> None:
    server = servers("aws")
    async with watching("aws", server.url) as w:
        await until(lambda: server.token_puts == 1 and len(server.paths("GET")) >= 2)
        server.expire_tokens()
        await until(lambda: server.token_puts == 2)
        assert server.unauthorized >= 1
        server.preempt()
        await until(lambda: w.notices)
    assert w.errors == [] and len(w.notices) == 1


@pytest.mark.timeout(30)
async def test_aws_rebalance_is_soft(servers) -> None:
    server = servers("aws")
    async with watching("aws", server.url) as w:
        t0 = time.time()
        server.rebalance()
        await until(lambda: w.notices)
        await asyncio.sleep(5 * POLL)
        [soft] = w.notices
        assert soft.kind is NoticeKind.REBALANCE and not soft.hard and abs(soft.deadline - (t0 + 120)) <= 1.0
        server.preempt("stop")
        await until(lambda: len(w.notices) == 2)
    assert w.notices[1].hard and w.notices[1].detail == "stop"


@pytest.mark.timeout(30)
async def test_gcp_server_wants_the_header(servers) -> None:
    server = servers("gcp")
    url = server.url + "/computeMetadata/v1/instance/preempted"

    def get(headers: dict[str, str]) -> tuple[int, str, str | None]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as reply:
                return reply.status, reply.read().decode(), reply.headers.get("ETag")
        except urllib.error.HTTPError as e:
            return e.code, "", None

    assert (await asyncio.to_thread(get, {}))[0] == 403
    status, value, etag = await asyncio.to_thread(get, {"Metadata-Flavor": "Google"})
    assert (status, value) == (200, "FALSE") and etag


@pytest.mark.timeout(30)
async def test_gcp_hanging_get_brings_the_notice_at_once(servers) -> None:
    server = servers("gcp")
    poll = 10.0  # the maintenance poll; the preempted notice must not wait for it
    async with watching("gcp", server.url, poll_seconds=poll) as w:
        await until(lambda: any(r.query.get("wait_for_change") == "true" for r in server.requests))
        await asyncio.sleep(0.2)  # the hanging GET is waiting on the server
        assert w.notices == []
        t0 = time.time()
        server.preempt()
        took = await until(lambda: w.notices)
    assert took < 1.0 < poll
    [notice] = w.notices
    assert notice.provider == "gcp" and notice.hard and abs(notice.deadline - (t0 + 30)) <= 1.0
    assert server.refused == 0 and w.errors == []


@pytest.mark.timeout(30)
async def test_gcp_migration_is_soft(servers) -> None:
    server = servers("gcp")
    async with watching("gcp", server.url) as w:
        server.preempt("rebalance")
        await until(lambda: w.notices)
        server.preempt("maintenance")
        await until(lambda: len(w.notices) == 2)
        await asyncio.sleep(5 * POLL)
    assert [n.kind for n in w.notices] == [NoticeKind.REBALANCE, NoticeKind.TERMINATE]


@pytest.mark.timeout(30)
async def test_azure_notice_and_acknowledgement(servers) -> None:
    server = servers("azure")
    assert isinstance(server, AzureMetadataServer)
    async with watching("azure", server.url) as w:
        await until(lambda: server.paths("GET").count(AzureMetadataServer.EVENTS_PATH) >= 3)
        server.schedule("Freeze")  # left to us
        server.schedule("Preempt", resources=["another-vm"])  # same availability set, not us
        await until(lambda: server.paths("GET").count(AzureMetadataServer.EVENTS_PATH) >= 6)
        assert w.notices == []
        t0 = time.time()
        event_id = server.preempt(notice_seconds=30)
        await until(lambda: w.notices)
        server.schedule("Reboot")  # a new incarnation still holds the same Preempt event: not passed on again
        await asyncio.sleep(5 * POLL)
        [notice] = w.notices
        assert notice.provider == "azure" and notice.hard and notice.event_id == event_id
        assert abs(notice.deadline - (t0 + 30)) <= 1.0
        await w.watcher.acknowledge(notice)
        assert server.acknowledged == [event_id]
        await asyncio.sleep(5 * POLL)
    assert len(w.notices) == 1 and w.errors == [] and server.refused == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
async def test_auto_finds_the_provider(servers, provider: str) -> None:
    server = servers(provider)
    async with watching("auto", server.url) as w:
        await until(lambda: w.watcher.provider is not None)
        assert w.watcher.provider == provider
        server.preempt()
        await until(lambda: w.notices)
    assert [n.provider for n in w.notices] == [provider] and w.errors == []


@pytest.mark.timeout(30)
async def test_auto_without_metadata_watches_signals_only(caplog) -> None:
    caplog.set_level(logging.INFO, logger="node.preemption")
    async with watching("auto", closed_port_url()) as w:
        await until(lambda: "watching signals only" in caplog.text)
        await asyncio.sleep(0.2)
    assert w.watcher.provider is None and w.notices == [] and w.errors == []
    assert caplog.text.count("watching signals only") == 1


# Garbage, errors and hangs


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("provider", "mode"),
    [
        ("aws", "bad_json"),
        ("aws", "http_500"),
        ("aws", "hang"),
        ("gcp", "bad_json"),
        ("gcp", "http_500"),
        ("gcp", "hang"),
        ("azure", "bad_json"),
        ("azure", "http_500"),
    ],
)
async def test_misbehaving_metadata_is_reported_not_believed(servers, caplog, provider: str, mode: str) -> None:
    caplog.set_level(logging.WARNING, logger="node.preemption")
    server = servers(provider)
    server.misbehave(mode)
    server.preempt()  # even a real notice behind the garbage must not come out as one
    async with watching(provider, server.url, request_timeout=0.3) as w:
        await until(lambda: len(w.errors) >= 3)
        assert w.notices == []
        problems = [r for r in caplog.records if "metadata service" in r.getMessage()]
        assert len(problems) == 1  # logged once per kind of problem
        server.misbehave(None)  # it recovers: the backoff is short here
        await until(lambda: w.notices)
    assert set(w.errors) == {provider} and len(w.notices) == 1


@pytest.mark.timeout(30)
async def test_azure_first_request_may_be_slow_but_not_forever(servers) -> None:
    server = servers("azure")
    server.misbehave("hang")
    provider = AzureProvider(server.url, poll_seconds=POLL, request_timeout=0.2, first_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(ProviderError) as caught:
        await provider.watch(lambda n: None, asyncio.Event())
    assert caught.value.kind == "timeout" and time.monotonic() - start < 3
    assert not await provider.probe(0.3)


@pytest.mark.timeout(30)
async def test_stopping_ends_a_hanging_watch_at_once(servers) -> None:
    server = servers("aws")
    server.misbehave("hang")
    async with watching("aws", server.url, request_timeout=20.0) as w:
        await until(lambda: server.requests)
    assert w.errors == [] and w.notices == []  # left within the 5 s the context manager allows


# Signals


@pytest.mark.timeout(30)
async def test_sigterm_is_a_hard_notice() -> None:
    notices: list[Notice] = []
    watcher = PreemptionWatcher("signal", None, 20.0, notices.append)
    watcher.install_signal_handlers(asyncio.get_running_loop())
    try:
        t0 = time.time()
        os.kill(os.getpid(), signal.SIGTERM)
        await until(lambda: notices)
        os.kill(os.getpid(), signal.SIGINT)  # a second one is passed on too
        await until(lambda: len(notices) == 2)
    finally:
        watcher.remove_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    expected = [("signal", True, "SIGTERM"), ("signal", True, "SIGINT")]
    assert [(n.provider, n.hard, n.detail) for n in notices] == expected
    assert abs(notices[0].deadline - (t0 + 20.0)) <= 1.0


@pytest.mark.timeout(30)
async def test_mode_none_leaves_signals_alone() -> None:
    before = signal.getsignal(signal.SIGTERM)
    watcher = PreemptionWatcher("none", None, 20.0, lambda n: None)
    watcher.install_signal_handlers(asyncio.get_running_loop())
    assert signal.getsignal(signal.SIGTERM) == before
    await asyncio.wait_for(watcher.run(asyncio.Event()), 1)  # returns at once
    watcher.remove_signal_handlers()


# Parked states are dropped once their stage is served again; soft notices: standing by and pre-staging


def record(stage: int | None, state: str, step: int = 0, peer: str = "p", **extra: object) -> StageRecord:
    return StageRecord(
        stage=stage, num_stages=5, peer_id=peer, grpc_address="127.0.0.1:9", state=StageState(state),
        committed_step=step, config_fingerprint="f", version="1", **extra,
    )  # fmt: skip


RECOVERED = RecoveryRecord(method="handoff", step=3, seconds=1.0)


def test_a_parked_state_is_dropped_only_once_its_stage_is_served_again() -> None:
    rebuilt = RecoveryRecord(method="checkfree", step=7, seconds=1.0)
    leaving = record(3, "handing_over", 7, "owner")
    claiming = record(3, "recovering", 0, "spare")
    assert parked_state_served(None, [record(3, "online", 9)]) is None  # nothing parked
    assert parked_state_served((3, 7), []) is None
    assert parked_state_served((3, 7), [leaving, claiming]) is None  # its successor is still fetching it
    assert parked_state_served((3, 7), [record(2, "online", 9), record(4, "waiting", 9)]) is None  # other stages
    assert parked_state_served((3, 7), [record(3, "offline", 9)]) is None
    # a peer serving the stage behind the parked step, with no recovery behind it, may still want the copy
    assert parked_state_served((3, 7), [record(3, "online", 2)]) is None
    for served in (record(3, "online", 7), record(3, "waiting", 8), record(3, "online", 2, last_recovery=rebuilt)):
        assert parked_state_served((3, 7), [leaving, served]) == served
        # a view older than the park still shows the owner that parked it serving: that is no successor
        assert parked_state_served((3, 7), [served], owner=served.peer_id) is None


def test_spares_stand_by_for_stages_warned_of_a_preemption() -> None:
    warned = record(2, "online", 5, "a", soft_notice=True)
    records = [record(1, "online", 5, "b"), warned, record(4, "handing_over", 5, "c"), record(None, "spare")]
    assert soft_noticed(records) == {2}
    assert standby_order([0, 1, 2, 3, 4], records) == [2, 4, 0, 1, 3]
    assert standby_order([0, 3], records) == [0, 3] and standby_order([], records) == []
    assert StageRecord.from_wire(warned.to_wire()).soft_notice is True
    assert record(3, "online").soft_notice is False  # the default: no notice
    for bad in ("yes", 1, None):
        with pytest.raises(RecordError):
            StageRecord.from_wire({**warned.to_wire(), "soft_notice": bad})


class StagingParticipant:
    """What :class:`Handoffs` uses of a participant, with a committed step that the test moves."""

    def __init__(self) -> None:
        self.seat = Seat(1, SimpleNamespace(committed_step=4, prepared=False))  # type: ignore[arg-type]
        self.after_commit: list[Callable[[int], None]] = []
        self.snapshots = 0

    async def snapshot_full(self) -> tuple[int, dict[str, torch.Tensor]]:
        self.snapshots += 1
        step = self.seat.runtime.committed_step
        return step, {"w.x": torch.full((3,), float(step)), "meta.lr_scale": torch.tensor(1.0, dtype=torch.float64)}

    def commit(self) -> None:
        self.seat.runtime.committed_step += 1
        for hook in self.after_commit:
            hook(self.seat.runtime.committed_step)


def decoded(chunks: Iterable[bytes]) -> tuple[int, dict[str, torch.Tensor]]:
    asm = TensorAssembler(1 << 20, 1 << 20)
    for chunk in chunks:
        asm.feed(chunk)
    return asm.meta.step, asm.finish()


async def staged(handoffs: Handoffs) -> None:
    while handoffs._staging is not None and not handoffs._staging.done():
        await asyncio.sleep(0.01)


@pytest.mark.timeout(30)
async def test_a_soft_notice_pre_stages_the_full_state_after_every_commit() -> None:
    participant = StagingParticipant()
    me = SimpleNamespace(peer_id="me")
    handoffs = Handoffs(participant, None, None, lambda: me)  # type: ignore[arg-type]
    step, stream = await handoffs.full_stream()  # no soft notice: a snapshot, encoded as it is sent
    assert step == 4 and not isinstance(stream, list) and participant.snapshots == 1
    assert decoded(stream)[0] == 4 and decoded(stream)[0] == 4  # it can be sent twice (parking retries)
    handoffs.prestage()
    handoffs.prestage()  # idempotent: one commit hook
    await staged(handoffs)
    assert handoffs.prestaging and len(participant.after_commit) == 1 and handoffs.prestaged is not None
    snapshots = participant.snapshots
    step, stream = await handoffs.full_stream()  # the hard notice: streamed at once, no new snapshot
    assert step == 4 and stream is handoffs.prestaged[1] and participant.snapshots == snapshots
    got_step, tensors = decoded(stream)
    assert got_step == 4 and torch.equal(tensors["w.x"], torch.full((3,), 4.0))
    participant.commit()  # each commit refreshes it
    participant.commit()
    await staged(handoffs)
    step, stream = await handoffs.full_stream()
    assert step == 6 and isinstance(stream, list) and torch.equal(decoded(stream)[1]["w.x"], torch.full((3,), 6.0))
    participant.seat.runtime.committed_step = 7  # committed without the hook: never stream an older state
    step, stream = await handoffs.full_stream()
    assert step == 7 and not isinstance(stream, list) and decoded(stream)[0] == 7


def test_a_holder_drops_a_parked_state_and_stops_announcing_it() -> None:
    handoffs = Handoffs(StagingParticipant(), None, None, lambda: None)  # type: ignore[arg-type]
    handoffs.parked, handoffs.parked_by = (3, 7, {"w.x": torch.zeros(1 << 16)}), "owner"
    assert not handoffs.drop_parked_if_served([record(3, "recovering", 0)])
    assert not handoffs.drop_parked_if_served([record(3, "online", 6, "owner", last_recovery=RECOVERED)])
    assert handoffs.parked_at == (3, 7)
    assert handoffs.drop_parked_if_served([record(3, "online", 7)])
    assert handoffs.parked is None and handoffs.parked_at is None
    assert not handoffs.drop_parked_if_served([record(3, "online", 7)])  # nothing left to drop


@pytest.mark.timeout(30)
async def test_a_parked_state_is_in_the_holders_record_before_the_park_is_acknowledged() -> None:
    from node.config import build_config
    from node.recovery.rebuild import expected_state

    participant = StagingParticipant()
    participant.config = build_config(overrides={"num_stages": 4})  # type: ignore[attr-defined]

    async def refuse(context: object, reason: object, text: str) -> None:
        raise AssertionError(f"refused: {text}")

    handoffs = Handoffs(participant, SimpleNamespace(refuse=refuse), None, lambda: None)  # type: ignore[arg-type]
    announced: list[tuple[int, int] | None] = []

    async def announce() -> None:
        announced.append(handoffs.parked_at)  # what the stored record says

    presence = SimpleNamespace(announce=announce, members=lambda: [])
    stopping = asyncio.Event()
    releasing = asyncio.create_task(handoffs.release_parked(presence, stopping))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    spec = expected_state(participant.config, 2)  # type: ignore[attr-defined]
    state = {f"w.{k}": torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in spec.items()}
    state["meta.lr_scale"] = torch.tensor(1.1, dtype=torch.float64)
    state["meta.last_grad_norm"] = torch.tensor(0.3, dtype=torch.float64)
    meta = pb.MicrobatchMeta(step=5, sender_stage=2, sender_peer="owner")
    await handoffs.keep(meta, state, SimpleNamespace(time_remaining=lambda: 5.0))
    assert announced == [(2, 5)] and handoffs.parked_by == "owner"  # stored before keep returned (the ack)
    stopping.set()
    await asyncio.wait_for(releasing, 5)


def test_a_leaving_owner_names_a_waiting_spare_which_takes_the_stage_while_others_leave_it() -> None:
    spares = [record(None, "spare", 0, "s2"), record(None, "spare", 0, "s1"), record(1, "online", 5, "b")]
    assert choose_successor(spares) == "s1" and choose_successor(spares[2:]) is None
    leaving = record(3, "handing_over", 5, "owner", successor="s1")
    view = [leaving, *spares]
    assert named_successor([3], view, "s1") == (3, set())  # the named spare takes it at once
    assert named_successor([3], view, "s2") == (None, {3})  # another spare leaves it to s1
    claiming_it = record(3, "recovering", 0, "s1")
    assert named_successor([3], [leaving, claiming_it, spares[0]], "s2") == (None, {3})
    # the named spare is gone, or took another stage: stage 3 is an ordinary vacancy again
    assert named_successor([3], [leaving, spares[0]], "s2") == (None, set())
    assert named_successor([3, 2], [leaving, record(2, "recovering", 0, "s1")], "s2") == (None, set())
    assert named_successor([2], view, "s1") == (None, set())  # stage 3 is not vacant in this view
    assert StageRecord.from_wire(leaving.to_wire()).successor == "s1"
    with pytest.raises(RecordError):
        StageRecord.from_wire({**leaving.to_wire(), "successor": ""})
