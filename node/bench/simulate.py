"""``swarm-node bench --mode simulate``: every stage in one process, failures drawn per iteration.

As in the CheckFree paper's experiments, each block stage fails independently with probability p at the
start of every iteration (a seeded schedule, the same for every strategy at a given p; stage 0 holds the
data and does not fail, as in the paper's CheckFree runs). The model, batches, clipping and AdamW are
the swarm's (:class:`~node.stage.runtime.StageRuntime` per stage, :func:`~node.data.batches.training_batch`,
and the commit decision :func:`~node.train.commit.decide_commit` applied by
:func:`~node.train.commit.apply_update`), and a lost stage is rebuilt with the daemon's own planner and
rebuild spec (:func:`~node.recovery.rebuild.rebuild_spec`, :func:`~node.recovery.rebuild.build_runtime`):

- ``none``: no failures (the reference curve; also the default target);
- ``checkfree`` / ``checkfree+``: :func:`~node.recovery.planner.plan_recovery` (checkfree+ trains with
  the out-of-order pipeline and copies edge stages from their swap partner);
- ``checkpoint``: every stage writes a checkpoint every K steps with the daemon's background writer; a
  failure rolls every stage (weights, AdamW state, data position) back to the newest common checkpoint;
- ``ladder``: every K committed steps each stage's full state is copied aside (its neighbour snapshot; the
  blocking clone is on the clock, the send is not simulated); a lost stage whose holder survives goes back
  to that snapshot, at most K steps stale, and the planner falls back to CheckFree otherwise;
- ``copy``: the nearest live block stage's weights; ``random``: fresh random weights (both with a fresh
  optimizer at lr × lr_scale, like CheckFree);
- ``redundant``: no progress is ever lost, but every iteration costs ``redundant_factor`` times more. Its
  trajectory is the no-failure run's, so its curve is that run's with the clock scaled.

The clock is iterations × a measured step time (the median over every simulated iteration on this
machine) plus each strategy's measured extra costs: the recovery operation itself (fetch-free here:
averaging, copying, re-initialising or loading checkpoints), the blocking part of checkpoint snapshots,
and ``failure_overhead_seconds`` per failure (detection and replacement start-up, e.g. as measured by
``--mode live``). Evaluation time is not on the clock.
"""

from __future__ import annotations

import pathlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from node.bench import BenchOptions, BenchStrategy
from node.bench.results import BenchResults, BenchRun, CurvePoint, default_target, finish_run
from node.checkpoint import BackgroundWriter, CheckpointStore, restore_runtime, rollback_target
from node.config import SwarmConfig
from node.data import load_corpus, validation_batches
from node.data.batches import training_batch
from node.metrics import StageMetrics
from node.recovery.planner import Method, RecoveryPlan, plan_recovery
from node.recovery.rebuild import Fetched, build_runtime, rebuild_spec
from node.stage.runtime import StageRuntime
from node.topology import route_for, snapshot_holder
from node.train.commit import apply_update, decide_commit
from node.train.optim import autocast_for, grad_norm_sq

Progress = Callable[[str, int, int], None]  # (run label, iterations done, iterations of the run)


@dataclass
class SimulateOptions(BenchOptions):
    failure_overhead_seconds: float = 0.0  # added to every failure (detection, replacement start-up)
    device: str = "cpu"


def failure_schedule(seed: int, rate: float, iterations: int, num_stages: int) -> list[list[int]]:
    """Block stages failing at the start of each iteration: seeded, the same for every strategy at ``rate``.

    One uniform draw per (iteration, stage), whatever the rate: a stage fails where its draw is below the
    rate, so the failures at a higher rate include those at a lower one (rates compare like for like)."""
    rng = random.Random(f"swarm-node-bench:{seed}")
    return [[s for s in range(1, num_stages) if rng.random() < rate] for _ in range(iterations)]


