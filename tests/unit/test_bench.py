"""The benchmark's pure parts: failure schedules, time to target, live curves."""

from __future__ import annotations

import statistics

import pytest

from node.bench import BenchStrategy
from node.bench.failures import failure_schedule, notice_schedule
from node.bench.live import LiveOptions, curve_from_events, local_options
from node.bench.results import CurvePoint, default_target, time_to_target
from node.config import build_config
from node.events import EvalEvent, RolledBackEvent, StepEvent
from node.options import EvalOptions, RecoveryStrategy


def test_failure_schedule_is_seeded_and_spares_stage_0() -> None:
    a = failure_schedule(0, 0.1, 500, 7)
    assert a == failure_schedule(0, 0.1, 500, 7)
    assert a != failure_schedule(1, 0.1, 500, 7)
    flat = [s for it in a for s in it]
    assert 0 not in flat and set(flat) <= set(range(1, 7))
    assert 0.05 < len(flat) / (500 * 6) < 0.15
    assert failure_schedule(0, 0.0, 50, 7) == [[]] * 50


def _curve(*losses: float) -> list[CurvePoint]:
    return [CurvePoint(iteration=10 * i, step=10 * i, seconds=2.0 * i, val_loss=v) for i, v in enumerate(losses)]


def test_time_to_target_is_interpolated_up_to_the_first_point_at_or_below() -> None:
    curve = _curve(5.0, 4.0, 3.0, 3.5, 2.0)
    assert time_to_target(curve, 3.0) == (20.0, 4.0)  # exactly at an evaluation
    assert time_to_target(curve, 3.5) == (15.0, 3.0)  # halfway from 4.0 (it 10, 2 s) to 3.0 (it 20, 4 s)
    assert time_to_target(curve, 5.0) == (0.0, 0.0)  # the first point already
    assert time_to_target(curve, 1.0) == (None, None)
    # two thirds of 40 iterations is ~26.7: the point at iteration 30
    assert default_target(curve, 40) == 3.5


def _step(time: float, step: int) -> StepEvent:
    return StepEvent(
        time=time, step=step, seconds=1.0, loss=3.0, tokens=64, attempt=step, grad_norm=1.0, stage_grad_norms=[1.0]
    )


def test_live_curve_excludes_evaluation_time() -> None:
    events = [
        EvalEvent(time=100.0, step=0, val_loss=5.0, seconds=1.0),
        _step(101.0, 1),
        _step(102.0, 2),
        EvalEvent(time=103.5, step=2, val_loss=4.0, seconds=1.5),
        _step(104.5, 3),
        RolledBackEvent(time=105.0, step=2, attempt=4),
        EvalEvent(time=106.5, step=2, val_loss=4.0, seconds=0.5),
    ]
    curve = curve_from_events(events)
    assert [(p.iteration, p.step) for p in curve] == [(0, 0), (2, 2), (3, 2)]
    assert [p.seconds for p in curve] == [0.0, 2.0, 4.5]


def test_a_live_run_counts_its_recoveries_by_method_and_a_stage_it_could_not_rebuild() -> None:
    from node.bench.live import methods_of
    from node.events import RecoveryEvent, UnrecoverableEvent

    def rebuilt(stage: int, method: str) -> RecoveryEvent:
        return RecoveryEvent(stage=stage, step=4, method=method, sources=[], source_grad_norms=[], bytes_fetched=0,
                             rebuild_seconds=0.1, fetch_seconds=0.0, lr_scale=1.0)  # fmt: skip

    events = [rebuilt(2, "snapshot"), rebuilt(0, "handoff"), rebuilt(3, "snapshot"),
              UnrecoverableEvent(stage=0, reason="no live stage holds a snapshot of it")]  # fmt: skip
    assert methods_of(events) == {"snapshot": 2, "handoff": 1, "unrecoverable": 1}
    assert methods_of([]) == {}


def test_higher_rates_fail_where_lower_rates_do() -> None:
    low, high = failure_schedule(3, 0.01, 400, 7), failure_schedule(3, 0.05, 400, 7)
    assert all(set(a) <= set(b) for a, b in zip(low, high, strict=True))
    assert sum(map(len, low)) < sum(map(len, high))


