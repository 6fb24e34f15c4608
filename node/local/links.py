"""Emulated wide-area links for a local swarm (``local --link-rtt-ms``, ``--link-mbit``).

Each node's gRPC port gets a userspace proxy in front of it; the node announces the proxy's port
(``--announce-port``), so every call another node makes to it, and every reply, crosses the proxy. In each
direction the proxy delays every chunk by half the round-trip time and lets it through no faster than the
link's rate: one serializer per direction, shared by all connections to that node, so the rate holds what
reaches a node and what it answers (its own calls to others are held by their proxies). Chunks are
delivered in order, and reading goes on while earlier chunks wait, up to a queue of one round trip of wire
time (a router's buffer); beyond it the proxy stops reading and TCP holds the sender back. ``tc netem``
would do this in the kernel, but it is not available on every machine (``tbf``/``htb`` shape rate only);
the DHT's traffic is not proxied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import random
import socket
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024  # bytes read at a time
IN_FLIGHT = 512  # chunks queued per connection and direction before reading pauses (32 MiB)
RECEIVE_BUFFER = 256 * 1024  # bytes the kernel holds for the proxy on each socket
MIN_QUEUE_SECONDS = 0.005  # the queue of a link with a round trip shorter than this


@dataclass(frozen=True)
class LinkShape:
    """One emulated link: its round-trip time and its rate in each direction (0: unlimited)."""

    rtt_ms: float = 0.0
    mbit: float = 0.0

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.mbit < 0:
            raise ValueError(f"a link's RTT and rate cannot be negative (rtt {self.rtt_ms} ms, {self.mbit} Mbit/s)")

    @property
    def emulated(self) -> bool:
        return self.rtt_ms > 0 or self.mbit > 0

    def serialize_seconds(self, nbytes: int) -> float:
        """Time to put ``nbytes`` on the wire at the link's rate."""
        return nbytes * 8 / (self.mbit * 1e6) if self.mbit else 0.0


class Direction:
    """One direction of a node's link: chunks leave it one after another at the link's rate, each arriving
    half a round trip after it has been put on the wire."""

    def __init__(self, shape: LinkShape) -> None:
        self.shape = shape
        self.free_at = 0.0  # when the wire is free for the next chunk

    def backlog(self, now: float) -> float:
        """Seconds of wire time queued ahead of a chunk handed to the link at ``now``."""
        return max(0.0, self.free_at - now)

    def arrival(self, nbytes: int, now: float) -> float:
        """When a chunk of ``nbytes`` handed to the link at ``now`` arrives at the far end."""
        start = max(now, self.free_at)
        self.free_at = start + self.shape.serialize_seconds(nbytes)
        return self.free_at + self.shape.rtt_ms / 2000


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Direction) -> None:
    """Copies ``reader`` to ``writer`` through ``link``: a reader task stamps each chunk with its arrival time,
    a writer task delivers it then."""
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(IN_FLIGHT)

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            due, chunk = item
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    queue_limit = max(MIN_QUEUE_SECONDS, link.shape.rtt_ms / 1000)
    try:
        while chunk := await reader.read(CHUNK):
            while (backlog := link.backlog(time.monotonic())) > queue_limit and not delivering.done():
                await asyncio.sleep(backlog - queue_limit)  # a full buffer: TCP holds the sender back
            if delivering.done():  # the far end went away: so does this direction
                break
            await queue.put((link.arrival(len(chunk), time.monotonic()), chunk))
        if not delivering.done():
            await queue.put(None)
        await delivering
    finally:
        delivering.cancel()
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


class LinkProxy:
    """The proxy in front of one node: connections to ``port`` go on to ``upstream`` through the link."""

    def __init__(self, upstream: tuple[str, int], shape: LinkShape) -> None:
        self.upstream, self.shape = upstream, shape
        self.inbound, self.outbound = Direction(shape), Direction(shape)  # to the node, and its replies
        self.server: asyncio.Server | None = None
        self.port = 0
        self.open: set[asyncio.StreamWriter] = set()  # both ends of every connection now open
        self.tasks: set[asyncio.Task[None]] = set()  # one per connection

    async def start(self, host: str) -> int:
        self.server = await asyncio.start_server(self._connection, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        try:
            node_r, node_w = await asyncio.open_connection(*self.upstream)
        except OSError:  # the node is not listening (yet, or any more): the caller sees a refused call
            client_w.close()
            return
        for w in (client_w, node_w):
            self.open.add(w)
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # loopback's autotuned buffers hold megabytes: a sender held back by the link waits here, not
                # in a kernel queue far longer than a real path's
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        try:
            await asyncio.gather(_pump(client_r, node_w, self.inbound), _pump(node_r, client_w, self.outbound))
        except (ConnectionError, OSError):
            pass  # a peer went away: so does the connection, as on a real link
        finally:
            for w in (client_w, node_w):
                self.open.discard(w)
                w.close()

    async def close(self) -> None:
        """Stops accepting and drops every open connection."""
        if self.server is not None:
            self.server.close()
        for w in list(self.open):
            w.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


class EmulatedLinks:
    """Every node's proxy, served by one event loop on a thread of the launcher."""

    def __init__(self, shape: LinkShape, host: str) -> None:
        self.shape, self.host = shape, host
        self.proxies: dict[int, LinkProxy] = {}  # by the port it listens on
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="emulated-links", daemon=True)
        self.thread.start()

    def add(self, node_port: int) -> int:
        """A proxy in front of ``node_port``; returns the port other nodes are to use."""
        proxy = LinkProxy((self.host, node_port), self.shape)
        port = asyncio.run_coroutine_threadsafe(proxy.start(self.host), self.loop).result(timeout=10)
        self.proxies[port] = proxy
        return port

    def drop(self, port: int) -> None:
        """Closes the proxy on ``port`` (its node is gone: callers see it refuse, as they would the node)."""
        proxy = self.proxies.pop(port, None)
        if proxy is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(proxy.close(), self.loop).result(timeout=5)

    def close(self) -> None:
        async def stop() -> None:
            await asyncio.gather(*(proxy.close() for proxy in self.proxies.values()), return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


def free_port(host: str, rng: random.Random | None = None) -> int:
    """A TCP port free on ``host`` now, for a node to bind seconds later. It is drawn below the ephemeral range,
    where no ``bind(0)`` of another process (a DHT, a p2pd, a proxy) can take it in the meantime."""
    rng = rng or random.Random()
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    for _ in range(100):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # taken: draw again
            return port
    with socket.socket() as s:  # nothing free down there: any port
        s.bind((host, 0))
        return s.getsockname()[1]
