"""Emulated wide-area links for a local swarm (``local --link-rtt-ms``, ``--link-mbit``).

Each node's gRPC port gets a userspace proxy in front of it; the node announces the proxy's port
(``--announce-port``), so every call another node makes to it, and every reply, crosses the proxy. In each
direction the proxy delays every chunk by half the round-trip time and lets it through no faster than the
link's rate (one serializer per direction, shared by all connections to that node, as one VM's link is).
Chunks are delivered in order, and reading goes on while earlier chunks wait: a link holds its
bandwidth-delay product in flight, as a real one does. ``tc netem`` would do this in the kernel, but it is
not available on every machine (``tbf``/``htb`` shape rate only); the DHT's traffic is not proxied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024  # bytes read at a time
IN_FLIGHT = 512  # chunks queued per connection and direction before reading pauses (32 MiB)


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
    try:
        while chunk := await reader.read(CHUNK):
            await queue.put((link.arrival(len(chunk), time.monotonic()), chunk))
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

    async def start(self, host: str) -> int:
        self.server = await asyncio.start_server(self._connection, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
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
        await asyncio.sleep(0)  # the pumps see their connections closed and end


class EmulatedLinks:
    """Every node's proxy, served by one event loop on a thread of the launcher."""

    def __init__(self, shape: LinkShape, host: str) -> None:
        self.shape, self.host = shape, host
        self.proxies: list[LinkProxy] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="emulated-links", daemon=True)
        self.thread.start()

    def add(self, node_port: int) -> int:
        """A proxy in front of ``node_port``; returns the port other nodes are to use."""
        proxy = LinkProxy((self.host, node_port), self.shape)
        port = asyncio.run_coroutine_threadsafe(proxy.start(self.host), self.loop).result(timeout=10)
        self.proxies.append(proxy)
        return port

    def close(self) -> None:
        async def stop() -> None:
            for proxy in self.proxies:
                await proxy.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (the node binds it moments later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
