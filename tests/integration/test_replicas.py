"""Several peers per stage, with real processes: replicas join by exact copy, share the microbatches, losing
one of two replicas costs no rebuild, and a preempted replica leaves its stage to the other; the weights still
match the single-process reference."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import time

import pytest

from node.events import HandedOverEvent, NoticeEvent, RecoveryEvent, StepEvent, of_type, read_events
from node.local import local_argv
from tests.conftest import REPO, kill_swarm, launcher_children

pytestmark = pytest.mark.integration


def _daemon_pid(launcher: int, options: str) -> int | None:
    """The pid of the launcher's child started with ``run --options .../<options>`` (not its DHT process,
    a fork with the same command line)."""
    for pid in launcher_children(launcher):
        with contextlib.suppress(OSError):
            argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(a.endswith(options.encode()) for a in argv):
                return pid
    return None


# Out of CI's default run until fixed: on 2026-12-07 it failed 3 runs in 3 on the project machine, and on the
# previous commit too (a joined replica of stage 2 stays out of the view of its co-replica, "replica ... is gone";
# or, after the kill, a cycle of claims and fences). Run it with -m slow.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_replicas_per_stage_share_the_work_and_one_can_die_or_leave_without_a_rebuild(tmp_path) -> None:
    workdir, out = tmp_path / "swarm", tmp_path / "summary.json"
    argv = local_argv(  # and a SIGTERM notice to stage 1's first node at step 48: its replica carries the stage on
        "--stages", "4", "--replicas", "2", "--steps", "60", "--check-reference", "--preempt", "1@48:20:signal",
        workdir=workdir, json_out=out,
    )  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    events_path = workdir / "events.jsonl"
    try:
        # wait until the extra replica of stage 2 copied its state and took microbatches of a committed step
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "stage 2's second replica never shared a step"
            events = read_events(events_path) if events_path.exists() else []
            joined = [r for r in of_type(events, RecoveryEvent) if r.method == "replica" and r.stage == 2]
            shared = [s for s in of_type(events, StepEvent) if s.assignment and len(s.assignment.get("2", [])) == 2]
            if joined and shared:
                break
            time.sleep(0.5)
        primary = _daemon_pid(proc.pid, "options/stage2.json")
        assert primary is not None
        os.kill(primary, signal.SIGKILL)  # one of the two replicas of a middle stage, without warning
        killed_at = time.time()
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            kill_swarm(proc)  # the launcher and every node's session (each daemon leads its own)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    summary = json.loads(out.read_text())
    assert summary["steps"] == 60
    # no rebuild of stage 2: the surviving replica carried it (a respawned node may join it as a replica)
    after = [r for r in of_type(read_events(events_path), RecoveryEvent) if r.time > killed_at and r.stage == 2]
    assert all(r.method == "replica" for r in after), [r.method for r in after]
    assert any(d.get("signal") == "SIGKILL" or d.get("exit_code") == -9 for d in summary["deaths"]), summary["deaths"]
    # the preempted node of stage 1 left it to its replica: no state moved, nothing was parked or rebuilt
    events = read_events(events_path)
    handed = next(e for e in of_type(events, HandedOverEvent) if e.stage == 1)  # (local's own stop sends more)
    assert handed.to_replica and handed.to is not None and handed.parked_on is None, handed
    noticed = min(e.time for e in of_type(events, NoticeEvent) if e.stage == 1)
    rebuilt = [r.method for r in of_type(events, RecoveryEvent) if r.time > noticed and r.stage == 1]
    assert all(m == "replica" for m in rebuilt), rebuilt
    # every replica summed its share in the recorded order: the weights are the reference's, bit for bit
    assert summary["reference_max_abs_diff"] == 0.0


# slow: placement decisions are unit-tested (tests/unit/test_replicas.py); this scenario took 106-209 s and
# failed once on 2026-12-07 (issue 14)
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_spares_placed_by_throughput_serve_every_block_stage_and_refill_one_that_lost_every_peer(tmp_path) -> None:
    """``--placement throughput``: three spares on a 4-stage swarm each join a different block stage as a working
    replica; when both peers of stage 3 die (no spare left), a replica of another stage moves and rebuilds it."""
    from node.config import build_config
    from node.dht.factory import make_dht
    from node.local.launcher import LocalOptions, LocalSwarm
    from node.options import Placement
    from node.wire.records import SERVING_STATES
    from tests.conftest import wait_for

    cfg = build_config(overrides={"num_stages": 4})
    opts = LocalOptions(config=cfg, steps=100_000, workdir=tmp_path, threads=1, quiet=True,
                        placement=Placement.THROUGHPUT)  # fmt: skip
    swarm = LocalSwarm(opts)

    def serving() -> dict[int, list]:
        by_stage: dict[int, list] = {}
        for r in swarm.swarm_records():
            if r.state in SERVING_STATES and r.stage is not None:
                by_stage.setdefault(r.stage, []).append(r)
        return by_stage

    try:
        swarm.start_bootstrap()
        swarm.dht = make_dht(swarm.bootstrap_maddrs, None, swarm.own_credentials, client_mode=True)
        for stage in range(4):
            swarm.start_stage(stage)
        wait_for(lambda: all(r.committed_step >= 1 for rs in serving().values() for r in rs) and len(serving()) == 4,
                 180, "four stages training", interval=0.5)  # fmt: skip
        for _ in range(3):
            swarm.start_stage(None)
        placed = wait_for(lambda: (s := serving()) and [len(s.get(k, [])) for k in range(4)] == [1, 2, 2, 2] and s,
                          180, "one spare joined to each block stage", interval=0.5)  # fmt: skip
        movers = {r.peer_id for k in (1, 2) for r in placed[k]}
        for r in placed[3]:
            os.kill(r.pid, signal.SIGKILL)  # stage 3 loses every peer, and no spare waits
        killed_at = time.time()

        def refilled() -> list | None:
            now = serving()
            return now.get(3) if now.get(3) and all(r.peer_id in movers for r in now[3]) else None

        [new] = wait_for(refilled, 180, "a replica of stage 1 or 2 serving stage 3", interval=0.5)
        assert new.last_recovery is not None and new.last_recovery.method in ("checkfree", "copy", "partner_copy")
        after = serving()
        assert sorted(after) == [0, 1, 2, 3] and all(after[k] for k in (1, 2))  # no stage left without a peer
        step = max(r.committed_step for r in after[0])
        wait_for(lambda: max(r.committed_step for r in serving().get(0, [])) > step + 2, 120, "training going on")
        rebuilt = [e for e in of_type(swarm.read_events(), RecoveryEvent) if e.time > killed_at and e.stage == 3]
        assert len(rebuilt) == 1, [(e.pid, e.method, e.step, e.sources) for e in rebuilt]  # one node moved: one rebuild
    finally:
        swarm.stop_all(grace=10)
        if swarm.dht is not None:
            swarm.dht.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_replicas_killed_mid_forward_and_mid_backward_cost_no_rebuild(tmp_path: pathlib.Path) -> None:
    """Stage 2 has three replicas; one dies as it is about to compute a forward, a second one as it is about to
    compute a backward (the daemons' own fault injection): the last one carries the stage, with no rebuild,
    and the weights are still the reference's."""
    workdir, out = tmp_path / "swarm", tmp_path / "summary.json"
    argv = local_argv(
        "--stages", "4", "--replicas", "1,1,3,1", "--steps", "110", "--kill", "2@70:forward", "--kill",
        "2@90:backward", "--no-respawn", "--check-reference", workdir=workdir, json_out=out,
    )  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    events = read_events(workdir / "events.jsonl")
    shared = [s for s in of_type(events, StepEvent) if s.step < 70 and len((s.assignment or {}).get("2", [])) == 3]
    assert shared, "the three replicas of stage 2 never shared a step before the kills"
    assert summary["steps"] == 110 and len(summary["deaths"]) == 2, summary["deaths"]
    rebuilt = [r for r in of_type(events, RecoveryEvent) if r.stage == 2 and r.method != "replica"]
    assert not rebuilt, rebuilt
    assert summary["reference_max_abs_diff"] == 0.0