def test_live_runs_give_the_local_swarm_their_strategy(tmp_path) -> None:
    cfg = build_config(overrides={"num_stages": 7})
    opts = LiveOptions(config=cfg, strategies=["checkfree"], failure_rates=[0.1], iterations=6, eval_every=2)
    none = local_options(opts, BenchStrategy.NONE, 0.0, tmp_path / "none")
    assert none.recovery.strategy is RecoveryStrategy.CHECKFREE and (none.failure_rate, none.spares) == (0.0, 0)
    ckpt = local_options(opts, BenchStrategy.CHECKPOINT, 0.1, tmp_path / "ckpt")
    assert ckpt.recovery.checkpoint_dir == str(tmp_path / "ckpt" / "checkpoints")
    assert (ckpt.recovery.checkpoint_every, ckpt.recovery.lr_scale) == (opts.checkpoint_every[0], opts.lr_scale)
    assert local_options(opts, BenchStrategy.CHECKPOINT, 0.1, tmp_path, 7).recovery.checkpoint_every == 7
    ladder = local_options(opts, BenchStrategy.LADDER, 0.1, tmp_path, 4).recovery  # the interval is the ladder's
    assert (ladder.snapshot_neighbour_every, ladder.checkpoint_every) == (4, opts.checkpoint_every[0])
    assert (ckpt.failure_rate, ckpt.spares, ckpt.steps, ckpt.workdir) == (0.1, 1, 6, tmp_path / "ckpt")
    assert ckpt.timing.step_timeout == opts.step_timeout
    assert ckpt.eval == EvalOptions(every=2, batches=opts.eval_batches)
    # --checkpoint-to: off the nodes, under a prefix of this bench run's own (no earlier bench's checkpoints)
    remote = LiveOptions(config=cfg, strategies=["checkpoint"], failure_rates=[0.1], iterations=6,
                         checkpoint_to="s3://bench/runs/", storage_endpoint="http://127.0.0.1:9000", run_id="r1")
    there = local_options(remote, BenchStrategy.CHECKPOINT, 0.1, tmp_path / "checkpoint-p0.1")
    assert there.recovery.checkpoint_dir == "s3://bench/runs/r1/checkpoint-p0.1"
    assert there.durability.storage_endpoint == "http://127.0.0.1:9000"
    assert local_options(remote, BenchStrategy.CHECKFREE, 0.1, tmp_path).recovery.checkpoint_dir is None
    plus = local_options(opts, BenchStrategy.CHECKFREE_PLUS, 0.1, tmp_path / "plus")
    assert plus.recovery.strategy is RecoveryStrategy.CHECKFREE_PLUS and plus.config.out_of_order
    assert not none.config.out_of_order


def test_notices_are_drawn_per_failure_alike_for_every_rate_and_strategy() -> None:
    low, high = failure_schedule(0, 0.05, 400, 7), failure_schedule(0, 0.2, 400, 7)
    assert notice_schedule(0, 0.0, high, 7) == set()
    assert notice_schedule(0, 1.0, high, 7) == {(it, s) for it, failed in enumerate(high) for s in failed}
    half = notice_schedule(0, 0.5, high, 7)
    assert 0.3 < len(half) / sum(map(len, high)) < 0.7 and half == notice_schedule(0, 0.5, high, 7)  # seeded
    # a failure that a lower rate also has gets the same draw at both rates
    assert notice_schedule(0, 0.5, low, 7) == {(it, s) for it, s in half if s in low[it]}
    assert notice_schedule(0, 0.3, high, 7) <= half  # a higher fraction's notices include a lower one's


