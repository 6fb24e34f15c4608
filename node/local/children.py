"""The local swarm's child processes, and the names every part of the launcher shares.

Every child runs in its own process group with a parent-death signal (:func:`spawn`), and :func:`stop_all`
kills those groups, so no process outlives the launcher. :func:`serving` finds the child that serves a stage
according to the DHT's records. :func:`stop_on_signals` makes Ctrl-C and SIGTERM stop a launcher the same way,
except inside :func:`interrupts_deferred`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from node.local import node_argv
from node.wire.records import StageRecord, StageState

_PR_SET_PDEATHSIG = 1
SWARM = "local"  # the swarm name (DHT namespace) of every local swarm
HOST = "127.0.0.1"


class LocalSwarmError(RuntimeError):
    """The local swarm could not start or finish; the message says which process and why."""


_deferring = 0  # depth of interrupts_deferred blocks
_interrupted = False  # a signal came inside one: raised when the outermost ends


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt in the launcher (its clean-up stops every child), except
    inside :func:`interrupts_deferred`; a second SIGTERM is ignored, so it cannot cut the clean-up short. Call
    from the main thread."""

    def on_signal(signum: int, _frame: object) -> None:
        global _interrupted
        if signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if _deferring:
            _interrupted = True
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Holds back a :func:`stop_on_signals` interrupt until the block ends. For calls that an exception would leave
    stuck: hivemind's DHT constructor, interrupted while it waits for its child process, spins forever."""
    global _deferring, _interrupted
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _interrupted:
            _interrupted = False
            raise KeyboardInterrupt


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: pathlib.Path | None = None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def present(records: list[StageRecord]) -> list[StageRecord]:
    """The records of nodes that have not gone offline."""
    return [r for r in records if r.state != StageState.OFFLINE]


def serving(children: list[Child], records: list[StageRecord], stage: int) -> Child | None:
    """The live child among ``children`` serving ``stage`` now, according to the DHT."""
    pids = {r.pid for r in present(records) if r.stage == stage}
    return next((c for c in children if c.proc.pid in pids and c.proc.poll() is None), None)


def spawn(workdir: pathlib.Path, name: str, args: list[str], capture_stdout: bool = False) -> Child:
    """``swarm-node ARGS`` as child ``name``, logging to ``workdir/<name>.log`` (stdout too, unless captured)."""
    log_path = workdir / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(
        node_argv(*args),
        stdout=subprocess.PIPE if capture_stdout else log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        preexec_fn=_child_setup,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    return Child(name, proc, log_path)


def read_maddrs(child: Child, timeout: float) -> list[str]:
    """The multiaddrs a bootstrap node (spawned with ``capture_stdout``) prints on its first line."""
    assert child.proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    os.set_blocking(child.proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        chunk = child.proc.stdout.read()
        if chunk:
            line += chunk
        if b"\n" in line:
            break
        if child.proc.poll() is not None:
            raise LocalSwarmError(f"bootstrap DHT node exited with {child.proc.returncode}: see {child.log_path}")
        time.sleep(0.05)
    else:
        raise LocalSwarmError("bootstrap DHT node did not print its address in time")
    return line.split(b"\n", 1)[0].decode().split()


def stop_all(children: list[Child], grace: float = 15.0) -> None:
    """SIGTERM every child twice (stages first, so they announce ``offline``), then SIGKILL whatever is left.
    A daemon takes one SIGTERM as a preemption notice and starts handing its stage over; the second stops it
    at once, as a swarm that stops as a whole has nobody to hand over to."""
    # The leader only: SIGTERM to the whole group would also kill the daemon's DHT helper process
    # before the daemon could announce itself offline with it.
    for second in (False, True):
        if second:
            time.sleep(0.2)  # two signals in one go may be merged into one
        for child in sorted(children, key=lambda c: c.name == "dht"):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for child in children:
        child.kill_group(signal.SIGKILL)  # the group may still hold the DHT helper or p2pd
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(timeout=5)
