"""``swarm-node bench --mode live``: the strategies on a real local swarm with real SIGKILLs.

Each strategy runs ``swarm-node local`` (:class:`~node.local.launcher.LocalSwarm`) with the launcher's
``failure_rate``: at the start of every step each stage's node (stage 0 too, unless ``--no-stage0-failures``) is
SIGKILLed with probability p, and a spare (plus the respawned node) takes over. A stage 0 that its strategy cannot
rebuild stops the run: it never reaches the target, and its recovery method is ``unrecoverable``. Everything is
measured from the daemons' event log: step times, detection and recovery times, rollbacks, checkpoint snapshots and
writes, and the validation loss that stage 0 measures through the pipeline every ``eval_every`` committed steps. The
clock is the real wall-clock of the run, minus the time spent evaluating.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.bench import BenchOptions, BenchStrategy, run_label
from node.bench.results import BenchResults, BenchRun, CurvePoint, default_target, finish_run
from node.events import EvalEvent, Event, RecoveryEvent, StepEvent, UnrecoverableEvent, of_type
from node.local.launcher import LocalOptions, LocalSwarm, LocalSwarmError
from node.options import DurabilityOptions, EvalOptions, RecoveryOptions, RecoveryStrategy, TimingOptions
from node.recovery.planner import Method

Progress = Callable[[str, int, int], None]


@dataclass
class LiveOptions(BenchOptions):
    out: pathlib.Path = pathlib.Path("bench-results")  # each run's swarm workdir goes under out/runs/
    spares: int = 1
    threads: int | None = None
    step_timeout: float = 60.0
    checkpoint_to: str | None = None  # checkpoint runs store there (a path or URL), not in their workdir
    storage_endpoint: str | None = None  # its S3 endpoint (e.g. a local MinIO or moto server)
    run_id: str = dataclasses.field(default_factory=lambda: f"{int(time.time())}-{os.getpid()}")


def curve_from_events(events: list[Event]) -> list[CurvePoint]:
    """Validation points of a live run: wall-clock since the first evaluation, evaluations excluded."""
    evals = of_type(events, EvalEvent)
    if not evals:
        return []
    origin = evals[0].time
    step_times = sorted(e.time for e in of_type(events, StepEvent))
    points, eval_seconds = [], 0.0
    for e in evals:
        if e is not evals[0]:
            eval_seconds += e.seconds
        iteration = sum(t < e.time for t in step_times)
        seconds = max(0.0, e.time - origin - eval_seconds)
        points.append(CurvePoint(iteration=iteration, step=e.step, seconds=seconds, val_loss=e.val_loss))
    return points


def methods_of(events: list[Event]) -> dict[str, int]:
    """Recoveries by method, from a run's events; a stage that could not be rebuilt counts as
    ``unrecoverable``."""
    methods = Counter(e.method for e in of_type(events, RecoveryEvent))
    methods.update(Method.UNRECOVERABLE.value for _ in of_type(events, UnrecoverableEvent))
    return dict(methods)


def local_options(
    opts: LiveOptions, strategy: BenchStrategy, rate: float, workdir: pathlib.Path, interval: int | None = None
) -> LocalOptions:
    """The local swarm of one run: ``strategy`` (``none``: no failures, plain CheckFree) at failure rate ``rate``
    (checkpointing or snapshotting every ``interval`` steps, default the first of ``opts``' for each)."""
    failing, recovery = strategy.fails, strategy.recovery
    checkpoint_dir = None
    if recovery is RecoveryStrategy.CHECKPOINT:  # each bench run under a prefix of its own: a fresh start
        where = opts.checkpoint_to
        checkpoint_dir = f"{where.rstrip('/')}/{opts.run_id}/{workdir.name}" if where else str(workdir / "checkpoints")
    cfg = opts.config.model_copy(update={"out_of_order": recovery.out_of_order})
    return LocalOptions(
        config=cfg,
        steps=opts.iterations,
        workdir=workdir,
        # one share of the cores per process (stages and spares), as `swarm-node local` does
        threads=opts.threads or max(1, (os.cpu_count() or 1) // (cfg.num_stages + opts.spares)),
        quiet=True,
        timing=TimingOptions(step_timeout=opts.step_timeout),
        recovery=RecoveryOptions(
            strategy=recovery,
            lr_scale=opts.lr_scale,
            checkpoint_every=(recovery is RecoveryStrategy.CHECKPOINT and interval) or int(opts.checkpoint_every[0]),
            checkpoint_dir=checkpoint_dir,
            snapshot_neighbour_every=(recovery is RecoveryStrategy.LADDER and interval)
            or opts.snapshot_neighbour_every[0],
        ),
        eval=EvalOptions(every=opts.eval_every, batches=opts.eval_batches),
        durability=DurabilityOptions(storage_endpoint=opts.storage_endpoint),
        # a notice_fraction of the failures come with a notice: SIGTERM and a handoff instead of a SIGKILL
        failure_rate=rate * (1 - opts.notice_fraction) if failing else 0.0,
        preemption_rate=rate * opts.notice_fraction if failing else 0.0,
        notice_seconds=opts.notice_seconds,
        stage0_failures=opts.stage0_failures,
        spares=opts.spares if failing else 0,
        seed=opts.seed,
    )


def _live_run(
    opts: LiveOptions, strategy: BenchStrategy, rate: float, progress: Progress | None, variant: str = "",
    interval: int | None = None,
) -> BenchRun:  # fmt: skip
    label = f"{run_label(strategy, variant)} p={rate:g}"
    workdir = opts.out / "runs" / label.replace(" ", "-").replace("=", "")
    # a fresh start: the checkpoint strategy would otherwise resume from an earlier bench's checkpoints
    shutil.rmtree(workdir, ignore_errors=True)
    swarm = LocalSwarm(local_options(opts, strategy, rate, workdir, interval))
    if progress is not None:
        progress(label, 0, opts.iterations)
    try:
        summary = swarm.run()
    except LocalSwarmError as err:  # the run is reported as failed; the other strategies still run
        events = swarm.read_events()
        return BenchRun(
            strategy=strategy,
            variant=variant,
            failure_rate=rate,
            failures=len(swarm.kill_log),
            iterations_to_target=None,
            seconds_to_target=None,
            final_val_loss=None,
            step_seconds=0.0,
            methods=methods_of(events),
            extra={"error": str(err), "workdir": str(workdir)},
            curve=curve_from_events(events),
        )
    events = swarm.read_events()
    recoveries = summary["recoveries"]
    steps = [e.seconds for e in of_type(events, StepEvent)]
    extra: dict[str, Any] = {
        "detect_seconds": [r.get("detect_seconds") for r in recoveries],
        "rebuild_seconds": [r.get("rebuild_seconds") for r in recoveries],
        "rollbacks": len(summary["rollbacks"]),
        "aborted_steps": summary["aborted_steps"],
        "tokens_per_second": summary["tokens_per_second"],
        "wall_seconds": summary["wall_seconds"],
        "workdir": str(workdir),
    }
    if strategy is BenchStrategy.CHECKPOINT:
        extra["checkpoints"] = summary["checkpoints"]
    if progress is not None:
        progress(label, opts.iterations, opts.iterations)
    return BenchRun(
        strategy=strategy,
        variant=variant,
        failure_rate=rate if strategy.fails else 0.0,
        failures=len(summary["kills"]),
        iterations_to_target=None,
        seconds_to_target=None,
        final_val_loss=None,
        step_seconds=statistics.median(steps) if steps else 0.0,
        recover_seconds=[r["recover_seconds"] for r in recoveries if r.get("recover_seconds") is not None],
        methods=methods_of(events),
        extra=extra,
        curve=curve_from_events(events),
    )


def run_live(opts: LiveOptions, progress: Progress | None = None) -> BenchResults:
    """Runs the no-failure swarm (it gives the default target), then every strategy at every rate."""
    if opts.checkpoint_to and BenchStrategy.CHECKPOINT in opts.strategies:
        from node.storage import open_storage

        open_storage(opts.checkpoint_to, opts.storage_endpoint).check()  # bad storage fails here, in one line
    baseline = _live_run(opts, BenchStrategy.NONE, 0.0, progress)
    if opts.target_loss is None and not baseline.curve:
        raise LocalSwarmError(
            f"the no-failure run gave no validation loss ({baseline.extra.get('error', 'no eval events')}); "
            "it sets the default --target-loss"
        )
    runs = [baseline] if BenchStrategy.NONE in opts.strategies else []
    for rate in opts.failure_rates:
        for strategy in opts.strategies:
            if strategy is BenchStrategy.NONE:
                continue
            for variant, k in opts.variants(strategy):
                runs.append(_live_run(opts, strategy, rate, progress, variant, k if isinstance(k, int) else None))
    if opts.target_loss is not None:
        target, source = opts.target_loss, "given (--target-loss)"
    else:
        target = default_target(baseline.curve, opts.iterations)
        source = f"validation loss of the no-failure live run at about 2/3 of its {opts.iterations} steps"
    return BenchResults(
        mode="live",
        config=opts.config.model_dump(mode="json"),
        iterations=opts.iterations,
        seed=opts.seed,
        target_loss=target,
        target_source=source,
        costs={
            "clock": "real wall-clock of each run from its first evaluation, evaluation time excluded",
            "step_seconds_source": "median of the run's committed step times (stage 0's step events)",
            "recover_seconds_source": "per recovery, from the SIGKILL to the next committed step (launcher)",
            "checkpoint_every": [str(k) for k in opts.checkpoint_every],
            "snapshot_neighbour_every": opts.snapshot_neighbour_every,
            "checkpoint_storage": f"{opts.checkpoint_to}/{opts.run_id}" if opts.checkpoint_to else "each run's workdir",
            "failure_model": "the launcher SIGKILLs each block stage's node with probability p at the start "
            "of each step" + (", stage 0's too" if opts.stage0_failures else "; stage 0 does not fail")
            + "; a spare and the respawned node replace it (a stage 0 that cannot be rebuilt stops the run)",
            "spares": opts.spares,
            "eval": f"{opts.eval_batches} held-out microbatches every {opts.eval_every} committed steps",
        },
        runs=[finish_run(r, target) for r in runs],
        baseline=finish_run(baseline, target),
    )


__all__ = ["LiveOptions", "curve_from_events", "local_options", "run_live"]
