"""``swarm-node bench --mode simulate`` end to end: two strategies, a few iterations, JSON and PNG."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import matplotlib.image
import pytest

from node.bench.results import BenchResults
from tests.conftest import REPO, group_members, launcher_children, wait_for


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
        # evaluated at every committed step that is a multiple of 2 (as live), and after the last iteration
        assert run.curve[0].iteration == 0 and run.curve[-1].iteration == 6
        assert all(p.step % 2 == 0 for p in run.curve[:-1]) and len(run.curve) >= 2
        assert all(a.seconds < b.seconds for a, b in zip(run.curve, run.curve[1:], strict=False))
        assert run.final_val_loss == run.curve[-1].val_loss
        assert (run.iterations_to_target is None) == (run.seconds_to_target is None)
    assert results.costs["step_seconds"] > 0
    for figure in ("loss_vs_time.png", "time_to_target.png"):
        image = matplotlib.image.imread(out / figure)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.timeout(120)
def test_simulate_takes_its_failure_overhead_from_a_live_bench_and_refuses_a_bad_file(tmp_path: pathlib.Path) -> None:
    from node.bench.results import BenchRun

    live = BenchResults(mode="live", config={}, iterations=60, seed=0, target_loss=2.0, target_source="x",
                        costs={}, runs=[BenchRun(strategy="checkfree", failure_rate=0.01, failures=3,
                                                 iterations_to_target=None, seconds_to_target=None,
                                                 final_val_loss=None, step_seconds=0.2,
                                                 recover_seconds=[2.0, 7.0, 3.0])])  # fmt: skip
    (tmp_path / "live.json").write_text(live.model_dump_json())
    (tmp_path / "bad.json").write_text('{"mode": "live"')
    base = [sys.executable, "-m", "node", "bench", "--mode", "simulate", "--strategies", "checkfree",
            "--failure-rates", "0.2", "--iterations", "2", "--eval-every", "2", "--eval-batches", "1",
            "--seq-len", "32", "--seeds", "1", "--json"]  # fmt: skip
    proc = subprocess.run([*base, "--failure-overhead-from", str(tmp_path / "live.json"), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=110)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    costs = BenchResults.model_validate_json(proc.stdout).costs
    assert costs["failure_overhead_seconds"] == 3.0 and "3 live recoveries" in costs["failure_overhead_source"]
    bad = subprocess.run([*base, "--failure-overhead-from", str(tmp_path / "bad.json"), "--out",
                          str(tmp_path / "out2")], cwd=REPO, capture_output=True, text=True, timeout=110)  # fmt: skip
    assert bad.returncode != 0 and "--failure-overhead-from" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.timeout(400)
def test_live_checkpoints_go_to_a_real_s3_server(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bench --mode live --checkpoint-to s3://…``: the checkpoint run's nodes write their checkpoints to object
    storage (a moto server on loopback), as on spot VMs whose disks die with them; bad storage fails at once."""
    from node.local.objectstore import CREDENTIALS, create_bucket, local_s3
    from node.storage import open_storage

    for name, value in {**CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)  # this process reads the bucket back too
    env = dict(os.environ)
    base = [sys.executable, "-m", "node", "bench", "--mode", "live", "--strategies", "checkpoint",
            "--failure-rates", "0", "--iterations", "6", "--checkpoint-every", "2", "--eval-every", "3",
            "--eval-batches", "1", "--stages", "3", "--spares", "0", "--seq-len", "32", "--seeds", "1", "--json"]
    with local_s3() as endpoint:
        create_bucket(endpoint, "bench")
        proc = subprocess.run([*base, "--checkpoint-to", "s3://bench/ckpt", "--storage-endpoint", endpoint,
                               "--out", str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=380)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = BenchResults.model_validate_json(proc.stdout)
        [run] = [r for r in results.runs if r.strategy == "checkpoint"]
        assert "error" not in run.extra and run.extra["checkpoints"]["writes"] >= 3 * 2  # 3 stages, steps 2, 4, 6
        prefix = results.costs["checkpoint_storage"]
        assert prefix.startswith("s3://bench/ckpt/")
        stored = open_storage(prefix, endpoint).list("")
        assert stored and all(not key.startswith("/") for key in stored)
        bad = subprocess.run([*base, "--checkpoint-to", "s3://no-such-bucket/x", "--storage-endpoint", endpoint,
                              "--out", str(tmp_path / "bad")], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "--checkpoint-to" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.timeout(180)
def test_a_live_bench_stopped_with_sigterm_leaves_no_process_behind(tmp_path: pathlib.Path) -> None:
    """SIGTERM to ``bench --mode live`` tears down the local swarm of the run in progress, as Ctrl-C does: no
    node daemon, DHT node or p2pd helper of it outlives the bench."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "node", "bench", "--mode", "live", "--strategies", "none", "--iterations", "500",
         "--stages", "3", "--spares", "0", "--seq-len", "32", "--seeds", "1", "--out", str(tmp_path / "out")],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    groups: set[int] = set()
    try:
        # the bootstrap DHT node and the 3 stage daemons, each leading its own process group
        groups = set(wait_for(lambda: len(launcher_children(bench.pid)) >= 4 and launcher_children(bench.pid),
                              90, "the run's swarm"))  # fmt: skip
        wait_for(lambda: len(group_members(groups)) > len(groups), 60, "the nodes' helper processes")
        # once it trains: a SIGTERM in the launcher's first seconds can still hang it (CI, 2026-12-07: once, with
        # the DHT constructor and reads already deferred; see the issue note), which this test is not about
        events = tmp_path / "out" / "runs" / "none-p0" / "events.jsonl"
        wait_for(lambda: events.exists() and '"event":"step"' in events.read_text(), 120, "the first committed step")
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) != 0
        deadline = time.monotonic() + 15  # a SIGKILLed group's last members may take a moment to be reaped
        while group_members(groups) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = group_members(groups)
        assert not left, f"processes outlived the bench: {sorted(left)}"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(timeout=10)
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