def test_seeds_are_run_tagged_and_summarised_with_one_target() -> None:
    """``run_seeds``: each seed runs with its own training seed and failure draws; the target is the mean of
    the seeds' default targets; the summary gives mean ± sd per strategy and rate over the seeds."""
    from node.bench import BenchOptions
    from node.bench.results import BenchResults, BenchRun, run_seeds
    from node.config import build_config

    seen: list[tuple[int, int]] = []

    def run_one(opts) -> BenchResults:
        seen.append((opts.seed, opts.config.train.seed))
        k = opts.seed - 5
        none = BenchRun(strategy="none", failure_rate=0.0, failures=0, iterations_to_target=None,
                        seconds_to_target=None, final_val_loss=None, step_seconds=1.0, curve=_curve(5.0, 3.0 + k, 2.0))
        runs = [
            BenchRun(strategy="checkfree", failure_rate=0.1, failures=2 + k, iterations_to_target=None,
                     seconds_to_target=None, final_val_loss=None, step_seconds=1.0, curve=_curve(5.0, 4.0, 3.0 - k)),
        ]  # fmt: skip
        return BenchResults(mode="simulate", config={}, iterations=20, seed=opts.seed, target_loss=3.0 + k,
                            target_source="default", costs={}, runs=runs, baseline=none)  # fmt: skip

    opts = BenchOptions(config=build_config(), strategies=["checkfree"], failure_rates=[0.1], iterations=20, seed=5)
    results = run_seeds(opts, 2, run_one)
    assert seen == [(5, 5), (6, 6)] and results.seeds == [5, 6]
    assert results.target_loss == 3.5 and [r.seed for r in results.runs] == [5, 6]
    [checkfree] = results.summary
    assert (checkfree.strategy, checkfree.seeds, checkfree.reached) == ("checkfree", 2, 2)
    # checkfree reaches 3.5 at iteration 15 (seed 5: halfway from 4.0 to 3.0) and 12.5 (seed 6: 4.0 -> 2.0)
    assert checkfree.iterations_to_target.mean == 13.75 and checkfree.seconds_to_target.mean == 2.75
    assert checkfree.iterations_to_target.sd == statistics.stdev([15.0, 12.5])
    assert checkfree.failures.mean == 2.5 and round(checkfree.failures.sd, 6) == round(0.5**0.5, 6)
    assert checkfree.final_val_loss.mean == 2.5
    # paired with each seed's no-failure run (1.5 s and 2.5 s to 3.5): 3.0 / 1.5 and 2.5 / 2.5
    assert checkfree.over_no_failures.mean == 1.5 and checkfree.over_no_failures.n == 2
    assert results.noise["final_val_loss_no_failures"]["mean"] == 2.0  # the no-failure runs: the noise level
    assert results.noise["seconds_to_target_no_failures"]["n"] == 2


def test_each_strategy_is_held_against_the_best_checkpoint_interval_seed_by_seed() -> None:
    """The best interval is the one with most seeds at the target, then the least mean time; every other
    strategy's time is divided by that interval's run of the same seed and rate (a seed where either never
    reached the target is left out)."""
    from node.bench.results import BenchRun, against_best_checkpoint, best_checkpoint, summarize

    def run(strategy: str, variant: str, rate: float, seed: int, seconds: float | None) -> BenchRun:
        return BenchRun(strategy=strategy, variant=variant, failure_rate=rate, seed=seed, failures=1,
                        iterations_to_target=seconds, seconds_to_target=seconds, final_val_loss=1.0,
                        step_seconds=1.0)  # fmt: skip

    runs = [
        run("checkpoint", "K=1", 0.1, 0, 10.0), run("checkpoint", "K=1", 0.1, 1, 20.0),
        run("checkpoint", "K=5", 0.1, 0, 12.0), run("checkpoint", "K=5", 0.1, 1, 30.0),
        run("ladder", "", 0.1, 0, 9.0), run("ladder", "", 0.1, 1, 22.0),
        # at 0.2 only K=5 gets there on both seeds, so it is the best though K=1 was faster on seed 0
        run("checkpoint", "K=1", 0.2, 0, 5.0), run("checkpoint", "K=1", 0.2, 1, None),
        run("checkpoint", "K=5", 0.2, 0, 40.0), run("checkpoint", "K=5", 0.2, 1, 50.0),
        run("ladder", "", 0.2, 0, 20.0), run("ladder", "", 0.2, 1, None),
    ]  # fmt: skip
    rows = summarize(runs)
    best = best_checkpoint(rows)
    assert best == {"0.1": "K=1", "0.2": "K=5"}
    against_best_checkpoint(rows, runs, best)
    ladder = {row.failure_rate: row.over_best_checkpoint for row in rows if row.strategy == "ladder"}
    assert (ladder[0.1].mean, ladder[0.1].n) == ((0.9 + 1.1) / 2, 2)  # 9 / 10 and 22 / 20
    assert (ladder[0.2].mean, ladder[0.2].n) == (0.5, 1)  # seed 1 never reached it
    assert all(row.over_best_checkpoint is None for row in rows if row.strategy == "checkpoint")


