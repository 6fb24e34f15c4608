"""The simulated clock of ``bench --mode simulate``: costs, durability of checkpoint writes, Young–Daly, and
what the simulator charges and recovers when stages (stage 0 too) fail."""

from __future__ import annotations

import pytest
import torch

from node.bench import BenchStrategy, SimulateOptions
from node.bench.costs import MB, CostModel, WriteQueue, swarm_failure_probability, young_daly_interval
from node.bench.failures import failure_moment, failure_schedule
from node.bench.simulate import _simulate_run
from node.config import build_config
from node.data import load_corpus, validation_batches


def test_a_checkpoint_counts_once_written_and_writes_queue_one_at_a_time() -> None:
    q = WriteQueue()
    assert q.submit(10, now=5.0, seconds=3.0) == 0.0  # nothing in flight: no stall
    assert q.durable(7.9) == set() and q.durable(8.0) == {10}
    assert q.submit(20, now=6.0, seconds=3.0) == 2.0  # waits for step 10's write (done at 8.0)
    assert q.durable(10.9) == {10} and q.durable(11.0) == {10, 20}
    q.fail(now=9.0, keep_up_to=20)  # step 20 was still in flight: lost
    assert q.durable(100.0) == {10}
    q.submit(20, now=9.0, seconds=1.0)
    q.fail(now=50.0, keep_up_to=10)  # rolled back to 10: the later checkpoint is discarded
    assert q.durable(100.0) == {10}


def test_young_daly_balances_checkpoint_cost_against_lost_work_and_waits_for_a_write() -> None:
    # C = 0.05 s, T = 0.05 s, q = 0.009: M = 5.56 s, K·T = sqrt(2·0.05·5.56) = 0.745 s -> K = 15
    assert young_daly_interval(0.05, 0.0, 0.05, 0.009) == 15
    assert young_daly_interval(0.2, 0.0, 0.05, 0.009) == 30  # 4x the cost: 2x the interval
    assert young_daly_interval(0.05, 0.0, 0.05, 0.036) < 15  # more failures: checkpoint more often
    assert young_daly_interval(0.05, 2.0, 0.05, 0.009) == 40  # never shorter than one write (2 s / 0.05 s)
    assert young_daly_interval(0.05, 0.0, 0.05, 0.0) > 10**6  # nothing fails
    assert swarm_failure_probability(0.1, 2) == pytest.approx(0.19)
    with pytest.raises(ValueError):
        young_daly_interval(0.05, 0.0, 0.0, 0.1)


def test_costs_scale_with_the_simulated_stage_size() -> None:
    c = CostModel(step_seconds=1.0, byte_scale=10.0, storage_bandwidth=100 * MB, storage_latency=0.5,
                  link_bandwidth=50 * MB)  # fmt: skip
    assert c.storage_seconds(10 * MB) == pytest.approx(0.5 + 1.0)
    assert c.link_seconds(10 * MB) == pytest.approx(2.0)
    assert c.scaled(0.01) == pytest.approx(0.1)
    for bad in ({"step_seconds": 0.0}, {"step_seconds": 1.0, "link_bandwidth": 0.0},
                {"step_seconds": 1.0, "storage_latency": -1.0}):  # fmt: skip
        with pytest.raises(ValueError):
            CostModel(**bad)


def test_stage_0_draws_come_on_top_of_the_same_block_stage_draws() -> None:
    blocks, both = failure_schedule(4, 0.05, 300, 7), failure_schedule(4, 0.05, 300, 7, stage0=True)
    assert [[s for s in it if s] for it in both] == blocks
    assert 0 < sum(0 in it for it in both) < 40


def _setup(**kw):
    cfg = build_config(overrides={"num_stages": 5, "model": {"n_layers": 4, "d_model": 32, "n_heads": 2,
                                                             "ffn_hidden": 64},
                                  "train": {"seq_len": 16, "microbatch_size": 2, "microbatches_per_step": 2}})
    corpus = load_corpus(None)
    val = validation_batches(corpus.val, num_batches=1, batch_size=2, seq_len=16)
    opts = SimulateOptions(config=cfg, strategies=["checkfree"], failure_rates=[0.5], iterations=8, eval_every=4,
                           snapshot_neighbour_every=[3], **kw)  # fmt: skip
    return opts, corpus.train, val