def notice_schedule(seed: int, fraction: float, schedule: list[list[int]], num_stages: int) -> set[tuple[int, int]]:
    """The (iteration, stage) failures that come with a preemption notice: one uniform draw per position, the
    same for every strategy and rate (so a higher fraction's notices include a lower one's)."""
    rng = random.Random(f"swarm-node-bench-notice:{seed}")
    draws = [[rng.random() for _ in range(num_stages)] for _ in schedule]
    return {(it, s) for it, failed in enumerate(schedule) for s in failed if draws[it][s] < fraction}


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

    def restore(self, stage: int, state: dict[str, torch.Tensor], lr_scale: float, norm: float) -> None:
        """Puts ``stage`` back to a neighbour snapshot (weights and AdamW state of an earlier step) at the
        swarm's committed step, as the ladder's ``snapshot`` method does."""
        rt = StageRuntime(self.cfg, stage, self.device, lr_scale=lr_scale, committed_step=self.committed,
                          last_grad_norm=norm)  # fmt: skip
        rt.load_full_state(state)
        self.stages[stage] = rt

    def rebuild(self, plan: RecoveryPlan, lr_scale: float, rng: random.Random) -> None:
        """Replaces stage ``plan.stage`` as the daemon's replacement node would (fresh optimizer)."""
        sources = [self.stages[s] for s in plan.sources]
        fetched = [Fetched(rt.stage, rt.committed_step, rt.last_grad_norm, rt.committed_state()) for rt in sources]
        seed = rng.getrandbits(62) if plan.method == Method.RANDOM else 0  # draws only for a random rebuild
        spec = rebuild_spec(plan, fetched, self.committed, lr_scale, seed)
        self.stages[plan.stage] = build_runtime(self.cfg, plan.stage, self.device, spec)


def _roll_back(
    swarm: _Swarm, stores: list[CheckpointStore], writers: list[BackgroundWriter], device: torch.device
) -> None:
    """Every stage back to the newest checkpoint all stages have (weights, AdamW state, data position)."""
    cfg = swarm.cfg
    for w in writers:
        w.wait()
    target = rollback_target({s: st.steps() for s, st in enumerate(stores)}, cfg.num_stages)
    for s, st in enumerate(stores):
        swarm.stages[s] = restore_runtime(cfg, s, device, st.load(target) if target else None)
    swarm.committed = target


