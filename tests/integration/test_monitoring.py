"""A real Prometheus server scrapes a local swarm: every node is up, every dashboard expression has data,
every daemon's exposition passes ``promtool check metrics``, and a recovery moves the recovery metrics.

Needs Debian's ``prometheus`` package (the README's test command installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import REPO, wait_for

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        PROMETHEUS is None or PROMTOOL is None,
        reason="prometheus/promtool not installed (the README's test command installs Debian's prometheus)",
    ),
]
DASHBOARD = pathlib.Path(REPO) / "docker/grafana/dashboards/swarm-node.json"


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.get("query", query=expr)["result"]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """wait_for, riding out a Prometheus that is still starting (connection refused, empty results)."""
    return wait_for(predicate, timeout, what, interval=1.0, ignore=(OSError, KeyError, IndexError, ValueError))


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher tears its swarm down on SIGTERM
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PromAPI, pathlib.Path]]:
    tmp = tmp_path_factory.mktemp("monitoring")
    promdir = tmp / "prometheus"
    swarm = subprocess.Popen(
        [sys.executable, "-m", "node", "local", "--stages", "4", "--steps", "400", "--spares", "1",
         "--kill", "2@35", "--eval-every", "5", "--workdir", str(tmp / "swarm"), "--quiet",
         "--prometheus-dir", str(promdir)],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        config = poll(lambda: (promdir / "prometheus.yml").exists() and promdir / "prometheus.yml", 60, "config")
        # the test scrapes every second (the shipped default is 5 s)
        config.write_text(config.read_text().replace("scrape_interval: 5s", "scrape_interval: 1s"))
        port = _free_port()
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        yield PromAPI(port), promdir
    finally:
        if prometheus is not None:
            _stop(prometheus)
        _stop(swarm)


def _active_targets(api: PromAPI) -> list[dict[str, Any]]:
    return [t for t in api.get("targets")["activeTargets"] if t["labels"].get("job") == "swarm-node"]


@pytest.mark.timeout(420)
def test_prometheus_sees_every_node_and_the_dashboard_has_data(monitored: tuple[PromAPI, pathlib.Path]) -> None:
    api, promdir = monitored
    for config in (promdir / "prometheus.yml", pathlib.Path(REPO) / "docker/prometheus/prometheus.yml"):
        check = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

    # 4 stages and the spare, all up
    def all_up() -> list[dict[str, Any]] | None:
        targets = _active_targets(api)
        return targets if len(targets) == 5 and all(t["health"] == "up" for t in targets) else None

    targets = poll(all_up, 150, "5 scraped nodes, all up")
    assert {t["labels"]["node"] for t in targets} >= {"stage0", "stage1", "stage2", "stage3"}
    # each daemon's exposition passes promtool's linter
    for t in targets:
        exposition = urllib.request.urlopen(t["scrapeUrl"], timeout=10).read()
        lint = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True)
        assert lint.returncode == 0, (t["labels"]["node"], lint.stdout.decode() + lint.stderr.decode())

    # stage 2 is SIGKILLed in step 35 and the spare rebuilds it: the recovery metrics move
    poll(lambda: api.value('sum(swarm_node_recoveries_total{method="checkfree"})') >= 1, 240, "a recovery")
    assert api.value("sum(swarm_node_recovery_seconds_count)") >= 1
    assert api.value("sum(swarm_node_recovery_seconds_sum)") > 0
    assert api.value("sum(swarm_node_rebuild_seconds_count)") >= 1
    assert api.value("sum(swarm_node_recovery_fetched_bytes_total)") > 0
    assert api.value("sum(swarm_node_failure_detection_seconds_count)") >= 1
    assert api.value("sum(swarm_node_failures_detected_total)") >= 1
    # the dead node leaves the targets; every node still scraped is up
    poll(
        lambda: len(_active_targets(api)) == 4 and all(t["health"] == "up" for t in _active_targets(api)),
        60,
        "the killed node to leave the targets",
    )
    poll(lambda: api.value("max(swarm_node_committed_step)") >= 40, 120, "training to go on")
    # every expression of the Grafana dashboard returns data
    empty = [expr for expr in dashboard_exprs() if not api.query(expr)]
    assert not empty, empty
