"""The docker-compose swarm, as plain processes (no Docker engine here): the keys service makes every node's
bundle, the bootstrap node publishes its multiaddrs in a file, stages read it, a killed stage is taken over by
the spare, and the restarted "container" (the same ``--stage N`` command) finds its stage served and joins it
as a second replica (an exact copy), rather than claiming it again."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess

import pytest

from node.events import DoneEvent, StepEvent, of_type, read_events
from tests.conftest import Procs, swarm_status, wait_for

pytestmark = pytest.mark.integration


def _records(maddr_file: pathlib.Path, keys: pathlib.Path) -> list[dict]:
    return swarm_status(maddr_file.read_text().split()[0], swarm="compose", keys=keys / "nodes" / "status")


# slow: test_deploy_units starts a swarm from the same commands; the compose file is validated statically
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_compose_topology_as_processes(tmp_path: pathlib.Path, procs: Procs) -> None:
    shared, events, keys = tmp_path / "shared" / "bootstrap.maddrs", tmp_path / "events.jsonl", tmp_path / "keys"
    made = procs.start("keys", "init", str(keys), "--nodes=dht,stage0,stage1,stage2,stage3,spare,status",
                       "--if-missing")  # fmt: skip
    assert made.wait(timeout=60) == 0, made.stderr.read()
    procs.start("dht", "--host", "127.0.0.1", "--port", "0", "--identity", str(tmp_path / "dht.key"),
                "--maddr-file", str(shared), f"--keys={keys / 'nodes' / 'dht'}")  # fmt: skip

    def node(stage: str, *extra: str) -> subprocess.Popen[bytes]:
        name = "spare" if stage == "auto" else f"stage{stage}"
        return procs.start(
            "run", f"--stage={stage}", f"--keys={keys / 'nodes' / name}", "--num-stages=4", "--swarm=compose",
            f"--initial-peers-file={shared}",
            "--host=127.0.0.1", "--metrics-port=0", "--steps=60", "--threads=1", f"--events-file={events}", *extra,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    stages = {s: node(str(s)) for s in range(4)}  # they wait for the maddr file like the compose services
    spare = node("auto")

    def steps() -> list[StepEvent]:
        return of_type(read_events(events), StepEvent)

    wait_for(lambda: len(steps()) >= 5, 180, "training through the file-discovered bootstrap node")
    # stage 2's machine is preempted: the spare takes over its stage
    os.killpg(stages[2].pid, signal.SIGKILL)
    stages[2].wait(timeout=10)
    wait_for(
        lambda: any(
            r["stage"] == 2 and r["pid"] == spare.pid and r["state"] == "online" for r in _records(shared, keys)
        ),
        120,
        "the spare to serve stage 2",
    )
    # the restart policy brings "stage2" back with the same command: it joins the served stage as a replica,
    # by the same claim (nobody is fenced), never as a second claimant
    restarted = node("2")
    wait_for(
        lambda: any(r["pid"] == restarted.pid and r["stage"] == 2 and r["state"] == "online"
                    for r in _records(shared, keys)),
        120,
        "the restarted stage-2 node to join stage 2 as a replica",
    )
    wait_for(lambda: of_type(read_events(events), DoneEvent), 240, "done")
    serving2 = [r for r in _records(shared, keys) if r["stage"] == 2 and r["state"] in ("online", "waiting")]
    assert spare.pid in [r["pid"] for r in serving2]
    assert {r["pid"] for r in serving2} <= {spare.pid, restarted.pid}
    assert len({r["epoch"] for r in serving2}) == 1
    assert [e.step for e in steps()][-1] == 60
