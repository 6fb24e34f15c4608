"""Deployment files, checked statically (no Docker engine here): compose, Dockerfile, Prometheus, Grafana."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

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
    argv = ["docker-compose", "-f", str(COMPOSE), *profile, "config", "-q"]
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "a-password"}
    check = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    assert check.returncode == 0, check.stderr
    # there is no default Grafana password: without one, compose refuses to start
    env.pop("GRAFANA_ADMIN_PASSWORD")
    refused = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    assert refused.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in refused.stderr


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
    # secure by default: every node has its own bundle from the one-shot keys service, nothing public
    assert services["keys"]["command"][:3] == ["keys", "init", "/keys"]
    issued = next(a for a in services["keys"]["command"] if a.startswith("--nodes=")).removeprefix("--nodes=")
    assert set(issued.split(",")) == {"dht", *nodes}
    for name in ["dht", *nodes]:
        assert f"--keys=/keys/nodes/{name}" in services[name]["command"]
        assert "--insecure" not in services[name]["command"]
    for name in ("prometheus", "grafana"):
        assert all(port.startswith("127.0.0.1:") for port in services[name]["ports"])
    # the chaos profile may kill the block stages and the spare (which may serve one by then), never stage 0:
    # plain CheckFree cannot rebuild it
    assert sorted(n for n in nodes if services[n].get("labels", {}).get("swarm-node.chaos") == "victim") == [
        "spare", "stage1", "stage2", "stage3",
    ]  # fmt: skip


def _venv_tool(name: str) -> str | None:
    """A tool on PATH, or else next to this interpreter (the venv's bin when run as .venv/bin/python -m pytest)."""
    found = shutil.which(name)
    if found is None:
        beside = pathlib.Path(sys.executable).parent / name
        found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None
    return found


def test_dockerfile_lints_clean_and_installs_like_the_readme() -> None:
    dockerfile = ROOT / "docker/Dockerfile"
    text = dockerfile.read_text()
    assert "torch==${TORCH_VERSION}" in text and "ARG TORCH_VERSION=2.13.0" in text
    for source in re.findall(r"^COPY (.+) \./?\S*$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    # the README's install, in cacheable layers: the pinned torch, then the package's dependencies (from
    # pyproject.toml alone, against constraints.txt) before any code is copied, then the package without them
    torch = text.index('"torch==${TORCH_VERSION}"')
    deps = text.index("pip install -c constraints.txt -r ")
    code = text.index("COPY node ")
    package = text.index("pip install --no-deps -c constraints.txt .")
    assert torch < deps < code < package
    assert "['project']['dependencies']" in text[:deps]
    # only what the dependency layer reads is copied before it, so that a code change keeps the layer cached
    copied = [path for line in re.findall(r"^COPY (.+)$", text[:deps], flags=re.M) for path in line.split()[:-1]]
    assert sorted(copied) == ["constraints.txt", "pyproject.toml"], copied
    assert "pip install -c constraints.txt ." not in text  # the package itself never pulls dependencies
    hadolint = _venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (it comes with the test extras)")
    lint = subprocess.run([hadolint, "--failure-threshold", "warning", str(dockerfile)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_shipped_prometheus_config_is_the_generated_one() -> None:
    shipped = ROOT / "docker/prometheus/prometheus.yml"
    assert shipped.read_text() == compose_config()
    promtool = _venv_tool("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "config", str(shipped)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_dashboard_uses_its_datasource_variable_and_existing_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # compose provisions a Prometheus datasource, which the variable picks up as the default; any other Grafana
    # (e.g. one pointed at `swarm-node local --prometheus-dir`'s Prometheus) can import the dashboard as it is
    datasources = yaml.safe_load((ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text())
    provisioned = datasources["datasources"][0]
    assert provisioned["type"] == "prometheus" and provisioned["url"] == "http://prometheus:9090"
    assert provisioned["isDefault"] is True
    provider = yaml.safe_load((ROOT / "docker/grafana/provisioning/dashboards/swarm-node.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    via_variable = {"type": "prometheus", "uid": "${datasource}"}
    families = list(StageMetrics().registry.collect())
    exported = {s.name for metric in families for s in metric.samples}
    # a labelled family has no sample until its first child: a counter's series is still `<name>_total`
    exported |= {f"{metric.name}_total" for metric in families if metric.type == "counter"}
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"] == via_variable, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == via_variable, panel["title"]
            expr = target["expr"]
            used |= set(re.findall(r"swarm_node_\w+", expr))
            # Prometheus evaluates these verbatim in the integration test: no Grafana-only variables
            assert "$" not in expr, expr
            # a node with no identity yet exports stage_info without labels; a waiting spare has stage=""
            assert 'role!="spare"' not in expr, expr
    assert used and not used - exported, sorted(used - exported)
    # what the issue asks the dashboard to show
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("loss", "throughput", "step time", "heartbeat", "recover", "rejected"):
        assert topic in titles, topic
    exprs = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}
    step_time = next(e for title, e in exprs.items() if "step time" in title.lower())
    assert "by (le, stage)" in step_time[0] and 'swarm_node_stage_info{stage!=""}' in step_time[0]
    # only stage 0 sets the loss gauges and its view of failures is the one counted (every observer counts one)
    loss = next(e for title, e in exprs.items() if "loss" in title.lower())
    assert loss and all('swarm_node_stage_info{stage="0"}' in e for e in loss)
    failures = [e for es in exprs.values() for e in es if "swarm_node_failures_detected_total" in e]
    assert failures and all('swarm_node_stage_info{stage="0"}' in e for e in failures)
    # recovery counters and histograms survive the resets of killed recovered nodes: increase()/rate() only
    for name in ("recoveries_total", "recovery_fetched_bytes_total", "failure_detection_seconds_sum",
                 "recovery_seconds_sum", "rebuild_seconds_sum"):  # fmt: skip
        for e in (e for es in exprs.values() for e in es if f"swarm_node_{name}" in e):
            assert re.search(rf"(increase|rate)\(swarm_node_{name}\[", e), e
