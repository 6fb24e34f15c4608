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
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

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
