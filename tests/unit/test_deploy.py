"""Deployment files, checked statically (no Docker engine here): compose, Dockerfile, Prometheus, Grafana."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from node.metrics import StageMetrics
from node.monitoring import COMPOSE_METRICS_PORT, COMPOSE_NODES, compose_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "docker/grafana/dashboards/swarm-node.json"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
@pytest.mark.parametrize("profile", [[], ["--profile", "chaos"]])
def test_compose_file_is_valid(profile: list[str]) -> None:
    check = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *profile, "config", "-q"], capture_output=True, text=True, cwd=ROOT
    )
    assert check.returncode == 0, check.stderr


def test_compose_swarm_matches_the_monitoring_setup() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    nodes = [name for name in services if name.startswith("stage") or name == "spare"]
    assert tuple(nodes) == COMPOSE_NODES
    for name in nodes:
        command = services[name]["command"]
        assert f"--metrics-port={COMPOSE_METRICS_PORT}" in command
        assert "--initial-peers-file=/shared/bootstrap.maddrs" in command
        assert f"--announce-host={name}" in command
        assert services[name]["restart"] == "on-failure" and services[name]["init"] is True
    assert "--stage=auto" in services["spare"]["command"]
    assert "--maddr-file=/shared/bootstrap.maddrs" in services["dht"]["command"]
    assert services["chaos"]["profiles"] == ["chaos"]
    # the chaos profile may kill the block stages and the spare (which may serve one by then), never stage 0:
    # plain CheckFree cannot rebuild it
    assert sorted(n for n in nodes if services[n].get("labels", {}).get("swarm-node.chaos") == "victim") == [
        "spare", "stage1", "stage2", "stage3",
    ]  # fmt: skip


def test_dockerfile_lints_clean_and_installs_like_the_readme() -> None:
    dockerfile = ROOT / "docker/Dockerfile"
    text = dockerfile.read_text()
    assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
    assert "pip install -c constraints.txt ." in text
    for source in re.findall(r"^COPY (.+) \./?\S*$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (it comes with the test extras)")
    lint = subprocess.run([hadolint, "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_shipped_prometheus_config_is_the_generated_one() -> None:
    shipped = ROOT / "docker/prometheus/prometheus.yml"
    assert shipped.read_text() == compose_config()
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "config", str(shipped)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_dashboard_uses_the_provisioned_datasource_and_existing_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasources["datasources"][0]["uid"]
    provider = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/swarm-node.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    exported = {s.name for metric in StageMetrics().registry.collect() for s in metric.samples}
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"swarm_node_\w+", target["expr"]))
    assert used and not used - exported, sorted(used - exported)
    # what the issue asks the dashboard to show
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("loss", "throughput", "step time", "heartbeat", "recover", "rejected"):
        assert topic in titles, topic
