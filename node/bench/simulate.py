"""``swarm-node bench --mode simulate``: every stage in one process, failures drawn per iteration.

As in the CheckFree paper's experiments, each stage fails independently with probability p in every iteration
(a seeded schedule, the same for every strategy at a given p), at a seeded moment of the step: the step in
flight is lost up to there unless the failure was announced, and a snapshot or checkpoint still being sent or
written then is not there yet (:mod:`node.bench.failures`). Stage 0 (data, embedding, LM
head) fails too unless ``--no-stage0-failures`` (the paper's CheckFree runs spare it). The model, batches,
clipping and AdamW are the swarm's (:class:`~node.stage.runtime.StageRuntime` per stage,
:func:`~node.data.batches.training_batch`, and the commit decision :func:`~node.train.commit.decide_commit`
applied by :func:`~node.train.commit.apply_update`), and a lost stage is rebuilt with the daemon's own planner
and rebuild spec (:func:`~node.recovery.rebuild.rebuild_spec`, :func:`~node.recovery.rebuild.build_runtime`):

- ``none``: no failures (the reference curve; also the default target);
- ``checkfree`` / ``checkfree+``: :func:`~node.recovery.planner.plan_recovery` (checkfree+ trains with the
  out-of-order pipeline, copies edge stages from their swap partner, and rebuilds stage 0 from the copy its
  holders receive after every step); plain CheckFree cannot rebuild stage 0: the swarm restarts from step 0
  (method ``unrecoverable``);
- ``checkpoint``: every stage writes a checkpoint every K steps (one run per ``--checkpoint-every`` value;
  ``auto`` is Young–Daly over the measured costs); a checkpoint counts only once its write to off-node
  storage is done on the clock, and a failure rolls every stage back to the newest one every stage has;
- ``ladder``: every K committed steps each stage's full state is copied to its snapshot holder (the clone
  blocks; the send does not, but a snapshot is usable only once sent, and a stage still sending skips its
  turn); a lost stage whose holder lives goes back to it, at most K steps stale; below that, CheckFree;
- ``copy``: the nearest live block stage's weights; ``random``: fresh random weights (both with a fresh
  optimizer at lr × lr_scale, like CheckFree).

The clock (:mod:`node.bench.costs`) is iterations × the step time (measured: the no-failure run's median
iteration here, or ``--step-seconds``) plus what each strategy pays on top, at the simulated stage size
(``--stage-mib``): state copies measured here and scaled by bytes (the blocking clone of a snapshot, a
checkpoint or a rollback's load measured once, before the runs, so that every run pays the same for it),
checkpoint writes and reads at ``--storage-bandwidth`` / ``--storage-latency``, the state a rebuild
fetches at ``--link-bandwidth``, a stage-0 copy that takes longer to send than a step, and
``--failure-overhead-seconds`` per failure (detection, claim, start-up). Stages fail and are replaced in
parallel: a failure that hits several stages at once costs the slowest recovery. Evaluation time is not on
the clock.
"""

from __future__ import annotations

import pathlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from node.bench import AUTO, BenchStrategy, SimulateOptions, run_label
from node.bench.costs import MB, MIB, CostModel, WriteQueue, swarm_failure_probability, young_daly_interval
from node.bench.failures import failure_moment, failure_schedule, notice_schedule
from node.bench.results import BenchResults, BenchRun, CurvePoint, default_target, finish_run
from node.checkpoint import BackgroundWriter, CheckpointStore, restore_runtime
from node.config import SwarmConfig
from node.data import load_corpus, validation_batches
from node.data.batches import training_batch
from node.metrics import StageMetrics
from node.recovery.planner import Method, RecoveryPlan, plan_recovery
from node.recovery.rebuild import Fetched, build_runtime, rebuild_spec
from node.stage.runtime import StageRuntime
from node.topology import copy_holders, route_for, snapshot_holder
from node.train.commit import apply_update, decide_commit
from node.train.optim import autocast_for, grad_norm_sq

