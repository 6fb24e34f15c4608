"""``swarm-node status`` against a live swarm (real processes, with keys): from the DHT, then fast from a
stage daemon over gRPC (``--peer``), and the "swarms seen" hint for a wrong swarm name."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from node.local import node_argv
from tests.conftest import REPO, swarm_status, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(node_argv("status", *args), cwd=REPO, capture_output=True, text=True, timeout=60)


def test_status_reads_a_live_swarm_from_the_dht_and_from_a_peer(running_swarm) -> None:
    keys = running_swarm.credentials("status").keys
    maddr = running_swarm.bootstrap_maddrs[0]

    def trained() -> list[dict] | None:
        stages = swarm_status(maddr, keys=keys)
        ok = sorted(s["stage"] for s in stages if s["state"] == "online") == [0, 1, 2, 3]
        return stages if ok and min(s["committed_step"] for s in stages) >= 1 else None

    stages = wait_for(trained, 180, "four online stages with a committed step (status from the DHT)", interval=2)
    peer = next(s["grpc_address"] for s in stages if s["stage"] == 0)

    started = time.monotonic()
    out = status("--keys", str(keys), "--peer", peer, "--swarm", "local", "--json")
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["swarm"] == "local" and reply["source"] == f"peer {peer}" and reply["malformed_records"] == 0
    by_stage = {s["stage"]: s for s in reply["stages"]}
    assert sorted(by_stage) == [0, 1, 2, 3]
    for stage, before in ((s["stage"], s) for s in stages):
        now = by_stage[stage]
        assert now["peer_id"] == before["peer_id"] and now["committed_step"] >= before["committed_step"] >= 1
    assert took < 15, f"status --peer took {took:.1f}s"  # about 1 s; the benchmark measures it

    table = status("--keys", str(keys), "--peer", peer)  # no --swarm: the peer's
    assert table.returncode == 0 and "online" in table.stdout and "…" not in table.stdout

    wrong = status("--keys", str(keys), "--peer", peer, "--swarm", "default")
    assert wrong.returncode == 0 and "pass --swarm local" in " ".join(wrong.stdout.split())

    dead = status("--keys", str(keys), "--peer", "127.0.0.1:1")
    assert dead.returncode == 2 and "no --peer answered" in dead.stderr
