"""``swarm-node local --prometheus-dir``: the same scrape job as docker compose's, discovering the local
daemons from ``targets.json``, which is kept current as nodes die and replacements start."""

from __future__ import annotations

import pathlib

from node.local.children import HOST, SWARM, Child, present
from node.wire.records import StageRecord


class PrometheusTargets:
    """Writes ``prometheus.yml`` and ``targets.json`` into ``directory``; the latter only when it changes."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self._written: set[tuple[str, str]] | None = None  # as last written to targets.json

    def write_config(self) -> None:
        from node.monitoring import prometheus_config

        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "prometheus.yml").write_text(prometheus_config(SWARM), encoding="utf-8")
        self.update([], [])

    def update(self, records: list[StageRecord], children: list[Child]) -> None:
        """Targets: the metrics port of every node in ``records`` that is one of our live ``children``."""
        from node.monitoring import TARGETS_FILE, write_targets

        names = {c.proc.pid: c.name for c in children if c.proc.poll() is None}
        targets = {
            (names[r.pid], f"{HOST}:{r.metrics_port}") for r in present(records) if r.metrics_port and r.pid in names
        }
        if targets != self._written:
            write_targets(self.directory / TARGETS_FILE, SWARM, targets)
            self._written = targets
