"""What the benchmark scripts share: running ``swarm-node local`` for its run summary, and writing results.

The scripts run as ``python benchmarks/NAME.py`` from the repository root, so the script's folder is first
on ``sys.path`` and this module imports as ``_common``.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


class LocalSwarm:
    """One ``swarm-node local ARGS --quiet`` running from the repository root, in its own temporary folder."""

    def __init__(self, args: Sequence[str], tmp: pathlib.Path) -> None:
        self.summary_path = tmp / "summary.json"
        cmd = [sys.executable, "-m", "node", "local", *args, "--quiet",
               "--workdir", str(tmp / "swarm"), "--json-out", str(self.summary_path)]  # fmt: skip
        self.process = subprocess.Popen(cmd, cwd=REPO)

    def running(self) -> bool:
        return self.process.poll() is None

    def summary(self, timeout: float | None = None) -> dict[str, Any]:
        """Waits for the run to end and returns its summary (``--json-out``); a failed run raises."""
        rc = self.process.wait(timeout=timeout)
        if rc != 0:
            raise subprocess.CalledProcessError(rc, self.process.args)
        return json.loads(self.summary_path.read_text())


@contextlib.contextmanager
def local_swarm(args: Sequence[str]) -> Iterator[LocalSwarm]:
    """Starts ``swarm-node local`` with ``args``; on leaving, a run still going is killed and its folder removed."""
    with tempfile.TemporaryDirectory(prefix="swarm-node-bench-") as tmp:
        swarm = LocalSwarm(args, pathlib.Path(tmp))
        try:
            yield swarm
        finally:
            if swarm.running():
                swarm.process.kill()
                swarm.process.wait()


def run_local(args: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """The summary of one ``swarm-node local ARGS`` run (``--quiet``, ``--workdir`` and ``--json-out`` added)."""
    with local_swarm(args) as swarm:
        return swarm.summary(timeout)


def median_step_seconds(summary: dict[str, Any]) -> float:
    """The median committed-step time of a ``local`` run, past start-up (its first 5 steps)."""
    return statistics.median(summary["step_seconds"][5:])


def write_results(path: pathlib.Path, payload: dict[str, Any]) -> None:
    """Writes the benchmark's results as indented JSON (creating the folder) and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
