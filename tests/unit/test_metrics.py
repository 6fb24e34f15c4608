"""The /metrics endpoint (plain, TLS, client certificates, stalled connections) and the log-line limiter."""

from __future__ import annotations

import logging
import pathlib
import socket
import ssl
import time
import urllib.request

import pytest

from node.metrics import LogLimiter, StageMetrics
from node.security.keys import init_authority, issue_node

# ---- LogLimiter -------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(caplog):
    clock = FakeClock()
    log = logging.getLogger("test.limiter")
    caplog.set_level(logging.WARNING, logger="test.limiter")
    limiter = LogLimiter(log, 10.0, what="rejected", clock=clock, max_keys=3)

    def lines() -> list[str]:
        out = [r.getMessage() for r in caplog.records if r.name == "test.limiter"]
        caplog.clear()
        return out

    return limiter, clock, lines


def test_one_line_per_key_and_interval_then_a_summary(limited) -> None:
    limiter, clock, lines = limited
    assert limiter.log("stale_step", "rejected: %s", "first")
    for i in range(5):
        clock.now += 1.0
        assert not limiter.log("stale_step", "rejected: %s", i)
    assert limiter.log("bad_shape", "rejected: %s", "other reason")  # each key has its own interval
    assert lines() == ["rejected: first", "rejected: other reason"]
    clock.now += 5.5  # 10.5 s after the first line
    assert limiter.log("stale_step", "rejected: %s", "again")
    assert lines() == ["… and 5 more rejected (stale_step) in the last 10 s", "rejected: again"]


def test_flush_sums_up_what_was_held_back_once_the_interval_is_over(limited) -> None:
    limiter, clock, lines = limited
    limiter.log("k", "line")
    limiter.log("k", "line")
    limiter.log("k", "line")
    limiter.flush()  # the interval is not over: nothing yet
    assert lines() == ["line"]
    clock.now += 12.0
    limiter.flush()
    limiter.flush()  # said once
    assert lines() == ["… and 2 more rejected (k) in the last 12 s"]
    limiter.log("k", "line")  # the summary started a new interval
    clock.now += 10.0
    limiter.log("k", "line")
    assert lines() == ["… and 1 more rejected (k) in the last 10 s", "line"]


def test_keys_beyond_the_cap_share_one(limited) -> None:
    limiter, clock, lines = limited
    for key in ("a", "b", "c", "d", "e"):
        limiter.log(key, "line %s", key)
    assert lines() == ["line a", "line b", "line c", "line d"]  # d and e share the key "other"
    clock.now += 11.0
    limiter.log("f", "line %s", "f")  # after the interval, quiet keys are forgotten and make room
    assert lines() == ["… and 1 more rejected (other) in the last 11 s", "line f"]


# ---- the /metrics endpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("pki")
    init_authority(root / "ca")
    init_authority(root / "rogue")
    return {
        "server": issue_node(root / "ca", "metrics-node"),
        "scraper": issue_node(root / "ca", "prometheus"),
        "rogue": issue_node(root / "rogue", "prometheus"),
    }


def _client_context(ca: pathlib.Path, bundle: pathlib.Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if bundle is not None:
        ctx.load_cert_chain(bundle / "node.pem", bundle / "node.key")
    return ctx


def _scrape(port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> str:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname="metrics-node") as tls,
    ):
        tls.sendall(b"GET /metrics HTTP/1.0\r\nHost: metrics-node\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data.decode()


@pytest.fixture
def tls_metrics(pki):
    metrics = StageMetrics()
    server = pki["server"]
    port = metrics.serve(
        0, "127.0.0.1", certfile=server / "node.pem", keyfile=server / "node.key", client_cafile=server / "ca.pem"
    )
    yield metrics, port
    metrics.close()


def test_a_scrape_with_a_swarm_client_certificate_works(pki, tls_metrics) -> None:
    metrics, port = tls_metrics
    metrics.committed_step.set(7)
    body = _scrape(port, _client_context(pki["server"] / "ca.pem", pki["scraper"]))
    assert body.startswith("HTTP/1.0 200") and "swarm_node_committed_step 7.0" in body


@pytest.mark.parametrize("client", [None, "rogue"])
def test_a_scrape_without_a_swarm_certificate_gets_nothing(pki, tls_metrics, client) -> None:
    _, port = tls_metrics
    ctx = _client_context(pki["server"] / "ca.pem", pki[client] if client else None)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        _scrape(port, ctx)


def test_plain_http_is_refused_by_a_tls_endpoint(tls_metrics) -> None:
    _, port = tls_metrics
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def test_stalled_connections_do_not_block_the_next_scrape(pki, tls_metrics) -> None:
    metrics, port = tls_metrics

    def connect() -> socket.socket:  # from another host than the scraper (all of 127/8 is loopback)
        return socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))

    stalled = [connect() for _ in range(20)]  # TCP only, no handshake: 8 held, the rest closed at once
    half = connect()  # a handshake begun, never finished
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    hello = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="metrics-node")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    half.sendall(outgoing.read())  # the ClientHello, and then silence
    try:
        for _ in range(3):
            started = time.monotonic()
            body = _scrape(port, _client_context(pki["server"] / "ca.pem", pki["scraper"]))
            assert "swarm_node_committed_step" in body
            assert time.monotonic() - started < 2.5  # a blocked server would take the 5 s handshake timeout
        assert metrics.server.refused_connections >= 12
    finally:
        for s in [*stalled, half]:
            s.close()


def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(pki) -> None:
    metrics = StageMetrics()
    server = pki["server"]
    port = metrics.serve(0, "127.0.0.1", certfile=server / "node.pem", keyfile=server / "node.key")
    metrics.server.timeout_seconds = 0.3
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
            assert idle.recv(1) == b""  # the server gave up on the handshake and closed it
        body = _scrape(port, _client_context(server / "ca.pem", None))  # no client CA: any TLS client
        assert "swarm_node_committed_step" in body
    finally:
        metrics.close()


def test_plain_http_by_default_and_tls_options_are_checked(pki) -> None:
    metrics = StageMetrics()
    port = metrics.serve(0, "127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'swarm_node_rejected_messages_total{reason="busy"} 0.0' in body
    finally:
        metrics.close()
    with pytest.raises(ValueError, match="both"):
        StageMetrics().serve(0, "127.0.0.1", certfile=pki["server"] / "node.pem")
    with pytest.raises(ValueError, match="client CA"):
        StageMetrics().serve(0, "127.0.0.1", client_cafile=pki["server"] / "ca.pem")
