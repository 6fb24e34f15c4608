"""A real 4-stage swarm (separate processes, real DHT, real gRPC) trains and matches one process."""

from __future__ import annotations

import os
import pathlib

import pytest

from tests.conftest import pid_alive, run_local

pytestmark = pytest.mark.integration


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.timeout(420)
def test_four_stage_swarm_trains_and_matches_single_process(tmp_path: pathlib.Path) -> None:
    workdir = tmp_path / "swarm"
    proc, summary = run_local(tmp_path, "--check-reference", steps=20, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["steps"] == 20
    loss = summary["loss"]
    assert len(loss) == 20 and len(summary["step_seconds"]) == 20
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.3, loss  # it learns
    assert summary["tokens_per_second"] > 0
    # fp32 on CPU: the swarm is the single-process run up to float rounding
    assert summary["reference_max_abs_diff"] < 1e-5, summary["reference_max_abs_diff"]
    stages = summary["stages"]
    assert [s["stage"] for s in stages] == [0, 1, 2, 3]
    for s in stages:
        assert s["grpc_address"].startswith("127.0.0.1:")
        assert isinstance(s["metrics_port"], int)
        assert not pid_alive(s["pid"])
    # nothing the launcher started (daemons, their DHT helpers) outlives it
    assert processes_mentioning(str(workdir)) == []
