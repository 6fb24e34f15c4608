"""The recovery ladder with real processes: stages killed without notice restore their neighbour's snapshot."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from node.events import RecoveryEvent, of_type, read_events
from node.local import local_argv
from tests.conftest import REPO

pytestmark = pytest.mark.integration

K = 5  # --snapshot-neighbour-every


# slow: the ladder's choices are unit-tested (test_planner, test_recovery_methods);
# benchmarks/neighbour_snapshots.py runs it live
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_stages_killed_without_notice_restore_their_neighbours_snapshot_at_most_k_steps_stale(
    tmp_path: pathlib.Path,
) -> None:
    """A block stage and stage 0 are SIGKILLed; each replacement restores the snapshot its holder (the next stage)
    kept, at most K steps stale. Stage 1, killed before its first snapshot, restores the seed's initial state
    (the snapshot of step 0, built by the replacement itself). The reference replays exactly that (each stage
    set back to its weights and AdamW state of the snapshot's step), so the swarm's final weights equal it: the
    restored state was that stage's state of that step."""
    workdir, out = tmp_path / "swarm", tmp_path / "summary.json"
    argv = local_argv(
        "--stages", "4", "--steps", "36", "--recovery", "ladder", "--snapshot-neighbour-every", str(K),
        "--kill", "1@3", "--kill", "2@13", "--kill", "0@24", "--check-reference", workdir=workdir, json_out=out,
    )  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=450)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["steps"] == 36 and len(summary["deaths"]) == 3
    restored = {r.stage: r for r in of_type(read_events(workdir / "events.jsonl"), RecoveryEvent)}
    assert sorted(restored) == [0, 1, 2]
    early = restored[1]
    assert (early.method, early.sources, early.bytes_fetched) == ("snapshot", [], 0)
    assert 0 < early.stale_steps == early.step < K, early  # set back to step 0, at most K steps
    for stage, holder in ((2, 3), (0, 1)):
        r = restored[stage]
        assert r.method == "snapshot" and r.sources == [holder], r
        assert 0 <= r.stale_steps <= K and (r.step - r.stale_steps) % K == 0, r  # a snapshot step, not later
    # the reference restores the same snapshots: only exact restores give 0.0
    assert summary["reference_max_abs_diff"] == 0.0
