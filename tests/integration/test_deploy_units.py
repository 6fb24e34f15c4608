"""The systemd units' exact ExecStart lines, expanded as systemd expands them with the example env file (ports,
names and paths moved to loopback and a temporary directory, as an instance file would), start a real bootstrap
node and a real 4-stage swarm that trains."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from node.events import DoneEvent, StepEvent, of_type, read_events
from tests.conftest import REPO, Procs, swarm_status, wait_for
from tests.unit.test_deploy_cloud import ENV_EXAMPLE, env_file, unit

pytestmark = pytest.mark.integration

BINARY = "/opt/swarm-node/venv/bin/swarm-node"
STEPS = 6


def expand(command: str, env: dict[str, str]) -> list[str]:
    """systemd's ExecStart expansion: a word that is exactly $VAR becomes the value split at whitespace (no words
    when it is empty or unset); ${VAR} is replaced by the exact value, in place."""
    argv: list[str] = []
    for word in command.split():
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv.extend(env.get(whole.group(1), "").split())
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


def service_argv(name: str, instance: str, overrides: pathlib.Path) -> tuple[list[str], dict[str, str]]:
    """The argv and environment systemd gives unit NAME's INSTANCE: Environment= (specifiers resolved), then the
    EnvironmentFile= files in order (the example, then OVERRIDES in place of the optional per-instance file)."""
    service = unit(name)["Service"]
    env: dict[str, str] = {}
    for assignment in service.get("Environment", []):
        key, _, value = assignment.replace("%i", instance).partition("=")
        env[key] = value
    files = service["EnvironmentFile"]
    assert files[0] == "/etc/swarm-node/swarm-node.env" and files[-1].startswith("-")  # the optional one last
    env |= env_file(ENV_EXAMPLE)
    env |= env_file(overrides)
    command = service["ExecStart"][-1].replace("%i", instance)
    argv = expand(command, env)
    assert argv[0] == BINARY
    return argv, env


def start(procs: Procs, argv: list[str], env: dict[str, str], log: pathlib.Path) -> subprocess.Popen[bytes]:
    """Runs ARGV with this venv's package in place of /opt/swarm-node/venv, in its own process group."""
    out = log.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", *argv[1:]],
        env={**os.environ, **env, "HOME": str(log.parent)},
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=REPO,
    )
    procs.procs.append(proc)  # killed (whole group) at the end, whatever happens
    return proc


@pytest.mark.timeout(240)
def test_units_start_a_training_swarm(tmp_path: pathlib.Path, procs: Procs) -> None:
    keys, events, weights = tmp_path / "keys", tmp_path / "events.jsonl", tmp_path / "weights"
    made = procs.start("keys", "init", str(keys), "--nodes=dht,stage0,stage1,stage2,stage3,status")
    assert made.wait(timeout=60) == 0, made.stderr.read()
    loopback = {"SWARM_NAME": "deploy-test", "SWARM_HOST": "127.0.0.1", "SWARM_ANNOUNCE_HOST": "127.0.0.1",
                "SWARM_PORT": "0", "SWARM_DHT_PORT": "0", "SWARM_BOOTSTRAP_PORT": "0",
                "SWARM_METRICS_HOST": "127.0.0.1", "SWARM_METRICS_PORT": "0", "SWARM_DEVICE": "cpu",
                "SWARM_PREEMPTION": "signal", "SWARM_DRAIN_SECONDS": "3", "SWARM_STEPS": str(STEPS),
                "SWARM_DURABILITY_ARGS": "",
                "SWARM_EXTRA_ARGS": "--preset tiny --recovery checkfree --threads 1 --microbatches 2 "
                                    "--microbatch-size 2"}  # fmt: skip

    def overrides(name: str, extra: dict[str, str]) -> pathlib.Path:
        path = tmp_path / f"{name}.env"
        path.write_text("".join(f'{k}="{v}"\n' for k, v in {**loopback, **extra}.items()))
        return path

    maddrs = tmp_path / "dht" / "bootstrap.maddrs"
    (tmp_path / "dht").mkdir()
    argv, env = service_argv("swarm-node-dht.service", "", overrides("dht", {
        "SWARM_KEYS": str(keys / "nodes" / "dht"), "SWARM_DHT_IDENTITY": str(tmp_path / "dht" / "dht.key"),
        "SWARM_MADDR_FILE": str(maddrs)}))  # fmt: skip
    assert argv[1] == "dht" and "--insecure" not in argv
    start(procs, argv, env, tmp_path / "dht" / "log")
    bootstrap = wait_for(lambda: maddrs.exists() and maddrs.read_text().split(), 60, "the bootstrap multiaddrs")[0]

    stages = {}
    for stage in range(4):
        instance = str(stage)  # swarm-node@0 ... swarm-node@3: the instance name is the stage
        state = tmp_path / f"stage{stage}"
        state.mkdir()
        argv, env = service_argv("swarm-node@.service", instance, overrides(instance, {
            "SWARM_INITIAL_PEERS": bootstrap, "SWARM_KEYS": str(keys / "nodes" / f"stage{stage}"),
            "SWARM_EVENTS_FILE": str(events), "SWARM_SAVE_DIR": str(weights)}))  # fmt: skip
        assert argv[1:5] == ["run", "--stage", instance, "--num-stages"], argv
        assert "--drain-seconds" in argv and "" not in argv  # empty groups add no argument
        stages[stage] = start(procs, argv, env, state / "log")

    # stage 0 trains its steps on every stage, then exits 0 (Restart=on-failure leaves it stopped)
    assert stages[0].wait(timeout=180) == 0, (tmp_path / "stage0" / "log").read_text()[-3000:]
    steps = [e.step for e in of_type(read_events(events), StepEvent)]
    assert steps[-1] == STEPS and of_type(read_events(events), DoneEvent)
    assert (weights / "stage0.safetensors").exists()
    # the block stages, as `swarm-node status` shows them, committed every step
    records = swarm_status(bootstrap, swarm="deploy-test", keys=keys / "nodes" / "status")
    committed = {r["stage"]: r["committed_step"] for r in records if r["stage"] in (1, 2, 3)}
    assert committed == {1: STEPS, 2: STEPS, 3: STEPS}, records
    # systemctl stop: SIGTERM (KillSignal) to the daemon only (KillMode=mixed); it must be done within
    # TimeoutStopSec, with exit 0 so that Restart=on-failure leaves it stopped
    timeout_stop = float(unit("swarm-node@.service")["Service"]["TimeoutStopSec"][-1])
    for stage in (1, 2, 3):
        stages[stage].send_signal(signal.SIGTERM)
    for stage in (1, 2, 3):
        assert stages[stage].wait(timeout=timeout_stop) == 0, (tmp_path / f"stage{stage}" / "log").read_text()[-3000:]
