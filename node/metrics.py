"""Prometheus metrics of one daemon (prefix ``swarm_node_``; no unbounded label values), their HTTP(S)
endpoint, and a rate limiter for log lines that outsiders can trigger.

Every label takes values from a fixed set (direction, side, reason, method, result), and each series is
created at start-up with value 0, so that rates and dashboards have data before the first event.

The ``/metrics`` endpoint serves each connection in its own thread, with a time limit and a cap on open
connections, over plain HTTP or TLS (optionally requiring a client certificate from a given CA). The TLS
handshake runs in the connection's thread under the same time limit: prometheus_client's own TLS server
does it inside ``accept()``, where one stalled connection blocks every later scrape.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

logger = logging.getLogger(__name__)


class StageMetrics:
    """Every metric a stage daemon exports, on its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.server: MetricsServer | None = None
        self.info = Info("swarm_node_stage", "Stage identity", registry=r)
        self.committed_step = Gauge("swarm_node_committed_step", "Steps committed on this stage", registry=r)
        self.loss = Gauge(
            "swarm_node_training_loss", "Mean training loss of the last committed step (stage 0)", registry=r
        )
        self.validation_loss = Gauge(
            "swarm_node_validation_loss",
            "Held-out loss of the committed weights at the last evaluation (stage 0)",
            registry=r,
        )
        self.microbatches = Counter(
            "swarm_node_microbatches_total", "Microbatches processed", ["direction"], registry=r
        )
        self.tokens = Counter("swarm_node_tokens_total", "Tokens trained on in committed steps (stage 0)", registry=r)
        self.throughput = Gauge(
            "swarm_node_throughput_microbatches_per_second",
            "Microbatches per second this peer computes, forward and backward (as announced for routing)",
            registry=r,
        )
        self.microbatches_routed = Counter(
            "swarm_node_microbatches_routed_total",
            "Microbatches stage 0 routed to each peer of each stage (several peers per stage)",
            ["stage", "peer"],
            registry=r,
        )
        self.compute_seconds = Histogram(
            "swarm_node_compute_seconds",
            "Compute time per microbatch",
            ["direction"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.transfer_seconds = Histogram(
            "swarm_node_transfer_seconds",
            "Time to receive one tensor stream from a neighbour (call start to last chunk decoded)",
            ["direction"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.bytes_sent = Counter("swarm_node_sent_bytes_total", "Tensor bytes sent", ["direction"], registry=r)
        self.bytes_received = Counter(
            "swarm_node_received_bytes_total", "Tensor bytes received", ["direction"], registry=r
        )
        self.step_seconds = Histogram(
            "swarm_node_step_seconds",
            "Time between this stage's consecutive commits (its step time, gaps between steps included)",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.steps_aborted = Counter("swarm_node_steps_aborted_total", "Steps aborted and replayed", registry=r)
        self.rejected = Counter("swarm_node_rejected_messages_total", "Messages refused", ["reason"], registry=r)
        self.malformed_records = Counter(
            "swarm_node_malformed_dht_records_total", "DHT records ignored as malformed", registry=r
        )
        self.failures_detected = Counter(
            "swarm_node_failures_detected_total", "Neighbour peers found dead (failed RPC or heartbeat)", registry=r
        )
        self.heartbeat_rtt = Histogram(
            "swarm_node_heartbeat_rtt_seconds",
            "Heartbeat round-trip time",
            ["side"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.recoveries = Counter("swarm_node_recoveries_total", "Stage rebuilds by method", ["method"], registry=r)
        self.recovery_fetched_bytes = Counter(
            "swarm_node_recovery_fetched_bytes_total", "Bytes of neighbour weights fetched to rebuild", registry=r
        )
        self.failure_detection_seconds = Histogram(
            "swarm_node_failure_detection_seconds",
            "Time from a neighbour's last successful heartbeat or RPC to finding it dead",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.recovery_seconds = Histogram(
            "swarm_node_recovery_seconds",
            "Time for a replacement from claiming a stage to holding its rebuilt weights",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.rebuild_seconds = Histogram(
            "swarm_node_rebuild_seconds",
            "Time to fetch and rebuild a stage's weights",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.replica_bytes_sent = Counter(
            "swarm_node_replica_sent_bytes_total", "Bytes of stage-0 copies sent (checkfree+, stage 0)", registry=r
        )
        self.replica_bytes_held = Gauge(
            "swarm_node_replica_held_bytes", "Bytes of stage-0 copies held (checkfree+, stages 1 and S-1)", registry=r
        )
        self.stages_online = Gauge("swarm_node_stages_online", "Stages with a serving peer in the DHT", registry=r)
        # Checkpoint strategy (--recovery checkpoint); zero elsewhere.
        self.checkpoint_writes = Counter(
            "swarm_node_checkpoint_writes_total", "Checkpoint writes by result", ["result"], registry=r
        )
        self.checkpoint_snapshot_seconds = Histogram(
            "swarm_node_checkpoint_snapshot_seconds",
            "Time the training path is blocked taking an in-memory checkpoint snapshot",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.checkpoint_write_seconds = Histogram(
            "swarm_node_checkpoint_write_seconds",
            "Time to write one checkpoint to disk in the background",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.checkpoint_bytes = Counter(
            "swarm_node_checkpoint_written_bytes_total", "Bytes of checkpoints written", registry=r
        )
        self.checkpoint_step = Gauge(
            "swarm_node_checkpoint_step", "Step of the latest durable checkpoint on this stage", registry=r
        )
        # Neighbour snapshots (--recovery ladder); zero elsewhere.
        self.neighbour_snapshots = Counter(
            "swarm_node_neighbour_snapshots_total",
            "Neighbour snapshots this stage sent to its snapshot holder, by result (skipped: one still in flight)",
            ["result"],
            registry=r,
        )
        self.neighbour_snapshot_bytes = Counter(
            "swarm_node_neighbour_snapshot_sent_bytes_total", "Bytes of neighbour snapshots sent", registry=r
        )
        self.neighbour_snapshot_seconds = Histogram(
            "swarm_node_neighbour_snapshot_seconds",
            "Time from a commit to its neighbour snapshot held by the holder (in the background)",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.neighbour_snapshots_held = Gauge(
            "swarm_node_neighbour_snapshots_held", "Neighbour snapshots of other stages held here", registry=r
        )
        # Swarm snapshots (--snapshot-to): stage 0 seals them; zero elsewhere.
        self.snapshot_step = Gauge(
            "swarm_node_snapshot_step", "Step of the newest complete swarm snapshot this node sealed", registry=r
        )
        self.snapshot_seals = Counter(
            "swarm_node_snapshot_seals_total", "Swarm snapshots sealed or given up, by result", ["result"], registry=r
        )
        self.rollbacks = Counter("swarm_node_rollbacks_total", "Rollbacks of this stage to a checkpoint", registry=r)
        self.dht_rejected = Counter(
            "swarm_node_dht_rejected_total",
            "DHT requests (no or bad token, bad signature, replay) and records (unsigned, forged) this node refused",
            ["kind"],
            registry=r,
        )
        self.notices = Counter(
            "swarm_node_preemption_notices_total",
            "Preemption notices (provider aws/gcp/azure/signal; kind terminate/rebalance)",
            ["provider", "kind"],
            registry=r,
        )
        self.metadata_errors = Counter(
            "swarm_node_metadata_errors_total",
            "Metadata-service replies that broke its protocol, or that never came",
            ["provider"],
            registry=r,
        )
        self.handoffs = Counter(
            "swarm_node_handoffs_total",
            "Stages this node handed over on a notice (handed_over; to_replica: another replica carries it on; "
            "parked: left with a neighbour; missed_deadline)",
            ["result"],
            registry=r,
        )
        self.nudges = Counter(
            "swarm_node_nudges_total",
            "Heartbeats asking this node to re-read the DHT now (woke; dropped: too soon after the last)",
            ["result"],
            registry=r,
        )
        self.handoff_seconds = Histogram(
            "swarm_node_handoff_seconds",
            "Notice to successor serving, on the node handed over from",
            registry=r,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120),
        )

        # not measured on this node (yet): NaN, so that a dashboard shows no line instead of a loss of 0
        self.loss.set(float("nan"))
        self.validation_loss.set(float("nan"))
        self._create_series()

    def _create_series(self) -> None:
        from node.recovery.planner import Method
        from node.stage.runtime import Reject

        for direction in ("forward", "backward"):
            for labelled in (self.microbatches, self.compute_seconds, self.transfer_seconds, self.bytes_sent):
                labelled.labels(direction=direction)
            self.bytes_received.labels(direction=direction)
        for side in ("prev", "next"):
            self.heartbeat_rtt.labels(side=side)
        for reason in Reject:
            self.rejected.labels(reason=reason.value)
        for method in Method:
            if method != Method.UNRECOVERABLE:
                self.recoveries.labels(method=method.value)
        for result in ("ok", "failed"):
            self.checkpoint_writes.labels(result=result)
        for result in ("ok", "failed", "skipped"):
            self.neighbour_snapshots.labels(result=result)
            self.snapshot_seals.labels(result=result)
        for result in ("handed_over", "parked", "missed_deadline"):
            self.handoffs.labels(result=result)
        for provider in ("aws", "gcp", "azure", "signal"):
            for kind in ("terminate", "rebalance"):
                self.notices.labels(provider=provider, kind=kind)
            if provider != "signal":
                self.metadata_errors.labels(provider=provider)

    def serve(
        self,
        port: int,
        host: str,
        *,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        client_cafile: str | os.PathLike[str] | None = None,
    ) -> int:
        """Starts the /metrics server on ``host:port``; returns the bound port (``port`` 0 picks a free one).

        With ``certfile`` and ``keyfile`` it speaks HTTPS only; with ``client_cafile`` as well, a scraper
        must present a certificate issued by that CA."""
        ctx = tls_context(certfile, keyfile, client_cafile)
        server = self.server = MetricsServer(host, port, make_wsgi_app(self.registry), ctx)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return int(server.server_port)

    def close(self) -> None:
        """Stops the /metrics server (if serving)."""
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def tls_context(
    certfile: str | os.PathLike[str] | None,
    keyfile: str | os.PathLike[str] | None,
    client_cafile: str | os.PathLike[str] | None,
) -> ssl.SSLContext | None:
    """The server TLS context of the metrics endpoint (None: plain HTTP); TLS 1.2 at least."""
    if (certfile is None) != (keyfile is None):
        raise ValueError("metrics TLS needs both a certificate and its key")
    if certfile is None:
        if client_cafile is not None:
            raise ValueError("a client CA for metrics needs a server certificate and key")
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if client_cafile is not None:
        ctx.load_verify_locations(client_cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _QuietHandler(WSGIRequestHandler):
    """Logs nothing (the connection's time limit is already set on its socket)."""

    timeout = None

    def log_message(self, format, *args) -> None:
        pass


class MetricsServer(ThreadingWSGIServer):
    """Serves a WSGI app, one thread per connection, each with a ``timeout`` on the TLS handshake and on
    every read and write. At most ``max_connections`` are open at once, and ``max_per_address`` from one
    client address, so that a few idle connections from one host cannot crowd out the scraper; more are
    closed at once."""

    request_queue_size = 128  # the listen backlog (socketserver's 5 drops connections in a burst)

    def __init__(
        self,
        host: str,
        port: int,
        app: Callable,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
        max_connections: int = 128,
        max_per_address: int = 8,
    ) -> None:
        self.address_family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self.ssl_context, self.timeout_seconds = ssl_context, timeout
        self.max_connections, self.max_per_address = max_connections, max_per_address
        self._open: dict[str, int] = {}  # client address -> open connections
        self._lock = threading.Lock()
        self.refused_connections = 0  # handshakes failed or timed out, and connections over a cap
        super().__init__((sockaddr[0], port), _QuietHandler)
        self.set_app(app)

    def process_request(self, request, client_address) -> None:
        host = client_address[0]
        with self._lock:
            full = sum(self._open.values()) >= self.max_connections
            if full or self._open.get(host, 0) >= self.max_per_address:
                self.refused_connections += 1
                admitted = False
            else:
                self._open[host] = self._open.get(host, 0) + 1
                admitted = True
        if not admitted:
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._closed(host)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed(client_address[0])

    def _closed(self, host: str) -> None:
        with self._lock:
            left = self._open.pop(host) - 1
            if left:
                self._open[host] = left

    def finish_request(self, request, client_address) -> None:  # on the connection's thread
        request.settimeout(self.timeout_seconds)
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)  # the handshake, under the timeout
        except (ssl.SSLError, OSError):
            self.refused_connections += 1
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


class LogLimiter:
    """At most one log line per key (e.g. a rejection reason) every ``interval`` seconds. Lines held back
    are counted and summed up in one line, "… and K more <what> (<key>) in the last N s", when the key
    logs again after its interval, or when :meth:`flush` finds the interval over. Keys should come from a
    fixed set; beyond ``max_keys`` distinct keys, new ones share the key ``other``."""

    def __init__(
        self,
        log: logging.Logger,
        interval: float = 10.0,
        *,
        what: str = "rejected",
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 64,
    ) -> None:
        self.log_to, self.interval, self.what, self.level, self.clock = log, interval, what, level, clock
        self.max_keys = max_keys
        self._windows: dict[str, list] = {}  # key -> [start of the window, lines held back]
        self._lock = threading.Lock()

    def log(self, key: str, msg: str, *args: object) -> bool:
        """Logs ``msg % args`` unless ``key`` logged within the interval; returns whether it was logged."""
        with self._lock:
            now = self.clock()
            if key not in self._windows and len(self._windows) >= self.max_keys:
                self._flush(now, forget=True)
                if len(self._windows) >= self.max_keys:
                    key = "other"
            window = self._windows.get(key)
            if window is not None and now - window[0] < self.interval:
                window[1] += 1
                return False
            if window is not None and window[1]:
                self._summary(key, window, now)
            self._windows[key] = [now, 0]
        self.log_to.log(self.level, msg, *args, stacklevel=2)  # names the caller's line
        return True

    def flush(self) -> None:
        """Writes the summary of every key whose interval is over and that held lines back."""
        with self._lock:
            self._flush(self.clock(), forget=False)

    def _flush(self, now: float, forget: bool) -> None:
        for key, window in list(self._windows.items()):
            if now - window[0] < self.interval:
                continue
            if window[1]:
                self._summary(key, window, now)
                self._windows[key] = [now, 0]
            elif forget:
                del self._windows[key]

    def _summary(self, key: str, window: list, now: float) -> None:
        self.log_to.log(
            self.level, "… and %d more %s (%s) in the last %.0f s", window[1], self.what, key, now - window[0]
        )