def _simulate_run(
    opts: SimulateOptions,
    strategy: BenchStrategy,
    rate: float,
    schedule: list[list[int]],
    tokens: torch.Tensor,
    val: list[tuple[torch.Tensor, torch.Tensor]],
    progress: Progress | None,
    notices: frozenset[tuple[int, int]] = frozenset(),
) -> tuple[BenchRun, list[float]]:
    """Trains one strategy; returns the run (clock not yet applied: curve seconds are extra costs so far)
    and the measured iteration times."""
    cfg = opts.config.model_copy(update={"out_of_order": strategy.recovery.out_of_order})
    device = torch.device(opts.device)
    swarm = _Swarm(cfg, device)
    rng = random.Random(f"{opts.seed}:{strategy}:{rate!r}")
    run = BenchRun(
        strategy=strategy,
        failure_rate=rate if strategy is not BenchStrategy.NONE else 0.0,
        failures=0,
        iterations_to_target=None,
        seconds_to_target=None,
        final_val_loss=None,
        step_seconds=0.0,
    )
    step_times: list[float] = []
    extra = 0.0  # measured costs beyond the iterations themselves
    # ladder: stage -> (committed step, full state, lr scale, last grad norm) of its newest neighbour snapshot
    neighbour_snapshots: dict[int, tuple[int, dict[str, torch.Tensor], float, float]] = {}
    snapshots: list[float] = []
    written: list[tuple[float, int]] = []  # (seconds, bytes) of each background write
    tmp = tempfile.TemporaryDirectory(prefix="swarm-node-bench-") if strategy is BenchStrategy.CHECKPOINT else None
    writers: list[BackgroundWriter] = []
    stores: list[CheckpointStore] = []
    if tmp is not None:
        metrics = StageMetrics()
        stores = [CheckpointStore(pathlib.Path(tmp.name), s, cfg.fingerprint()) for s in range(cfg.num_stages)]
        writers = [BackgroundWriter(st, metrics, lambda _step, sec, n: written.append((sec, n))) for st in stores]
    label = f"{strategy} p={rate:g}"
    try:
        run.curve.append(CurvePoint(iteration=0, step=0, seconds=0.0, val_loss=swarm.val_loss(val)))
        for it in range(opts.iterations):
            failed = list(schedule[it]) if strategy.fails else []
            for stage in [s for s in failed if (it, s) in notices]:
                # a notice: the stage's exact state moves to its successor (method handoff, whatever the strategy)
                failed.remove(stage)
                run.failures += 1
                started = time.perf_counter()
                rt = swarm.stages[stage]
                rt.load_full_state(rt.full_state())
                run.methods["handoff"] = run.methods.get("handoff", 0) + 1
                run.recover_seconds.append(time.perf_counter() - started)
                extra = sum(run.recover_seconds) + sum(snapshots)
            if failed:
                run.failures += len(failed)
                if strategy is BenchStrategy.CHECKPOINT:  # one rollback, however many stages were lost
                    started = time.perf_counter()
                    _roll_back(swarm, stores, writers, device)
                    run.methods["checkpoint"] = run.methods.get("checkpoint", 0) + 1
                    run.recover_seconds.append(time.perf_counter() - started + opts.failure_overhead_seconds)
                else:
                    live = frozenset(range(1, cfg.num_stages)) - set(failed)
                    held = {s: (snapshot_holder(s, cfg.num_stages), h[0]) for s, h in neighbour_snapshots.items()}
                    for stage in failed:
                        started = time.perf_counter()
                        plan = plan_recovery(stage, cfg.num_stages, live, max(1, swarm.committed), strategy.recovery,
                                             snapshots=held, max_stale=opts.snapshot_neighbour_every)  # fmt: skip
                        if plan.method == Method.SNAPSHOT:
                            swarm.restore(stage, *neighbour_snapshots[stage][1:])
                        else:
                            swarm.rebuild(plan, opts.lr_scale, rng)
                        run.methods[plan.method.value] = run.methods.get(plan.method.value, 0) + 1
                        run.recover_seconds.append(time.perf_counter() - started + opts.failure_overhead_seconds)
                extra = sum(run.recover_seconds) + sum(snapshots)
            started = time.perf_counter()
            swarm.train_step(tokens)
            step_times.append(time.perf_counter() - started)
            if strategy is BenchStrategy.LADDER and swarm.committed % opts.snapshot_neighbour_every == 0:
                started = time.perf_counter()
                for stage, rt in enumerate(swarm.stages):
                    neighbour_snapshots[stage] = (swarm.committed, rt.full_state(), rt.lr_scale, rt.last_grad_norm)
                snapshots.append(time.perf_counter() - started)
                extra = sum(run.recover_seconds) + sum(snapshots)
            if writers and swarm.committed % opts.checkpoint_every == 0:
                started = time.perf_counter()
                for rt, w in zip(swarm.stages, writers, strict=True):
                    w.wait()  # the daemon's rule: at most one snapshot in memory besides the live state
                    w.submit(
                        swarm.committed,
                        rt.full_state(),
                        data_position=swarm.committed * cfg.train.microbatches_per_step * cfg.train.microbatch_size,
                        lr_scale=rt.lr_scale,
                        grad_norm=rt.last_grad_norm,
                    )
                snapshots.append(time.perf_counter() - started)
                extra = sum(run.recover_seconds) + sum(snapshots)
            done = it + 1
            if done % opts.eval_every == 0 or done == opts.iterations:
                point = CurvePoint(iteration=done, step=swarm.committed, seconds=extra, val_loss=swarm.val_loss(val))
                run.curve.append(point)
            if progress is not None:
                progress(label, done, opts.iterations)
    finally:
        for w in writers:
            w.close()
        if tmp is not None:
            tmp.cleanup()
    if snapshots and strategy is BenchStrategy.LADDER:
        run.extra = {
            "snapshot_neighbour_every": opts.snapshot_neighbour_every,
            "snapshots": len(snapshots),
            "snapshot_seconds_mean": statistics.fmean(snapshots),
            "snapshot_seconds_total": sum(snapshots),
        }
    elif snapshots:
        run.extra = {
            "checkpoint_every": opts.checkpoint_every,
            "checkpoints": len(snapshots),
            "snapshot_seconds_mean": statistics.fmean(snapshots),
            "snapshot_seconds_total": sum(snapshots),
            "background_writes": len(written),
            "background_write_seconds_mean": statistics.fmean(sec for sec, _ in written) if written else None,
            "checkpoint_bytes_all_stages": sum(n for _, n in written) // max(1, len(snapshots)),
        }
    return run, step_times


