"""``swarm-node bench --mode simulate`` end to end: two strategies, a few iterations, JSON and PNG."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import matplotlib.image
import pytest

from node.bench.results import BenchResults
from tests.conftest import REPO


@pytest.mark.timeout(300)
def test_simulate_writes_results_and_figure(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "-m", "node", "bench", "--mode", "simulate", "--strategies", "checkfree,checkpoint",
        "--failure-rates", "0.2", "--iterations", "6", "--checkpoint-every", "2,auto", "--eval-every", "2",
        "--seq-len", "32", "--seeds", "2", "--out", str(out), "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = BenchResults.model_validate_json((out / "results.json").read_text())
    assert BenchResults.model_validate_json(proc.stdout) == results  # --json prints the same document
    assert results.mode == "simulate" and results.iterations == 6
    assert results.seeds == [0, 1]
    assert [(r.strategy, r.variant, r.failure_rate, r.seed) for r in results.runs] == [
        (s, v, 0.2, seed) for seed in (0, 1) for s, v in (("checkfree", ""), ("checkpoint", "K=2"),
                                                          ("checkpoint", "K=auto"))
    ]  # fmt: skip
    # one row per strategy (each checkpoint interval) and rate over both seeds, and the noise level
    assert [(r.strategy, r.variant, r.seeds) for r in results.summary] == [
        ("checkfree", "", 2), ("checkpoint", "K=2", 2), ("checkpoint", "K=auto", 2)
    ]  # fmt: skip
    assert results.noise["final_val_loss_no_failures"]["n"] == 2
    assert results.best_checkpoint["0.2"] in ("K=2", "K=auto")
    assert results.costs["checkpoint_every_auto"]["0.2"] >= 1  # Young–Daly's K for the last seed
    checkfree, checkpoint = results.runs[:2]
    # the same seeded failures (stage 0's too) hit both strategies, and every recovery was timed
    assert checkfree.failures == checkpoint.failures > 0
    assert 0 < sum(checkfree.methods.values()) <= checkfree.failures  # a restart recovers every stage at once
    assert len(checkfree.recover_seconds) == sum(checkfree.methods.values())
    assert 0 < len(checkpoint.recover_seconds) <= checkpoint.failures
    assert checkpoint.extra["rounds"] >= 1 and checkpoint.extra["every"] == 2
    for run in results.runs:
        assert [p.iteration for p in run.curve] == [0, 2, 4, 6]
        assert all(a.seconds < b.seconds for a, b in zip(run.curve, run.curve[1:], strict=False))
        assert run.final_val_loss == run.curve[-1].val_loss
        assert (run.iterations_to_target is None) == (run.seconds_to_target is None)
    assert results.costs["step_seconds"] > 0
    for figure in ("loss_vs_time.png", "time_to_target.png"):
        image = matplotlib.image.imread(out / figure)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
