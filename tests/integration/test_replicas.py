"""Several peers per stage, with real processes: replicas join by exact copy, share the microbatches, and
losing one of two replicas costs no rebuild; the weights still match the single-process reference."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import time

import pytest

from node.events import RecoveryEvent, StepEvent, of_type, read_events
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


@pytest.mark.timeout(600)
def test_two_replicas_per_stage_share_the_work_and_one_can_die_without_a_rebuild(tmp_path: pathlib.Path) -> None:
    workdir, out = tmp_path / "swarm", tmp_path / "summary.json"
    argv = local_argv(
        "--stages", "4", "--replicas", "2", "--steps", "70", "--check-reference", workdir=workdir, json_out=out
    )
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
    assert summary["steps"] == 70
    # no rebuild of stage 2: the surviving replica carried it (a respawned node may join it as a replica)
    after = [r for r in of_type(read_events(events_path), RecoveryEvent) if r.time > killed_at and r.stage == 2]
    assert all(r.method == "replica" for r in after), [r.method for r in after]
    assert any(d.get("signal") == "SIGKILL" or d.get("exit_code") == -9 for d in summary["deaths"]), summary["deaths"]
    # every replica summed its share in the recorded order: the weights are the reference's, bit for bit
    assert summary["reference_max_abs_diff"] == 0.0
