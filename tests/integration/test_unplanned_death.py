"""A node killed from outside (``kill -9`` of a pid read from ``swarm-node status --json``, as an operator, the
OOM killer or a spot VM would) is a failure ``local`` recovers from: it starts a replacement, the lost stage
is rebuilt CheckFree-style, training finishes every step, and the summary marks the death unplanned."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess

import pytest

from node.events import StepEvent, of_type, read_events
from node.local import node_argv
from tests.conftest import REPO, pid_alive, swarm_status, wait_for

pytestmark = pytest.mark.integration

STEPS = 30


def _bootstrap(stdout: pathlib.Path) -> str | None:
    m = re.search(r"bootstrap: (\S+)", stdout.read_text(errors="replace"))
    return m.group(1) if m else None


def _workdir_pids(workdir: pathlib.Path) -> list[int]:
    """Processes whose command line names ``workdir``: the swarm's own daemons and bootstrap node."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and str(workdir).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


@pytest.mark.timeout(240)
def test_a_stage_killed_from_outside_is_recovered_and_marked_unplanned(tmp_path: pathlib.Path) -> None:
    workdir, out = tmp_path / "swarm", tmp_path / "summary.json"
    stdout, stderr = tmp_path / "local.out", tmp_path / "local.err"
    cmd = node_argv(
        "local", "--stages", "4", "--steps", str(STEPS), "--recovery", "checkfree", "--threads", "1",
        "--workdir", str(workdir), "--json-out", str(out),
    )  # fmt: skip
    with open(stdout, "wb") as sink, open(stderr, "wb") as errors:  # not --quiet: it prints the bootstrap first
        local = subprocess.Popen(
            cmd, cwd=REPO, stdout=sink, stderr=errors, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        maddr = wait_for(lambda: _bootstrap(stdout), 60, "the bootstrap address")
        events_path = workdir / "events.jsonl"
        wait_for(lambda: of_type(read_events(events_path), StepEvent), 120, "the first step", interval=0.2)
        # as the user did: stage 2's pid from `swarm-node status --json` (the launcher's own keys); this takes
        # a few seconds, some steps of the run
        stages = swarm_status(maddr, keys=workdir / "keys" / "nodes" / "local")
        [victim] = [s["pid"] for s in stages if s["stage"] == 2 and s["state"] == "online"]
        assert str(workdir / "options" / "stage2.json") in pathlib.Path(f"/proc/{victim}/cmdline").read_text()
        killed_after = len(of_type(read_events(events_path), StepEvent))
        os.kill(victim, signal.SIGKILL)

        local.wait(timeout=180)
        err = stderr.read_text(errors="replace")
        assert local.returncode == 0, err[-3000:]
        assert not pid_alive(victim)
        summary = json.loads(out.read_text())
        assert summary["steps"] == STEPS and killed_after < STEPS
        assert [e.step for e in of_type(read_events(events_path), StepEvent)] == list(range(1, STEPS + 1))
        [death] = [d for d in summary["deaths"] if d["pid"] == victim]
        assert (death["name"], death["stage"], death["exit_code"], death["signal"]) == ("stage2", 2, -9, "SIGKILL")
        assert death["planned"] is False and death["cause"] == "unplanned" and death["replaced"] is True
        assert death["log"] == str(workdir / "stage2.log") and pathlib.Path(death["log"]).exists()
        assert [d for d in summary["deaths"] if not d["planned"]] == [death]  # nobody else died unplanned
        assert summary["kills"] == []  # nothing was planned
        [rec] = [r for r in summary["recoveries"] if r["stage"] == 2]
        assert (rec["method"], rec["killed_in"], rec["sources"]) == ("checkfree", "unplanned", [1, 3])
        assert rec["detect_seconds"] is not None and rec["recover_seconds"] > 0
        assert "unplanned death: stage2" in err and "killed by SIGKILL" in err
    finally:
        if local.poll() is None:  # `local` stops its swarm on SIGTERM, as on Ctrl-C
            local.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                local.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(local.pid, signal.SIGKILL)
        for pid in _workdir_pids(workdir):  # whatever a failed run left: each child leads its own group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        local.wait(timeout=10)