def _run(opts, tokens, val, strategy, schedule, **kw):
    return _simulate_run(opts, strategy, 0.5, schedule, tokens, val, None, **kw)[0]


def test_a_rollback_goes_back_only_to_a_checkpoint_already_written_to_storage() -> None:
    opts, tokens, val = _setup()
    schedule = [[]] * 5 + [[2]] + [[]] * 2  # a failure in iteration 5 (after step 5), 0.08 of the way in
    fast = CostModel(step_seconds=1.0, storage_bandwidth=1e12, storage_latency=0.0)
    slow = CostModel(step_seconds=1.0, storage_bandwidth=1e12, storage_latency=1.5)  # a write takes 1.5 steps
    on_fast = _run(opts, tokens, val, BenchStrategy.CHECKPOINT, schedule, costs=fast, interval=2)
    on_slow = _run(opts, tokens, val, BenchStrategy.CHECKPOINT, schedule, costs=slow, interval=2)
    assert on_fast.extra["rollback_steps"] == [4]
    assert failure_moment(opts.seed, 5) < 0.5
    assert on_slow.extra["rollback_steps"] == [2]  # step 4's write (started at 4.0) was not done at 5.08
    # the slow storage costs more: the restore read, and the replayed steps are on the clock
    assert on_slow.curve[-1].seconds > on_fast.curve[-1].seconds
    assert on_slow.curve[-1].step < on_fast.curve[-1].step
    # evaluated by committed step, as live: the replaying run shows the no-failure run's losses at its steps
    plain = {p.step: p.val_loss for p in _run(opts, tokens, val, BenchStrategy.NONE, [[]] * 8).curve}
    assert [p.step for p in on_slow.curve] == [0, 4, 4, 5]  # step 4 reached twice (before and after the rollback)
    assert all(p.val_loss == plain[p.step] for p in on_slow.curve if p.step in plain)


def test_an_unannounced_failure_loses_its_step_up_to_a_seeded_moment_and_an_announced_one_nothing() -> None:
    opts, tokens, val = _setup()
    schedule = [[]] * 3 + [[2]] + [[]] * 4
    clock = CostModel(step_seconds=10.0)
    moment = failure_moment(opts.seed, 3) * 10.0
    assert 0 < moment < 10 and moment == failure_moment(opts.seed, 3) * 10.0  # seeded: every strategy alike
    lost = _run(opts, tokens, val, BenchStrategy.CHECKFREE, schedule, costs=clock)
    told = _run(opts, tokens, val, BenchStrategy.CHECKFREE, schedule, costs=clock, notices=frozenset({(3, 2)}))
    assert lost.extra["in_flight_lost_seconds"] == moment and told.extra["in_flight_lost_seconds"] == 0.0
    assert lost.curve[-1].seconds >= 8 * 10.0 + moment > told.curve[-1].seconds  # and the clock charges it
    # what is still being sent at that moment is not there: a snapshot that takes longer than the moment to
    # send leaves the previous one, one that arrives before it is restored (both exact restores of a step)
    from node.bench.simulate import _Sizes, _Swarm

    full = _Sizes.of(_Swarm(opts.config, torch.device("cpu"))).full[2]  # the failing stage's state
    assert moment < 5.0  # a send of 5 s: step 3's snapshot (sent from 30 s) is not there at 30 s + moment
    ladder = [_run(opts, tokens, val, BenchStrategy.LADDER, schedule, interval=1, costs=CostModel(
        step_seconds=10.0, link_bandwidth=bw)) for bw in (1e12, full / 5.0)]  # fmt: skip
    assert ladder[0].methods == ladder[1].methods == {"snapshot": 1}
    assert ladder[0].curve[-1].val_loss != ladder[1].curve[-1].val_loss  # a step apart