def run_simulation(opts: SimulateOptions, progress: Progress | None = None) -> BenchResults:
    """Runs every strategy at every failure rate; ``none`` always runs (it gives the default target)."""
    cfg = opts.config
    corpus = load_corpus(cfg.data)
    corpus.check_fits(cfg.train.seq_len)
    val = validation_batches(
        corpus.val, num_batches=opts.eval_batches, batch_size=cfg.train.microbatch_size, seq_len=cfg.train.seq_len
    )
    runs: list[tuple[BenchRun, list[float]]] = []
    baseline, base_times = _simulate_run(opts, BenchStrategy.NONE, 0.0, [], corpus.train, val, progress)
    runs.append((baseline, base_times))
    for rate in opts.failure_rates:
        schedule = failure_schedule(opts.seed, rate, opts.iterations, cfg.num_stages)
        notices = frozenset(notice_schedule(opts.seed, opts.notice_fraction, schedule, cfg.num_stages))
        for strategy in opts.strategies:
            if strategy is BenchStrategy.NONE:
                continue
            if strategy is BenchStrategy.REDUNDANT:
                redundant = baseline.model_copy(deep=True, update={"strategy": strategy, "failure_rate": rate})
                redundant.failures = sum(len(f) for f in schedule)
                runs.append((redundant, base_times))
                if progress is not None:
                    progress(f"redundant p={rate:g}", opts.iterations, opts.iterations)
                continue
            runs.append(_simulate_run(opts, strategy, rate, schedule, corpus.train, val, progress, notices))
    # the clock: iterations × one measured step time, plus each run's measured extra costs
    step_seconds = statistics.median(t for _, times in runs for t in times)
    for run, _ in runs:
        redundant = run.strategy is BenchStrategy.REDUNDANT
        run.step_seconds = step_seconds * (opts.redundant_factor if redundant else 1.0)
        for point in run.curve:
            point.seconds = point.iteration * run.step_seconds + (0.0 if redundant else point.seconds)
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
            "step_seconds": step_seconds,
            "step_seconds_source": "median of every simulated iteration's measured time (forward, backward, "
            "clipping and AdamW of all stages in one process) on this machine",
            "step_seconds_by_run": {
                f"{r.strategy}@{r.failure_rate:g}": statistics.fmean(times) for r, times in runs if times
            },
            "redundant_factor": opts.redundant_factor,
            "redundant_factor_source": "given (--redundant-factor); default 151.04/91.35, the paper's measured "
            "s/iteration of redundant computation over checkpointing",
            "recover_seconds_source": "measured time of each recovery operation in this process (average, copy, "
            "re-initialisation or loading every stage's checkpoint) plus failure_overhead_seconds",
            "failure_overhead_seconds": opts.failure_overhead_seconds,
            "checkpoint_every": opts.checkpoint_every,
            "checkpoint_snapshot_source": "measured blocking time of each snapshot; the write itself runs on a "
            "background thread, as in the daemon",
            "lr_scale": opts.lr_scale,
            "eval": f"{opts.eval_batches} held-out microbatches every {opts.eval_every} iterations (off the clock)",
            "failure_model": "each block stage fails with probability p at the start of each iteration; "
            "stage 0 (data, embedding, head) does not fail",
        },
        runs=[finish_run(r, target) for r in wanted],
        baseline=finish_run(baseline, target),
    )


__all__ = ["SimulateOptions", "failure_schedule", "run_simulation"]
