"""Prometheus metrics of one daemon (prefix ``swarm_node_``; no unbounded label values).

Every label takes values from a fixed set (direction, side, reason, method, result), and each series is
created at start-up with value 0, so that rates and dashboards have data before the first event."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server


class StageMetrics:
    """Every metric a stage daemon exports, on its own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
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
        self.rollbacks = Counter("swarm_node_rollbacks_total", "Rollbacks of this stage to a checkpoint", registry=r)

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

    def serve(self, port: int, host: str) -> int:
        """Starts the /metrics HTTP server; returns the bound port (``port`` 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
