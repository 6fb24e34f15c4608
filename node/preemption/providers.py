"""The metadata protocols of AWS (IMDSv2), GCP and Azure (Scheduled Events), spoken over plain HTTP.

Each request runs in a worker thread (``http.client``, which ignores ``*_proxy`` variables: a metadata
service must never be asked through a proxy) under a short timeout, so the event loop never blocks; a
request that is cancelled or times out has its socket shut down, which frees the thread at once.

:meth:`Provider.watch` raises :class:`ProviderError` or :class:`~node.preemption.notice.MetadataError` on
the first problem and keeps its state (token, ETag, incarnation, what it already emitted), so the caller
can simply call it again after a pause; :class:`~node.preemption.watcher.PreemptionWatcher` does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from node.preemption.notice import (
    MAX_BODY,
    MetadataError,
    Notice,
    parse_aws_instance_action,
    parse_aws_rebalance,
    parse_azure_events,
    parse_gcp_maintenance,
    parse_gcp_preempted,
)

log = logging.getLogger(__name__)

DEFAULT_AWS_URL = "http://169.254.169.254"
DEFAULT_GCP_URL = "http://metadata.google.internal"
DEFAULT_AZURE_URL = "http://169.254.169.254"
REQUEST_TIMEOUT = 2.0  # a metadata service answers in milliseconds
ERROR_KINDS = ("unreachable", "timeout", "http_status", "bad_reply")

Emit = Callable[[Notice], None]


class ProviderError(Exception):
    """A metadata service that cannot be reached or answers outside the protocol; ``kind`` is one of
    :data:`ERROR_KINDS` (a fixed set, so it can key rate-limited logs and metrics)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Reply:
    """One HTTP answer; header names are lower-case."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Exchange:
    """One HTTP request on a worker thread, which another thread can abort by shutting its socket down."""

    def __init__(self, method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float) -> None:
        self.method, self.url, self.headers, self.body, self.timeout = method, url, headers, body, timeout
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False

    def run(self) -> Reply:
        parts = urllib.parse.urlsplit(self.url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        # A hanging GET may wait a minute for its answer, but never for a connection.
        conn = http.client.HTTPConnection(
            parts.hostname or "", parts.port or 80, timeout=min(self.timeout, REQUEST_TIMEOUT)
        )
        try:
            conn.connect()
            with self._lock:  # an abort before this point is seen here, one after it finds the socket
                if self._aborted:
                    raise ProviderError("timeout", f"{self.method} {self.url}: aborted")
                self._conn = conn
            if conn.sock is not None:
                conn.sock.settimeout(self.timeout)
            conn.request(self.method, target, body=self.body, headers=self.headers)
            response = conn.getresponse()
            data = response.read(MAX_BODY + 1)  # a longer body is rejected by the parsers
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        except TimeoutError:
            raise ProviderError("timeout", f"{self.method} {self.url}: no answer within {self.timeout:g} s") from None
        except http.client.HTTPException as e:
            raise ProviderError("bad_reply", f"{self.method} {self.url}: not HTTP ({type(e).__name__})") from None
        except OSError as e:
            raise ProviderError("unreachable", f"{self.method} {self.url}: {e}") from None
        finally:
            conn.close()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv


async def http_request(
    method: str, url: str, headers: dict[str, str], body: bytes | None = None, timeout: float = REQUEST_TIMEOUT
) -> Reply:
    """One HTTP request on a worker thread, all of it within ``timeout`` seconds; raises :class:`ProviderError`."""
    exchange = _Exchange(method, url, headers, body, timeout)
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.to_thread(exchange.run)
    except TimeoutError:
        exchange.abort()
        raise ProviderError("timeout", f"{method} {url}: no answer within {timeout:g} s") from None
    except asyncio.CancelledError:
        exchange.abort()
        raise


def base_url(url: str) -> str:
    """``url`` checked to be ``http://host[:port][/prefix]``, without a trailing slash."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"a metadata URL must look like http://host[:port], got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"a metadata URL takes no query or fragment, got {url!r}")
    return url.rstrip("/")