def test_every_snapshot_and_checkpoint_pays_the_one_measured_clone() -> None:
    """The blocking clone is measured once and charged alike to every run: a ladder and a checkpointing run
    that clone the same bytes as often are on the same clock, whatever this machine's timing noise."""
    opts, tokens, val = _setup()
    clock = CostModel(step_seconds=1.0, byte_scale=2.0, clone_seconds=0.125, storage_latency=0.0)
    ladder = _run(opts, tokens, val, BenchStrategy.LADDER, [[]] * 8, costs=clock, interval=2)
    checkpoint = _run(opts, tokens, val, BenchStrategy.CHECKPOINT, [[]] * 8, costs=clock, interval=2)
    for run in (ladder, checkpoint):
        assert run.extra["rounds"] == 4 and run.extra["blocking_seconds_mean"] == 0.25  # scaled by the bytes
        assert run.curve[-1].seconds == 8 * 1.0 + 4 * 0.25
    # a link so slow that every stage is still sending its last snapshot: those rounds clone nothing
    from node.bench.simulate import _Sizes, _Swarm

    smallest = min(_Sizes.of(_Swarm(opts.config, torch.device("cpu"))).full)
    slow = CostModel(step_seconds=1.0, clone_seconds=0.125, storage_latency=0.0, link_bandwidth=smallest / 2.5)
    skipping = _run(opts, tokens, val, BenchStrategy.LADDER, [[]] * 8, costs=slow, interval=1)
    assert 0 < skipping.extra["rounds"] < 8
    assert skipping.curve[-1].seconds == pytest.approx(8 * 1.0 + skipping.extra["rounds"] * 0.125)


def test_stage_0_is_rebuilt_from_its_copy_under_checkfree_plus_and_restarts_the_swarm_under_checkfree() -> None:
    opts, tokens, val = _setup()
    schedule = [[]] * 5 + [[0]] + [[]] * 2
    clock = CostModel(step_seconds=1.0)
    plain = _run(opts, tokens, val, BenchStrategy.CHECKFREE, schedule, costs=clock)
    assert plain.methods == {"unrecoverable": 1} and plain.curve[-1].step == 3  # 5 steps lost, 3 since
    plus = _run(opts, tokens, val, BenchStrategy.CHECKFREE_PLUS, schedule, costs=clock)
    exact = _run(opts, tokens, val, BenchStrategy.CHECKFREE_PLUS, [[]] * 8, costs=clock)
    assert plus.methods == {"embedding_replica": 1} and plus.curve[-1].step == 8
    assert plus.curve[-1].val_loss == exact.curve[-1].val_loss  # an exact copy
    ladder = _run(opts, tokens, val, BenchStrategy.LADDER, schedule, costs=clock, interval=3)
    assert ladder.methods == {"snapshot": 1}  # stage 1 holds stage 0's snapshot of step 3
    assert ladder.curve[-1].seconds > exact.curve[-1].seconds  # the restore's fetch is on the clock


def test_a_stage_state_counts_adamw_moments_before_the_first_step_too() -> None:
    from node.bench.simulate import _Sizes, _Swarm, nbytes

    opts, tokens, _ = _setup()
    swarm = _Swarm(opts.config, torch.device("cpu"))
    before = _Sizes.of(swarm)
    swarm.train_step(tokens)
    assert before == _Sizes.of(swarm)  # the same whether the optimizer has state yet or not
    # what a checkpoint holds, but for AdamW's step counters (a few bytes per tensor)
    assert [nbytes(rt.full_state()) for rt in swarm.stages] == pytest.approx(before.full, rel=1e-3)
    assert all(f > 2 * w for f, w in zip(before.full, before.weights, strict=True))


def test_the_failure_overhead_comes_from_a_live_bench_without_its_rollbacks() -> None:
    from node.bench.results import BenchResults, BenchRun, failure_overhead_from

    def run(strategy: str, seconds: list[float]) -> BenchRun:
        return BenchRun(strategy=strategy, failure_rate=0.01, failures=len(seconds), iterations_to_target=None,
                        seconds_to_target=None, final_val_loss=None, step_seconds=0.2, recover_seconds=seconds)

    live = BenchResults(mode="live", config={}, iterations=60, seed=0, target_loss=2.0, target_source="x",
                        costs={}, runs=[run("checkfree", [3.0, 5.0]), run("random", [4.0]),
                                        run("checkpoint", [9.0, 9.0, 9.0])])  # fmt: skip
    seconds, source = failure_overhead_from(live)
    assert seconds == 4.0 and "3 live recoveries" in source  # a rollback's replays are not a failure's overhead
    with pytest.raises(ValueError, match="live"):
        failure_overhead_from(live.model_copy(update={"mode": "simulate"}))
    with pytest.raises(ValueError, match="no recovery times"):
        failure_overhead_from(live.model_copy(update={"runs": [run("checkpoint", [9.0])]}))
