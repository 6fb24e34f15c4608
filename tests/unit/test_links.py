"""The emulated wide-area link of ``local --link-rtt-ms/--link-mbit``: its clock, and a real proxy on loopback."""

from __future__ import annotations

import asyncio
import pathlib
import time

import pytest

from node.local.links import Direction, EmulatedLinks, LinkProxy, LinkShape, free_port


def test_a_direction_serializes_chunks_at_its_rate_and_delivers_them_half_a_round_trip_later() -> None:
    link = Direction(LinkShape(rtt_ms=20, mbit=8))  # 1 MB/s: 1,000 bytes take 1 ms
    assert link.arrival(1000, now=5.0) == pytest.approx(5.001 + 0.010)
    assert link.arrival(1000, now=5.0) == pytest.approx(5.002 + 0.010)  # queued behind the first
    assert link.backlog(5.0005) == pytest.approx(0.0015)  # wire time queued: what the proxy's buffer bounds
    assert link.arrival(1000, now=7.0) == pytest.approx(7.001 + 0.010)  # an idle link starts at once
    assert link.backlog(8.0) == 0.0
    unlimited = Direction(LinkShape(rtt_ms=4))
    assert unlimited.arrival(10**9, now=1.0) == pytest.approx(1.002)
    with pytest.raises(ValueError):
        LinkShape(rtt_ms=-1)
    assert not LinkShape().emulated and LinkShape(mbit=1).emulated


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _round_trip(port: int, payload: bytes) -> tuple[float, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(payload)
    await writer.drain()
    got = await reader.readexactly(len(payload))
    elapsed = time.monotonic() - started
    writer.close()
    await writer.wait_closed()
    return elapsed, got


async def test_a_proxy_adds_its_round_trip_and_holds_a_transfer_to_its_rate() -> None:
    server, port = await _echo_server()
    proxy = LinkProxy(("127.0.0.1", port), LinkShape(rtt_ms=40, mbit=20))  # 2.5 MB/s each way
    front = await proxy.start("127.0.0.1")
    try:
        direct, _ = await _round_trip(port, b"x")
        small, got = await _round_trip(front, b"ping")
        assert got == b"ping" and small >= 0.040 > direct  # one round trip: half each way
        payload = bytes(range(256)) * 2048  # 512 KiB: at least 0.21 s in each direction
        large, got = await _round_trip(front, payload)
        assert got == payload  # in order, whole
        assert large >= len(payload) * 8 / 20e6 + 0.040
    finally:
        await proxy.close()
        server.close()
        await server.wait_closed()


def test_emulated_links_put_a_proxy_in_front_of_each_node_and_close() -> None:
    async def serve() -> tuple[asyncio.Server, int]:
        return await _echo_server()

    links = EmulatedLinks(LinkShape(rtt_ms=10), "127.0.0.1")
    try:
        server, port = asyncio.run_coroutine_threadsafe(serve(), links.loop).result(timeout=10)
        front = links.add(port)
        assert front != port
        elapsed, got = asyncio.run(_round_trip(front, b"hello"))
        assert got == b"hello" and elapsed >= 0.010
        links.loop.call_soon_threadsafe(server.close)
    finally:
        links.close()
    assert not links.thread.is_alive()


def test_a_free_port_for_a_node_is_drawn_below_the_ephemeral_range_and_is_free() -> None:
    import random
    import socket

    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port("127.0.0.1", random.Random(seed)) for seed in range(5)}
    assert all(10000 <= p < low for p in ports)
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free