async def pause(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleeps ``seconds`` unless ``stopping`` is set first; returns whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
    return stopping.is_set()


def _positive(name: str, value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _short_text(reply: Reply, what: str, limit: int = 1024) -> str:
    """A short printable one-line body (a token, an id, a name)."""
    try:
        text = reply.body.decode("ascii").strip()
    except UnicodeDecodeError:
        raise MetadataError(f"{what}: not ASCII") from None
    if not text or len(text) > limit or not text.isprintable() or any(c.isspace() for c in text):
        raise MetadataError(f"{what}: expected one short word, got {text[:40]!r}")
    return text


def _expect(reply: Reply, what: str, *ok: int) -> None:
    if reply.status not in ok:
        raise ProviderError("http_status", f"{what}: HTTP {reply.status}")


class Provider:
    """What every cloud's watcher offers."""

    name: ClassVar[str] = ""

    def __init__(self, url: str, request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.base_url = base_url(url)
        self.request_timeout = _positive("request_timeout", request_timeout)
        self.ok_replies = 0  # good answers so far: the caller resets its backoff when this grows

    async def _call(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None = None, timeout: float | None = None
    ) -> Reply:
        return await http_request(method, self.base_url + path, headers, body, timeout or self.request_timeout)

    async def probe(self, timeout: float) -> bool:
        """Whether this provider's metadata service answers correctly here, within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                return await self._probe(timeout)
        except (ProviderError, MetadataError, TimeoutError) as e:
            log.debug("%s metadata probe: %s", self.name, e)
            return False

    async def _probe(self, timeout: float) -> bool:
        raise NotImplementedError

    async def watch(self, emit: Emit, stopping: asyncio.Event) -> None:
        """Passes notices to ``emit`` until ``stopping`` is set; raises :class:`ProviderError` or
        :class:`MetadataError` on the first problem (call again to go on)."""
        raise NotImplementedError

    async def acknowledge(self, notice: Notice) -> None:
        """Tells the cloud the machine is ready to go (only Azure listens)."""


class AwsProvider(Provider):
    """EC2 IMDSv2: a session token, then polls of the spot instance-action and rebalance recommendation."""

    name = "aws"
    TOKEN_PATH = "/latest/api/token"
    ACTION_PATH = "/latest/meta-data/spot/instance-action"
    REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
    INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
    TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
    TOKEN_HEADER = "X-aws-ec2-metadata-token"

    def __init__(
        self,
        base_url: str = DEFAULT_AWS_URL,
        poll_seconds: float = 5.0,
        token_ttl: int = 21600,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(base_url, request_timeout)
        self.poll_seconds = _positive("poll_seconds", poll_seconds)
        if not isinstance(token_ttl, int) or not 1 <= token_ttl <= 21600:
            raise ValueError(f"token_ttl must be 1..21600 seconds, got {token_ttl!r}")
        self.token_ttl = token_ttl
        self.token_fetches = 0
        self._token: str | None = None
        self._token_renew = 0.0  # monotonic time to fetch a new one
        self._last_action: bytes | None = None
        self._last_rebalance: bytes | None = None

    async def _fetch_token(self, timeout: float | None) -> str:
        try:
            reply = await self._call("PUT", self.TOKEN_PATH, {self.TTL_HEADER: str(self.token_ttl)}, b"", timeout)
        except ProviderError as e:
            if e.kind != "timeout":
                raise
            # The token's reply is the one that dies on a bridge network with the default hop limit of 1.
            raise ProviderError("timeout", f"{e} (from a container, the IMDS hop limit must be 2)") from None
        _expect(reply, "AWS token PUT", 200)
        token = _short_text(reply, "AWS token", limit=4096)
        self.token_fetches += 1
        self._token = token
        self._token_renew = time.monotonic() + self.token_ttl - min(60.0, self.token_ttl / 10)  # renew early
        return token

    async def _get(self, path: str, timeout: float | None = None) -> Reply:
        token = self._token
        if token is None or time.monotonic() >= self._token_renew:
            token = await self._fetch_token(timeout)
        reply = await self._call("GET", path, {self.TOKEN_HEADER: token}, timeout=timeout)
        if reply.status == 401:  # expired early or IMDS restarted: a new token, and one more try
            self._token = None
            token = await self._fetch_token(timeout)
            reply = await self._call("GET", path, {self.TOKEN_HEADER: token}, timeout=timeout)
            if reply.status == 401:
                raise ProviderError("http_status", f"AWS GET {path}: HTTP 401 even with a new token")
        return reply

    async def _probe(self, timeout: float) -> bool:
        reply = await self._get(self.INSTANCE_ID_PATH, timeout)
        _expect(reply, "AWS instance-id", 200)
        _short_text(reply, "AWS instance-id")
        return True

    async def watch(self, emit: Emit, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            reply = await self._get(self.ACTION_PATH)
            _expect(reply, "AWS instance-action", 200, 404)
            if reply.status == 404:  # nothing scheduled (or withdrawn)
                self._last_action = None
            else:
                notice = parse_aws_instance_action(reply.body, time.time())
                if reply.body != self._last_action:  # it stays there, unchanged, every poll
                    self._last_action = reply.body
                    emit(notice)
            reply = await self._get(self.REBALANCE_PATH)
            _expect(reply, "AWS rebalance recommendation", 200, 404)
            if reply.status == 404:
                self._last_rebalance = None
            else:
                notice = parse_aws_rebalance(reply.body, time.time())
                if reply.body != self._last_rebalance:
                    self._last_rebalance = reply.body
                    emit(notice)
            self.ok_replies += 1
            if await pause(stopping, self.poll_seconds):
                return


class GcpProvider(Provider):
    """GCE metadata server: a hanging GET on ``instance/preempted`` and polls of ``instance/maintenance-event``."""

    name = "gcp"
    PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
    MAINTENANCE_PATH = "/computeMetadata/v1/instance/maintenance-event"
    HEADERS: ClassVar[dict[str, str]] = {"Metadata-Flavor": "Google"}

    def __init__(
        self,
        base_url: str = DEFAULT_GCP_URL,
        window: float = 30.0,
        poll_seconds: float = 5.0,
        hang_seconds: int = 60,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        super().__init__(base_url, request_timeout)
        self.window = _positive("window", window)  # Spot VMs get about 30 s between ACPI soft-off and power-off
        self.poll_seconds = _positive("poll_seconds", poll_seconds)
        if not isinstance(hang_seconds, int) or not 1 <= hang_seconds <= 3600:
            raise ValueError(f"hang_seconds must be 1..3600, got {hang_seconds!r}")
        self.hang_seconds = hang_seconds
        self._preempted = False
        self._maintenance: str | None = None

    async def _get(self, path: str, timeout: float | None = None) -> Reply:
        return await self._call("GET", path, dict(self.HEADERS), timeout=timeout)

    async def _probe(self, timeout: float) -> bool:
        reply = await self._get(self.PREEMPTED_PATH, timeout)
        _expect(reply, "GCP preempted", 200)
        parse_gcp_preempted(reply.body, time.time(), self.window)
        return True

    async def watch(self, emit: Emit, stopping: asyncio.Event) -> None:
        if stopping.is_set():
            return
        tasks = [
            asyncio.create_task(self._watch_preempted(emit)),
            asyncio.create_task(self._watch_maintenance(emit)),
            asyncio.create_task(stopping.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks[:2]:
            error = task.exception() if task in done and not task.cancelled() else None
            if error is not None:
                raise error

    def _take_preempted(self, reply: Reply, emit: Emit) -> str:
        _expect(reply, "GCP preempted", 200)
        etag = reply.headers.get("etag", "")
        if not etag or len(etag) > 256 or not etag.isprintable() or any(c.isspace() for c in etag):
            raise MetadataError(f"GCP preempted: no usable ETag ({etag[:40]!r})")
        notice = parse_gcp_preempted(reply.body, time.time(), self.window)
        if notice is not None and not self._preempted:
            emit(notice)
        self._preempted = notice is not None
        self.ok_replies += 1
        return etag

    async def _watch_preempted(self, emit: Emit) -> None:
        etag = self._take_preempted(await self._get(self.PREEMPTED_PATH), emit)
        while True:
            query = urllib.parse.urlencode(
                {"wait_for_change": "true", "last_etag": etag, "timeout_sec": str(self.hang_seconds)}
            )
            started = time.monotonic()
            reply = await self._get(f"{self.PREEMPTED_PATH}?{query}", self.hang_seconds + self.request_timeout)
            new_etag = self._take_preempted(reply, emit)
            if new_etag == etag and time.monotonic() - started < self.hang_seconds / 2:
                await asyncio.sleep(min(1.0, self.poll_seconds))  # a server that does not hang must not make us spin
            etag = new_etag

    async def _watch_maintenance(self, emit: Emit) -> None:
        while True:
            reply = await self._get(self.MAINTENANCE_PATH)
            _expect(reply, "GCP maintenance-event", 200)
            notice = parse_gcp_maintenance(reply.body, time.time(), self.window)
            value = notice.detail if notice is not None else None
            if notice is not None and value != self._maintenance:
                emit(notice)
            self._maintenance = value
            self.ok_replies += 1
            await asyncio.sleep(self.poll_seconds)


class AzureProvider(Provider):
    """Azure Scheduled Events: polls of the event document, reacting when its incarnation changes."""

    name = "azure"
    API_VERSION = "2020-07-01"
    EVENTS_PATH = f"/metadata/scheduledevents?api-version={API_VERSION}"
    NAME_PATH = "/metadata/instance/compute/name?api-version=2020-09-01&format=text"
    HEADERS: ClassVar[dict[str, str]] = {"Metadata": "true"}

    def __init__(
        self,
        base_url: str = DEFAULT_AZURE_URL,
        poll_seconds: float = 1.0,
        request_timeout: float = REQUEST_TIMEOUT,
        first_timeout: float = 120.0,
    ) -> None:
        super().__init__(base_url, request_timeout)
        self.poll_seconds = _positive("poll_seconds", poll_seconds)
        # The first request switches the service on and may take up to two minutes to answer.
        self.first_timeout = _positive("first_timeout", first_timeout)
        self.vm_name: str | None = None
        self._incarnation: int | None = None
        self._answered = False

    async def _learn_name(self, timeout: float | None = None) -> str:
        reply = await self._call("GET", self.NAME_PATH, dict(self.HEADERS), timeout=timeout)
        _expect(reply, "Azure compute name", 200)
        self.vm_name = _short_text(reply, "Azure compute name", limit=256)
        return self.vm_name

    async def _probe(self, timeout: float) -> bool:
        # The instance endpoint, not the events: the first events request may take minutes.
        await self._learn_name(timeout)
        return True

    async def watch(self, emit: Emit, stopping: asyncio.Event) -> None:
        if self.vm_name is None:
            try:
                await self._learn_name()
            except (ProviderError, MetadataError) as e:  # then every event is taken as ours
                log.debug("Azure compute name unknown (%s): events for other VMs are not filtered out", e)
        while not stopping.is_set():
            timeout = self.request_timeout if self._answered else max(self.first_timeout, self.request_timeout)
            reply = await self._call("GET", self.EVENTS_PATH, dict(self.HEADERS), timeout=timeout)
            _expect(reply, "Azure scheduled events", 200)
            incarnation, notices = parse_azure_events(reply.body, time.time(), self.vm_name)
            self._answered = True
            self.ok_replies += 1
            if incarnation != self._incarnation:  # the same incarnation holds the same events
                self._incarnation = incarnation
                for notice in notices:
                    emit(notice)
            if await pause(stopping, self.poll_seconds):
                return

    async def acknowledge(self, notice: Notice) -> None:
        """Approves the event now (POST ``StartRequests``), so the machine goes without waiting for NotBefore."""
        if notice.provider != self.name or not notice.event_id:
            return
        body = json.dumps({"StartRequests": [{"EventId": notice.event_id}]}).encode()
        headers = {**self.HEADERS, "Content-Type": "application/json"}
        reply = await self._call("POST", self.EVENTS_PATH, headers, body)
        if not 200 <= reply.status < 300:
            raise ProviderError("http_status", f"Azure acknowledge {notice.event_id}: HTTP {reply.status}")
