"""Shared fixtures: every process a test starts is killed (whole process group) when the test ends."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from node.local import local_argv, node_argv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Procs:
    """Starts ``python -m node ...`` children in their own process groups and reaps them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            node_argv(*args),
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=REPO,
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
    return True


def run_local(tmp_path, *args: str, stages: int = 4, steps: int = 8, timeout: float = 420):
    """``swarm-node local`` in ``tmp_path/swarm``; returns (completed process, summary dict or None)."""
    out = pathlib.Path(tmp_path) / "summary.json"
    cmd = local_argv(
        "--stages", str(stages), "--steps", str(steps), *args, workdir=pathlib.Path(tmp_path) / "swarm", json_out=out
    )
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc, json.loads(out.read_text()) if out.exists() else None


def swarm_status(maddr: str, swarm: str = "local", keys: os.PathLike | None = None) -> list[dict[str, Any]]:
    """The stage records of ``swarm`` as ``swarm-node status --json`` prints them (with the bundle ``keys``, or
    on an open DHT)."""
    security = ["--keys", str(keys)] if keys is not None else ["--insecure"]
    out = subprocess.run(
        node_argv("status", "--initial-peers", maddr, "--swarm", swarm, "--json", *security),
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)["stages"]


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5, ignore: tuple[type, ...] = ()
) -> Any:
    """Polls ``predicate`` until it returns something truthy (returned); fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(*ignore):
            value = predicate()
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


SWARM_STEPS = 30


@pytest.fixture
def running_swarm(request: pytest.FixtureRequest, tmp_path) -> Iterator[Any]:
    """A 4-stage tiny swarm (one torch thread per stage) training ``SWARM_STEPS`` steps (or as many as the test
    parametrizes it with, indirectly) with its own throw-away authority: the bootstrap node and the stages,
    without the launcher's watch loop. Stopped at the end."""
    from node.config import build_config
    from node.local.launcher import LocalOptions, LocalSwarm

    cfg = build_config(overrides={"num_stages": 4})
    steps = getattr(request, "param", SWARM_STEPS)
    swarm = LocalSwarm(LocalOptions(config=cfg, steps=steps, workdir=tmp_path, threads=1, quiet=True))
    try:
        swarm.start_bootstrap()
        for stage in range(4):
            swarm.start_stage(stage)
        yield swarm
    finally:
        swarm.stop_all(grace=10)
        if swarm.dht is not None:  # a test's own DHT client
            swarm.dht.shutdown()


def _processes() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                state, ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                yield int(entry.name), state, int(ppid), int(pgrp)


def launcher_children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the launcher's nodes, each the leader of its own session)."""
    return [child for child, _, ppid, _ in _processes() if ppid == pid]


def group_members(groups: set[int]) -> set[int]:
    """Live processes whose process group is one of ``groups`` (a node daemon and its p2pd helpers)."""
    return {pid for pid, state, _, pgrp in _processes() if pgrp in groups and state != "Z"}


def kill_swarm(launcher: subprocess.Popen[str]) -> None:
    """SIGKILL the launcher first (so it respawns nothing), then every node's whole session: the whole swarm
    goes at once, as when a zone's spot capacity is reclaimed."""
    nodes = launcher_children(launcher.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launcher.pid, signal.SIGKILL)
    for pid in nodes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    launcher.wait(timeout=10)
