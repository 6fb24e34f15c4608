"""How long ``swarm-node status`` takes against a live swarm, as a user runs it: a fresh process each time.

Starts ``swarm-node local`` (4 stages, the tiny model, one torch thread per stage, with keys), takes the
``status`` command it prints (``--peer`` stage 0 over gRPC, ``--initial-peers`` as the fallback), and times it
``--runs`` times; then times the DHT-only command (``--initial-peers`` alone: starts hivemind and its p2p
daemon) ``--dht-runs`` times, for comparison. Each run must print the four stages. Goal: the printed command
answers within 2 s (median).

    python benchmarks/status_latency.py [--runs 10] [--dht-runs 3] [--out benchmarks/results/status_latency.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _common import REPO, RESULTS, write_results

GOAL_SECONDS = 2.0


def status_argv(command: str) -> list[str]:
    """The printed command, run through this interpreter's ``swarm-node`` (or ``python -m node``)."""
    argv = shlex.split(command)
    exe = shutil.which("swarm-node", path=os.path.dirname(sys.executable))
    return [exe, *argv[1:]] if exe else [sys.executable, "-m", "node", *argv[1:]]


def wait_for_command(log: pathlib.Path, proc: subprocess.Popen, timeout: float) -> str:
    """The ``status: ...`` line ``local`` prints once stage 0 serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"swarm-node local exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("status: "):
                return line.removeprefix("status: ").strip()
        time.sleep(0.5)
    raise TimeoutError("swarm-node local printed no status command")


def time_runs(argv: list[str], runs: int, label: str) -> list[float]:
    """Seconds of each run; a run that fails or does not show the four stages aborts the benchmark."""
    out = []
    for i in range(runs):
        started = time.perf_counter()
        done = subprocess.run([*argv, "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{label}: {done.stderr.strip()}")
        stages = sorted(s["stage"] for s in json.loads(done.stdout)["stages"])
        if stages != [0, 1, 2, 3]:
            raise RuntimeError(f"{label}: stages {stages}")
        out.append(seconds)
        print(f"{label} {i + 1}/{runs}: {seconds:.2f} s", flush=True)
    return out


def summary(seconds: list[float]) -> dict[str, float | list[float]]:
    if not seconds:
        return {}
    return {
        "median": statistics.median(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "runs": [round(s, 3) for s in seconds],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="timed runs of the printed (--peer) command")
    parser.add_argument("--dht-runs", type=int, default=3, help="timed runs of the DHT-only command (0: none)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "status_latency.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="swarm-node-bench-") as tmp:
        log = pathlib.Path(tmp) / "local.log"
        cmd = [sys.executable, "-m", "node", "local", "--stages", "4", "--steps", "100000", "--threads", "1",
               "--workdir", str(pathlib.Path(tmp) / "swarm")]  # fmt: skip
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            command = wait_for_command(log, proc, timeout=300)
            print(f"local printed: {command}", flush=True)
            time.sleep(3)  # every stage announced
            argv = status_argv(command)
            peer = time_runs(argv, args.runs, "status (printed: --peer, --initial-peers)")
            dht_argv = [a for i, a in enumerate(argv) if a != "--peer" and (i == 0 or argv[i - 1] != "--peer")]
            dht = time_runs(dht_argv, args.dht_runs, "status (--initial-peers only: the DHT)")
            load = os.getloadavg()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the launcher stops its children
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    result = {
        "command": command,
        "goal_seconds": GOAL_SECONDS,
        "peer": summary(peer),
        "dht": summary(dht),
        "load_average_1_5_15": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
    }
    p = result["peer"]
    print(f"status --peer: median {p['median']:.2f} s, min {p['min']:.2f} s, max {p['max']:.2f} s "
          f"(goal {GOAL_SECONDS} s: {'met' if p['median'] <= GOAL_SECONDS else 'missed'})")  # fmt: skip
    if dht:
        d = result["dht"]
        print(f"status from the DHT: median {d['median']:.2f} s, min {d['min']:.2f} s, max {d['max']:.2f} s")
    print(f"load average {result['load_average_1_5_15']} on {result['cpus']} cores")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