Progress = Callable[[str, int, int], None]  # (run label, iterations done, iterations of the run)
State = dict[str, torch.Tensor]


def nbytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class _Swarm:
    """Every stage's runtime in one process, trained along the swarm's routes."""

    def __init__(self, cfg: SwarmConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.stages = [StageRuntime(cfg, s, device) for s in range(cfg.num_stages)]
        self.committed = 0

    def train_step(self, tokens: torch.Tensor) -> None:
        t, cfg = self.cfg.train, self.cfg
        embed = self.stages[0].module
        for mb, (x, y) in enumerate(training_batch(tokens, t, self.committed)):
            with autocast_for(self.device):
                h = embed.embed_tokens(x.to(self.device))
                for s in route_for(mb, cfg.num_stages, cfg.out_of_order)[1:-1]:
                    h = self.stages[s].module(h)
                loss = embed.loss(h, y.to(self.device))
            (loss / t.microbatches_per_step).backward()
        norms_sq = {s: grad_norm_sq(rt.module) for s, rt in enumerate(self.stages)}
        decision = decide_commit(norms_sq, cfg.num_stages, t.grad_clip)
        if not decision.commit:  # a non-finite norm: the daemon would abort and replay, to the same result
            raise FloatingPointError(f"simulated step {self.committed + 1}: {decision.reason}")
        for rt, norm in zip(self.stages, decision.stage_norms, strict=True):
            apply_update(rt.module, rt.optimizer, decision.clip_coef)
            rt.last_grad_norm = norm  # before clipping, as the daemon records it
            rt.committed_step += 1
        self.committed += 1

    @torch.no_grad()
    def val_loss(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        embed, losses = self.stages[0].module, []
        for x, y in batches:
            with autocast_for(self.device):
                h = embed.embed_tokens(x.to(self.device))
                for s in range(1, self.cfg.num_stages):
                    h = self.stages[s].module(h)
                losses.append(float(embed.loss(h, y.to(self.device))))
        return sum(losses) / len(losses)

    def restore(self, stage: int, state: State, lr_scale: float, norm: float) -> None:
        """Puts ``stage`` back to a neighbour snapshot (weights and AdamW state of an earlier step) at the
        swarm's committed step, as the ladder's ``snapshot`` method does."""
        rt = StageRuntime(self.cfg, stage, self.device, lr_scale=lr_scale, committed_step=self.committed,
                          last_grad_norm=norm)  # fmt: skip
        rt.load_full_state(state)
        self.stages[stage] = rt

    def reset(self, stage: int) -> None:
        """Puts ``stage`` back to the seed's initial state at the swarm's committed step (the ladder's snapshot
        of step 0, which every node can build)."""
        self.stages[stage] = StageRuntime(self.cfg, stage, self.device, committed_step=self.committed)

    def rebuild(self, plan: RecoveryPlan, lr_scale: float, rng: random.Random) -> None:
        """Replaces stage ``plan.stage`` as the daemon's replacement node would (fresh optimizer)."""
        sources = [self.stages[s] for s in plan.sources]
        fetched = [Fetched(rt.stage, rt.committed_step, rt.last_grad_norm, rt.committed_state()) for rt in sources]
        seed = rng.getrandbits(62) if plan.method == Method.RANDOM else 0  # draws only for a random rebuild
        spec = rebuild_spec(plan, fetched, self.committed, lr_scale, seed)
        self.stages[plan.stage] = build_runtime(self.cfg, plan.stage, self.device, spec)

    def clone_seconds(self) -> list[float]:
        """Measured time to clone each stage's full state (what a checkpoint or snapshot blocks on)."""
        out = []
        for rt in self.stages:
            started = time.perf_counter()
            rt.full_state()
            out.append(time.perf_counter() - started)
        return out


@dataclass
class _Sizes:
    """Bytes of each stage's weights and full state (weights and AdamW), of the trained model."""

    weights: list[int]
    full: list[int]

    @classmethod
    def of(cls, swarm: _Swarm) -> _Sizes:
        """From the runtimes, counting AdamW's two moments per trainable parameter whether or not a step has
        created them yet (a fresh runtime's optimizer state is empty)."""
        weights = [nbytes(rt.committed_state()) for rt in swarm.stages]
        moments = [2 * sum(p.numel() * p.element_size() for p in rt.module.parameters() if p.requires_grad)
                   for rt in swarm.stages]  # fmt: skip
        return cls(weights, [w + m for w, m in zip(weights, moments, strict=True)])


@dataclass
class _Snapshot:
    step: int
    state: State
    lr_scale: float
    grad_norm: float
    ready_at: float  # clock time its send to the holder completes


@dataclass
class _Run:
    """One strategy's run in progress: the swarm, the clock and what it has paid."""

    swarm: _Swarm
    costs: CostModel
    sizes: _Sizes
    record: BenchRun
    extra: float = 0.0  # seconds on the clock beyond the iterations themselves
    clones: list[float] = field(default_factory=list)  # blocking seconds of each checkpoint / snapshot round
    stalls: float = 0.0  # waiting for a write or a stage-0 copy
    lost: float = 0.0  # work of steps in flight lost to unannounced failures
    rollbacks: list[int] = field(default_factory=list)  # checkpoint: the step each rollback went back to

    def now(self, iteration: int) -> float:
        return iteration * self.costs.step_seconds + self.extra

    def count(self, method: str) -> None:
        self.record.methods[method] = self.record.methods.get(method, 0) + 1


def _roll_back(run: _Run, stores: list[CheckpointStore], writers: list[BackgroundWriter], queues: list[WriteQueue],
               now: float) -> int:  # fmt: skip
    """Every stage back to the newest checkpoint that every stage had written to storage by ``now`` (weights,
    AdamW state, data position); returns that step (0: the seed's initial weights)."""
    swarm = run.swarm
    for w in writers:
        w.wait()
    on_disk = [set(st.steps()) for st in stores]
    durable = set.intersection(*(q.durable(now) & d for q, d in zip(queues, on_disk, strict=True)))
    target = max(durable, default=0)
    for s, st in enumerate(stores):
        swarm.stages[s] = restore_runtime(swarm.cfg, s, swarm.device, st.load(target) if target else None)
    for q in queues:
        q.fail(now, target)
    swarm.committed = target
    return target



def _recover(run: _Run, stage: int, live: frozenset[int], strategy: BenchStrategy, opts: SimulateOptions,
             snapshots: dict[int, list[_Snapshot]], max_stale: int, rng: random.Random,
             now: float) -> float:  # fmt: skip
    """Rebuilds one lost stage as the planner says; returns its cost on the clock (the measured operation at
    the simulated size, plus the state it fetches over the link). A stage 0 that cannot be rebuilt restarts
    the whole swarm from step 0."""
    swarm, costs, sizes = run.swarm, run.costs, run.sizes
    cfg = swarm.cfg
    usable = {s: next((x for x in reversed(snaps) if x.ready_at <= now), None) for s, snaps in snapshots.items()}
    held = {s: (snapshot_holder(s, cfg.num_stages), x.step) for s, x in usable.items() if x is not None}
    copies = {h: swarm.committed for h in copy_holders(cfg.num_stages)}  # sent after every commit: exact
    plan = plan_recovery(stage, cfg.num_stages, live, max(1, swarm.committed), strategy.recovery, replicas=copies,
                         snapshots=held, max_stale=max_stale)  # fmt: skip
    run.count(plan.method.value)
    started = time.perf_counter()
    if plan.method == Method.UNRECOVERABLE:  # nothing can rebuild stage 0: training starts over
        run.swarm = _Swarm(cfg, swarm.device)
        snapshots.clear()
        return costs.failure_overhead
    if plan.method == Method.SNAPSHOT and not plan.sources:  # the initial state: built, not fetched
        swarm.reset(stage)
        fetched = 0
    elif plan.method == Method.SNAPSHOT:
        snap = usable[stage]
        assert snap is not None  # the planner only picks a usable one
        swarm.restore(stage, snap.state, snap.lr_scale, snap.grad_norm)
        fetched = sizes.full[stage]
    elif plan.method == Method.EMBEDDING_REPLICA:  # the holder's copy of stage 0 at the committed step: exact
        rt = swarm.stages[0]
        rt.load_full_state(rt.full_state())
        fetched = sizes.full[0]
    else:
        swarm.rebuild(plan, opts.lr_scale, rng)
        fetched = sum(sizes.weights[s] for s in plan.sources)
    operation = costs.scaled(time.perf_counter() - started)
    return operation + costs.link_seconds(fetched) + costs.failure_overhead


def _simulate_run(
    opts: SimulateOptions,
    strategy: BenchStrategy,
    rate: float,
    schedule: list[list[int]],
    tokens: torch.Tensor,
    val: list[tuple[torch.Tensor, torch.Tensor]],
    progress: Progress | None,
    notices: frozenset[tuple[int, int]] = frozenset(),
    costs: CostModel | None = None,
    interval: int | None = None,
    variant: str = "",
) -> tuple[BenchRun, list[float]]:
    """Trains one strategy on the simulated clock ``costs`` (default: this machine's measured step, the
    trained model's size), checkpointing or snapshotting every ``interval`` steps; returns the run and the
    measured iteration times."""
    cfg = opts.config.model_copy(update={"out_of_order": strategy.recovery.out_of_order})
    device = torch.device(opts.device)
    swarm = _Swarm(cfg, device)
    if strategy in (BenchStrategy.CHECKPOINT, BenchStrategy.LADDER) and interval is None:
        raise ValueError(f"a {strategy} run needs its interval")
    sizes = _Sizes.of(swarm)
    costs = costs or cost_model(opts, 1.0, sizes, max(swarm.clone_seconds()))
    record = BenchRun(strategy=strategy, variant=variant, failure_rate=rate if strategy.fails else 0.0, failures=0,
                      iterations_to_target=None, seconds_to_target=None, final_val_loss=None,
                      step_seconds=costs.step_seconds)  # fmt: skip
    run = _Run(swarm, costs, sizes, record)
    rng = random.Random(f"{opts.seed}:{strategy}:{rate!r}")
    step_times: list[float] = []
    snapshots: dict[int, list[_Snapshot]] = {}  # ladder: each stage's two newest neighbour snapshots
    sending_until = [0.0] * cfg.num_stages
    k = interval or 1  # only the ladder and checkpointing use it, and both are given theirs
    tmp = tempfile.TemporaryDirectory(prefix="swarm-node-bench-") if strategy is BenchStrategy.CHECKPOINT else None
    writers: list[BackgroundWriter] = []
    stores: list[CheckpointStore] = []
    queues = [WriteQueue() for _ in range(cfg.num_stages)]
    if tmp is not None:
        metrics = StageMetrics()
        stores = [CheckpointStore(pathlib.Path(tmp.name), s, cfg.fingerprint()) for s in range(cfg.num_stages)]
        writers = [BackgroundWriter(st, metrics, lambda *_: None) for st in stores]
    label = f"{run_label(strategy, variant)} p={rate:g}"
    stage0_copy = costs.link_seconds(2 * run.sizes.full[0]) if strategy is BenchStrategy.CHECKFREE_PLUS else 0.0
    try:
        record.curve.append(CurvePoint(iteration=0, step=0, seconds=0.0, val_loss=run.swarm.val_loss(val)))
        for it in range(opts.iterations):
            failed = list(schedule[it]) if strategy.fails else []
            moment = failure_moment(opts.seed, it) * costs.step_seconds if failed else 0.0
            now = run.now(it) + moment  # when they strike: what is sent or written by then counts
            paid = [0.0]  # stages are replaced in parallel: the slowest recovery is on the clock
            for stage in [s for s in failed if (it, s) in notices]:
                # a notice: the stage's exact state moves to its successor (method handoff, whatever the strategy)
                failed.remove(stage)
                record.failures += 1
                started = time.perf_counter()
                rt = run.swarm.stages[stage]
                rt.load_full_state(rt.full_state())
                run.count(Method.HANDOFF.value)
                paid.append(costs.scaled(time.perf_counter() - started) + costs.link_seconds(run.sizes.full[stage]))
                record.recover_seconds.append(paid[-1])
            if failed:  # unannounced: the step in flight is aborted and replayed, its work up to now lost
                run.extra += moment
                run.lost += moment
            if failed and strategy is BenchStrategy.CHECKPOINT:  # one rollback, however many stages were lost
                record.failures += len(failed)
                run.rollbacks.append(_roll_back(run, stores, writers, queues, now))
                run.count(Method.CHECKPOINT.value)
                # every node reads its own checkpoint back at once: the largest stage's read, and its load into
                # memory (a copy of its state, measured here) are on the clock
                paid.append(costs.storage_seconds(max(run.sizes.full)) + costs.clone + costs.failure_overhead)
                record.recover_seconds.append(paid[-1])
            elif failed:
                record.failures += len(failed)
                live = frozenset(range(cfg.num_stages)) - set(failed)
                for stage in failed:
                    restarts = record.methods.get(Method.UNRECOVERABLE.value, 0)
                    paid.append(_recover(run, stage, live, strategy, opts, snapshots, k, rng, now))
                    record.recover_seconds.append(paid[-1])
                    if record.methods.get(Method.UNRECOVERABLE.value, 0) > restarts:
                        break  # the swarm started over: every stage is new
            run.extra += max(paid)
            started = time.perf_counter()
            run.swarm.train_step(tokens)
            step_times.append(time.perf_counter() - started)
            committed, now = run.swarm.committed, run.now(it + 1)
            if stage0_copy > costs.step_seconds:  # a copy that takes longer to send than a step holds stage 0 up
                run.stalls += stage0_copy - costs.step_seconds
                run.extra += stage0_copy - costs.step_seconds
            if strategy is BenchStrategy.LADDER and committed % k == 0:
                sending = [s for s in range(cfg.num_stages) if sending_until[s] <= now]  # the others skip a turn
                for stage in sending:
                    rt = run.swarm.stages[stage]
                    sending_until[stage] = now + costs.link_seconds(run.sizes.full[stage])
                    snap = _Snapshot(committed, rt.full_state(), rt.lr_scale, rt.last_grad_norm, sending_until[stage])
                    snapshots[stage] = [*snapshots.get(stage, [])[-1:], snap]
                if sending:  # a round in which every stage is still sending clones nothing
                    run.clones.append(costs.clone)
                    run.extra += run.clones[-1]
            if writers and committed % k == 0:
                run.clones.append(costs.clone)
                stall = 0.0
                for stage, (rt, w) in enumerate(zip(run.swarm.stages, writers, strict=True)):
                    w.wait()  # the daemon's rule: at most one snapshot in memory besides the live state
                    w.submit(committed, rt.full_state(), lr_scale=rt.lr_scale, grad_norm=rt.last_grad_norm,
                             data_position=committed * cfg.train.microbatches_per_step * cfg.train.microbatch_size)
                    write = costs.storage_seconds(run.sizes.full[stage])
                    stall = max(stall, queues[stage].submit(committed, now, write))
                run.stalls += stall
                run.extra += run.clones[-1] + stall
            done = it + 1
            # by committed step, as stage 0 evaluates live: a run that replays a step is evaluated at the same
            # steps as one that does not, so a strategy that retraces the no-failure run shows the same losses
            if committed % opts.eval_every == 0 or done == opts.iterations:
                record.curve.append(CurvePoint(iteration=done, step=run.swarm.committed, seconds=run.now(done),
                                               val_loss=run.swarm.val_loss(val)))  # fmt: skip
            if progress is not None:
                progress(label, done, opts.iterations)
    finally:
        for w in writers:
            w.close()
        if tmp is not None:
            tmp.cleanup()
    record.extra = {"in_flight_lost_seconds": run.lost}
    if strategy in (BenchStrategy.LADDER, BenchStrategy.CHECKPOINT):
        record.extra |= {
            "every": k,
            "rounds": len(run.clones),
            "blocking_seconds_mean": statistics.fmean(run.clones) if run.clones else 0.0,
            "stall_seconds_total": run.stalls,
            "bytes_per_round_all_stages": int(sum(run.sizes.full) * costs.byte_scale),
        }
        if strategy is BenchStrategy.CHECKPOINT:
            record.extra["rollback_steps"] = run.rollbacks
    elif stage0_copy:
        record.extra |= {"stage0_copy_seconds": stage0_copy, "stall_seconds_total": run.stalls}
    return record, step_times


def cost_model(opts: SimulateOptions, step_seconds: float, sizes: _Sizes, clone_seconds: float) -> CostModel:
    """The clock of every run: ``opts``' regime over the measured step time, the trained model's sizes and its
    measured clone of the largest stage's full state."""
    block = statistics.fmean(sizes.weights[1:]) if len(sizes.weights) > 1 else sizes.weights[0]
    return CostModel(
        step_seconds=opts.step_seconds or step_seconds,
        byte_scale=opts.stage_mib * MIB / block if opts.stage_mib else 1.0,
        storage_bandwidth=opts.storage_bandwidth * MB,
        storage_latency=opts.storage_latency,
        link_bandwidth=opts.link_bandwidth * MB,
        failure_overhead=opts.failure_overhead_seconds,
        clone_seconds=clone_seconds,
    )


def auto_interval(costs: CostModel, sizes: _Sizes, rate: float, failing: int) -> int:
    """``--checkpoint-every auto``: Young–Daly over the blocking clone and the write to storage measured for
    this regime, at this failure rate."""
    return young_daly_interval(costs.clone, costs.storage_seconds(max(sizes.full)),
                               costs.step_seconds, swarm_failure_probability(rate, failing))  # fmt: skip


def run_simulation(opts: SimulateOptions, progress: Progress | None = None) -> BenchResults:
    """Runs every strategy (each checkpoint interval) at every failure rate; ``none`` always runs (it gives
    the default target and the measured step time)."""
    cfg = opts.config
    corpus = load_corpus(cfg.data)
    corpus.check_fits(cfg.train.seq_len)
    val = validation_batches(
        corpus.val, num_batches=opts.eval_batches, batch_size=cfg.train.microbatch_size, seq_len=cfg.train.seq_len
    )
    probe = _Swarm(cfg, torch.device(opts.device))
    probe.train_step(corpus.train)  # AdamW's state exists from the first step on: clone what a checkpoint clones
    sizes = _Sizes.of(probe)
    clone = max(statistics.median(c) for c in zip(*(probe.clone_seconds() for _ in range(9)), strict=True))
    base_costs = cost_model(opts, 1.0, sizes, clone)  # step time filled in from the no-failure run below
    baseline, base_times = _simulate_run(opts, BenchStrategy.NONE, 0.0, [], corpus.train, val, progress,
                                         costs=base_costs)  # fmt: skip
    measured_step = statistics.median(base_times)
    costs = cost_model(opts, measured_step, sizes, clone)
    for point in baseline.curve:
        point.seconds = point.iteration * costs.step_seconds
    baseline.step_seconds = costs.step_seconds
    runs: list[tuple[BenchRun, list[float]]] = [(baseline, base_times)]
    failing = cfg.num_stages if opts.stage0_failures else cfg.num_stages - 1
    intervals: dict[str, int] = {}
    for rate in opts.failure_rates:
        schedule = failure_schedule(opts.seed, rate, opts.iterations, cfg.num_stages, opts.stage0_failures)
        notices = frozenset(notice_schedule(opts.seed, opts.notice_fraction, schedule, cfg.num_stages))
        for strategy in opts.strategies:
            if strategy is BenchStrategy.NONE:
                continue
            for variant, k in opts.variants(strategy):
                if k == AUTO:
                    k = intervals[f"{rate:g}"] = auto_interval(costs, sizes, rate, failing)
                runs.append(_simulate_run(opts, strategy, rate, schedule, corpus.train, val, progress, notices,
                                          costs, k, variant))  # fmt: skip
    if opts.target_loss is not None:
        target, source = opts.target_loss, "given (--target-loss)"
    else:
        target = default_target(baseline.curve, opts.iterations)
        source = f"validation loss of the no-failure run at about 2/3 of its {opts.iterations} iterations"
    wanted = [r for r, _ in runs if r.strategy in opts.strategies]
    return BenchResults(
        mode="simulate",
        config=cfg.model_dump(mode="json"),
        iterations=opts.iterations,
        seed=opts.seed,
        target_loss=target,
        target_source=source,
        costs={
            "step_seconds": costs.step_seconds,
            "step_seconds_source": "given (--step-seconds)" if opts.step_seconds else "median of the no-failure "
            "run's measured iterations (forward, backward, clipping and AdamW of all stages in one process)",
            "measured_step_seconds": measured_step,
            "step_seconds_by_run": {
                f"{run_label(r.strategy, r.variant)}@{r.failure_rate:g}": statistics.fmean(times)
                for r, times in runs if times
            },
            "stage_bytes": {"weights": sizes.weights, "full_state": sizes.full, "byte_scale": costs.byte_scale,
                            "source": f"a block stage's weights given as {opts.stage_mib} MiB (--stage-mib)"
                            if opts.stage_mib else "the trained model's own"},
            "storage": {"bandwidth_mb_s": opts.storage_bandwidth, "latency_s": opts.storage_latency,
                        "source": "given (--storage-bandwidth, --storage-latency): a checkpoint counts once its "
                        "write is done; a rollback reads the largest stage's back"},
            "link_bandwidth_s": opts.link_bandwidth,
            "link_source": "given (--link-bandwidth): what a rebuild fetches (weights of its sources; a snapshot's "
            "or stage-0 copy's full state), a snapshot's send, stage 0's copy to its two holders",
            "clone_seconds_measured": clone,
            "clone_source": "the largest stage's median of 9 clones of its full state, measured before the runs; "
            "× byte_scale, charged for every snapshot, checkpoint and rollback load of every run",
            "recover_seconds_source": "measured time of each recovery operation here × byte_scale, plus the "
            "transfer, plus failure_overhead_seconds; parallel recoveries cost the slowest",
            "failure_overhead_seconds": opts.failure_overhead_seconds,
            "checkpoint_every": [str(k) for k in opts.checkpoint_every],
            "snapshot_neighbour_every": opts.snapshot_neighbour_every,
            "checkpoint_every_auto": intervals,
            "checkpoint_auto_source": "Young–Daly: K·T = sqrt(2·C·M), C the blocking clone, M the mean time "
            "between swarm failures; never shorter than one write",
            "lr_scale": opts.lr_scale,
            "eval": f"{opts.eval_batches} held-out microbatches every {opts.eval_every} committed steps (off the "
            "clock)",
            "failure_model": "each stage fails with probability p in each iteration, at a uniform moment of the "
            "step; an unannounced failure loses the step's work up to there (in_flight_lost_seconds)"
            + ("" if opts.stage0_failures else "; stage 0 (data, embedding, head) does not fail"),
        },
        runs=[finish_run(r, target) for r in wanted],
        baseline=finish_run(baseline, target),
    )


__all__ = ["SimulateOptions", "auto_interval", "cost_model", "failure_schedule", "run_simulation"]