def test_the_ladder_restores_a_lost_stage_from_its_neighbours_snapshot_at_most_k_steps_stale(tmp_path) -> None:
    """Simulate mode knows ``ladder``: a stage lost while its holder lives goes back to its snapshot (method
    ``snapshot``); one lost with its holder falls back down the ladder; the snapshots' clone time is counted."""
    from node.bench.simulate import SimulateOptions, _simulate_run
    from node.config import build_config
    from node.data import load_corpus, validation_batches

    cfg = build_config(overrides={"num_stages": 4, "model": {"n_layers": 3, "d_model": 32, "n_heads": 2,
                                                             "ffn_hidden": 64},
                                  "train": {"seq_len": 16, "microbatch_size": 2, "microbatches_per_step": 2}})
    opts = SimulateOptions(config=cfg, strategies=["ladder"], failure_rates=[0.5], iterations=8, eval_every=4,
                           snapshot_neighbour_every=[3, 1])  # fmt: skip
    corpus = load_corpus(None)
    val = validation_batches(corpus.val, num_batches=1, batch_size=2, seq_len=16)
    # iteration 4: stage 2 alone (holder 3 lives; snapshot of step 3); iteration 7: stages 2 and 3 together
    # (stage 3's holder is S-2 = 2 and stage 2's is 3, both lost; neither has both neighbours alive for
    # CheckFree's average either, so both are copies of a live neighbour)
    schedule = [[], [], [], [], [2], [], [], [2, 3]]
    run, _ = _simulate_run(opts, BenchStrategy.LADDER, 0.5, schedule, corpus.train, val, None, interval=3)
    assert run.failures == 3 and run.methods == {"snapshot": 1, "copy": 2}
    assert run.extra["rounds"] == 2 and run.extra["every"] == 3  # after steps 3 and 6
    # each interval is a run of its own: every step, a snapshot round after every commit
    every_step, _ = _simulate_run(opts, BenchStrategy.LADDER, 0.5, schedule, corpus.train, val, None, interval=1)
    assert every_step.methods == run.methods and every_step.extra["every"] == 1
    assert every_step.extra["rounds"] > 2 * run.extra["rounds"]
    assert opts.variants(BenchStrategy.LADDER) == [("K=3", 3), ("K=1", 1)]
    with pytest.raises(ValueError, match="a ladder run needs its interval"):
        _simulate_run(opts, BenchStrategy.LADDER, 0.5, schedule, corpus.train, val, None)


def test_one_ladder_interval_is_the_ladder_and_bad_intervals_are_refused() -> None:
    from node.bench import BenchOptions

    cfg = build_config()
    opts = BenchOptions(config=cfg, strategies=["ladder", "checkpoint"], failure_rates=[0.1], iterations=4,
                        checkpoint_every=[5], snapshot_neighbour_every=[10])  # fmt: skip
    assert opts.variants(BenchStrategy.LADDER) == [("", 10)]  # one interval: no label
    assert opts.variants(BenchStrategy.CHECKPOINT) == [("K=5", 5)]
    assert opts.variants(BenchStrategy.COPY) == [("", None)]
    for bad in ([], [0]):
        with pytest.raises(ValueError, match="snapshot intervals"):
            BenchOptions(config=cfg, strategies=["ladder"], failure_rates=[0.1], iterations=4,
                         snapshot_neighbour_every=bad)  # fmt: skip


def test_per_hour_failure_rates_become_per_iteration_rates_for_a_stated_step_time() -> None:
    from node.bench import PAPER_STEP_SECONDS, per_iteration_rate

    p = per_iteration_rate(0.05, PAPER_STEP_SECONDS)
    assert 0.0012 < p < 0.0014  # about 39 iterations of 91.35 s per hour
    assert abs((1 - p) ** (3600 / PAPER_STEP_SECONDS) - 0.95) < 1e-12  # an hour of draws fails with 5 %
    assert per_iteration_rate(0.05, 2 * PAPER_STEP_SECONDS) > p and per_iteration_rate(0.0, 10.0) == 0.0
    with pytest.raises(ValueError):
        per_iteration_rate(1.0, 10.0)
