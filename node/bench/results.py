"""The results of a benchmark run: typed records, time-to-target, and the loss-vs-time figure."""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import platform
import statistics
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from node import __version__
from node.bench import STRATEGIES, BenchOptions, BenchStrategy, run_label


class CurvePoint(BaseModel):
    """Validation loss at one point of a run."""

    iteration: int = Field(ge=0, description="iterations done (a replayed step counts again)")
    step: int = Field(ge=0, description="committed step the weights are at")
    seconds: float = Field(ge=0, description="wall-clock of the run at this point (evaluation time excluded)")
    val_loss: float


class BenchRun(BaseModel):
    """One strategy at one failure rate."""

    model_config = ConfigDict(extra="forbid")

    strategy: BenchStrategy
    variant: str = Field("", description="checkpoint: its interval as asked (K=10, K=auto)")
    failure_rate: float
    seed: int = Field(0, description="the seed of its model, data order and failure draws")
    failures: int
    iterations_to_target: float | None = Field(description="interpolated between the evaluations around it")
    seconds_to_target: float | None
    final_val_loss: float | None
    step_seconds: float = Field(description="seconds per iteration used for this run's clock")
    recover_seconds: list[float] = Field(default_factory=list, description="per failure, measured")
    methods: dict[str, int] = Field(default_factory=dict, description="recoveries by method")
    extra: dict[str, Any] = Field(default_factory=dict, description="strategy-specific measured costs")
    curve: list[CurvePoint] = Field(default_factory=list)


class Spread(BaseModel):
    """Mean and standard deviation over seeds (sd 0.0 with one seed)."""

    mean: float
    sd: float
    n: int


class SummaryRow(BaseModel):
    """One table cell group: a strategy at a failure rate, over every seed."""

    model_config = ConfigDict(extra="forbid")

    strategy: BenchStrategy
    variant: str = ""
    failure_rate: float
    seeds: int
    reached: int = Field(description="seeds whose run reached the target")
    seconds_to_target: Spread | None = Field(description="over the seeds that reached it")
    iterations_to_target: Spread | None
    final_val_loss: Spread | None
    failures: Spread
    over_no_failures: Spread | None = Field(
        None, description="time to target over the same seed's no-failure run (paired: the seeds' own spread "
        "cancels), over the seeds where both reached it"
    )
    over_best_checkpoint: Spread | None = Field(
        None, description="time to target over the same seed's run of the best checkpoint interval at this rate "
        "(paired), over the seeds where both reached it"
    )


class BenchResults(BaseModel):
    """``results.json``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["simulate", "live"]
    created: str = Field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    version: str = __version__
    machine: dict[str, Any] = Field(default_factory=lambda: machine_info())
    config: dict[str, Any]
    iterations: int
    seed: int
    seeds: list[int] = Field(default_factory=list, description="every seed run (each run names its own)")
    target_loss: float
    target_source: str
    noise: dict[str, Any] = Field(default_factory=dict, description="how much the no-failure run varies by seed")
    costs: dict[str, Any] = Field(description="every cost the clock uses, measured on this machine, and how")
    runs: list[BenchRun]
    baseline: BenchRun | None = Field(None, description="the no-failure run (always made: it sets the target)")
    summary: list[SummaryRow] = Field(default_factory=list, description="per strategy and rate, over the seeds")
    best_checkpoint: dict[str, str] = Field(
        default_factory=dict, description="per failure rate: the checkpoint interval that reached the target first"
    )


def machine_info() -> dict[str, Any]:
    import torch  # not at the top: every `swarm-node` start imports this module (for the bench defaults)

    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def default_target(curve: list[CurvePoint], iterations: int) -> float:
    """The validation loss the no-failure run reached at about two thirds of its iterations."""
    if not curve:
        raise ValueError("the no-failure run has no validation points")
    goal = 2 * iterations / 3
    return min(curve, key=lambda p: (abs(p.iteration - goal), p.iteration)).val_loss


def time_to_target(curve: list[CurvePoint], target: float) -> tuple[float | None, float | None]:
    """(iterations, seconds) at which the validation loss first reaches ``target``, linearly interpolated
    between the evaluation above it and the first one at or below it; (None, None) if never."""
    for before, point in zip([None, *curve], curve, strict=False):
        if point.val_loss > target:
            continue
        if before is None or before.val_loss <= point.val_loss:
            return float(point.iteration), point.seconds
        f = (before.val_loss - target) / (before.val_loss - point.val_loss)
        return (
            before.iteration + f * (point.iteration - before.iteration),
            before.seconds + f * (point.seconds - before.seconds),
        )
    return None, None


def finish_run(run: BenchRun, target: float) -> BenchRun:
    """Fills in the time-to-target fields of ``run`` from its curve."""
    run.iterations_to_target, run.seconds_to_target = time_to_target(run.curve, target)
    run.final_val_loss = run.curve[-1].val_loss if run.curve else None
    return run


def spread(values: list[float]) -> Spread | None:
    """Mean ± sd of ``values`` (None when there are none)."""
    if not values:
        return None
    return Spread(mean=statistics.fmean(values), sd=statistics.stdev(values) if len(values) > 1 else 0.0,
                  n=len(values))  # fmt: skip


def summarize(runs: list[BenchRun], baselines: list[BenchRun] = ()) -> list[SummaryRow]:
    """One row per (strategy, failure rate) in the order the runs came, over their seeds; with ``baselines``
    (each seed's no-failure run), each row's time to target over its seed's no-failure time too."""
    base = {b.seed: b.seconds_to_target for b in baselines if b.seconds_to_target}
    groups: dict[tuple[BenchStrategy, str, float], list[BenchRun]] = {}
    for run in runs:
        groups.setdefault((run.strategy, run.variant, run.failure_rate), []).append(run)
    rows = []
    for (strategy, variant, rate), group in groups.items():
        reached = [r for r in group if r.seconds_to_target is not None]
        rows.append(
            SummaryRow(
                strategy=strategy, variant=variant, failure_rate=rate, seeds=len(group), reached=len(reached),
                seconds_to_target=spread([r.seconds_to_target for r in reached]),
                iterations_to_target=spread([r.iterations_to_target for r in reached]),
                final_val_loss=spread([r.final_val_loss for r in group if r.final_val_loss is not None]),
                failures=spread([float(r.failures) for r in group]),
                over_no_failures=spread([r.seconds_to_target / base[r.seed] for r in reached if r.seed in base]),
            )
        )  # fmt: skip
    return rows


def _checkpoint_score(row: SummaryRow) -> tuple[int, float]:
    return -row.reached, row.seconds_to_target.mean if row.seconds_to_target else float("inf")


def best_checkpoint(rows: list[SummaryRow]) -> dict[str, str]:
    """Per failure rate (``f"{rate:g}"``), the checkpoint variant that did best: most seeds at the target, then
    the least mean time to it (the baseline the other strategies are held against)."""
    best: dict[str, SummaryRow] = {}
    for row in rows:
        key = f"{row.failure_rate:g}"
        if row.strategy is BenchStrategy.CHECKPOINT and (key not in best or
                                                         _checkpoint_score(row) < _checkpoint_score(best[key])):
            best[key] = row
    return {rate: row.variant for rate, row in best.items()}


def against_best_checkpoint(rows: list[SummaryRow], runs: list[BenchRun], best: dict[str, str]) -> None:
    """Fills each non-checkpoint row's ``over_best_checkpoint``: per seed, its time to target over that seed's
    run of the best checkpoint interval at the same rate (``best``, from :func:`best_checkpoint`). Paired, so
    what the seed does to both (its weights, batches and failure draws) cancels."""
    theirs = {(r.failure_rate, r.seed): r.seconds_to_target for r in runs
              if r.strategy is BenchStrategy.CHECKPOINT and r.seconds_to_target
              and best.get(f"{r.failure_rate:g}") == r.variant}  # fmt: skip
    for row in rows:
        if row.strategy in (BenchStrategy.CHECKPOINT, BenchStrategy.NONE):
            continue
        mine = [r for r in runs if (r.strategy, r.variant, r.failure_rate) == (row.strategy, row.variant,
                                                                                row.failure_rate)]  # fmt: skip
        row.over_best_checkpoint = spread([r.seconds_to_target / theirs[(r.failure_rate, r.seed)] for r in mine
                                           if r.seconds_to_target and (r.failure_rate, r.seed) in theirs])  # fmt: skip


def run_seeds(opts: BenchOptions, seeds: int, run_one: Callable[[Any], BenchResults]) -> BenchResults:
    """Runs ``run_one`` once per seed (``opts.seed`` and the next ``seeds - 1``: each seed sets the model's
    initial weights, the batch order and the failure draws) and merges the results: one target for all (the
    given one, or the mean of each seed's default target), every run tagged with its seed, mean ± sd per
    strategy and rate in ``summary``, and the no-failure run's spread as ``noise``."""
    per_seed: list[BenchResults] = []
    for seed in range(opts.seed, opts.seed + seeds):
        config = opts.config.model_copy(update={"train": opts.config.train.model_copy(update={"seed": seed})})
        changes: dict[str, Any] = {"seed": seed, "config": config}
        if seeds > 1 and hasattr(opts, "out"):  # live: each seed's swarms in a folder of their own
            changes["out"] = opts.out / f"seed-{seed}"
        result = run_one(dataclasses.replace(opts, **changes))
        for run in [*result.runs, *([result.baseline] if result.baseline else [])]:
            run.seed = seed
        per_seed.append(result)
    first = per_seed[0]
    target = first.target_loss if opts.target_loss is not None else statistics.fmean(r.target_loss for r in per_seed)
    runs = [finish_run(run, target) for result in per_seed for run in result.runs]
    baseline = [finish_run(r.baseline, target) for r in per_seed if r.baseline is not None]
    reached = [r.seconds_to_target for r in baseline if r.seconds_to_target is not None]
    noise = {
        "final_val_loss_no_failures": spread([r.final_val_loss for r in baseline if r.final_val_loss is not None]),
        "seconds_to_target_no_failures": spread(reached),
        "targets_by_seed": [r.target_loss for r in per_seed],
    }
    summary = summarize(runs, baseline)
    best = best_checkpoint(summary)
    against_best_checkpoint(summary, runs, best)
    source = first.target_source if seeds == 1 else f"{first.target_source}, averaged over {seeds} seeds"
    return first.model_copy(
        update={
            "seeds": list(range(opts.seed, opts.seed + seeds)), "target_loss": target, "target_source": source,
            "runs": runs, "summary": summary, "best_checkpoint": best,
            "noise": {k: v.model_dump() if isinstance(v, Spread) else v for k, v in noise.items() if v is not None},
        }
    )  # fmt: skip


def failure_overhead_from(results: BenchResults) -> tuple[float, str]:
    """What one failure costs a live swarm besides the rebuild itself (detection, claim, start-up, the replayed
    step): the median SIGKILL → next commit over a live bench's non-checkpoint recoveries (a rollback also
    replays the steps since the checkpoint). Returns (seconds, where it came from); raises ValueError when
    ``results`` is not a live bench with recoveries."""
    if results.mode != "live":
        raise ValueError(f"a failure overhead comes from a live bench's results, not a {results.mode} one")
    seconds = [s for r in results.runs if r.strategy is not BenchStrategy.CHECKPOINT for s in r.recover_seconds]
    if not seconds or not all(s >= 0 for s in seconds):
        raise ValueError("the live results hold no recovery times (a run with failures and a strategy that rebuilds)")
    return statistics.median(seconds), (
        f"median SIGKILL -> next commit of {len(seconds)} live recoveries ({results.created}, {results.version})"
    )


def write_results(results: BenchResults, out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """Writes ``out/results.json``, ``out/loss_vs_time.png`` and ``out/time_to_target.png``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path, bars_path = out / "results.json", out / "loss_vs_time.png", out / "time_to_target.png"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(results.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, json_path)
    plot(results, png_path)
    plot_time_to_target(results, bars_path)
    return json_path, png_path, bars_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rates(results: BenchResults) -> list[float]:
    return sorted({r.failure_rate for r in results.runs if r.strategy is not BenchStrategy.NONE}) or [0.0]


Kind = tuple[BenchStrategy, str]  # (strategy, variant): one line or bar series


def _order(kind: Kind) -> tuple[int, int, str]:
    k = kind[1].removeprefix("K=")
    return (_ORDER.index(kind[0]) if kind[0] in _ORDER else 99, int(k) if k.isdigit() else 10**9, kind[1])


def _colours(plt: Any, kinds: list[Kind]) -> dict[Kind, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {kind: cycle[i % len(cycle)] for i, kind in enumerate(sorted(kinds, key=_order))}


def plot(results: BenchResults, path: pathlib.Path) -> None:
    """Validation loss against wall-clock time, one panel per failure rate, one line per strategy: the mean
    over seeds at each evaluation, with a band of ± one standard deviation."""
    plt = _pyplot()
    rates = _rates(results)
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.2), squeeze=False, sharey=True)
    colours = _colours(plt, list({(r.strategy, r.variant) for r in results.runs}))
    for ax, rate in zip(axes[0], rates, strict=True):
        groups: dict[Kind, list[BenchRun]] = {}
        for run in results.runs:
            if run.failure_rate == rate or run.strategy is BenchStrategy.NONE:
                groups.setdefault((run.strategy, run.variant), []).append(run)
        for kind in sorted(groups, key=_order):
            runs, strategy = groups[kind], kind[0]
            points = min(len(r.curve) for r in runs)  # live runs may differ by an evaluation
            xs = [statistics.fmean(r.curve[i].seconds for r in runs) / 60 for i in range(points)]
            losses = [[r.curve[i].val_loss for r in runs] for i in range(points)]
            mean = [statistics.fmean(v) for v in losses]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in losses]
            failures = statistics.fmean(r.failures for r in runs)
            label = ("none (no failures)" if strategy is BenchStrategy.NONE
                     else f"{run_label(*kind)} ({failures:.0f} failures)")  # fmt: skip
            colour = colours.get(kind)
            ax.plot(xs, mean, label=label, color=colour)
            if len(runs) > 1:
                ax.fill_between(xs, [m - d for m, d in zip(mean, sd, strict=True)],
                                [m + d for m, d in zip(mean, sd, strict=True)], color=colour, alpha=0.2)  # fmt: skip
        ax.axhline(results.target_loss, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")  # the end of training, where the strategies differ, stays readable
        ax.set_title(f"failure rate {rate:g} per stage per iteration")
        ax.set_xlabel("wall-clock minutes")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss")
    axes[0][-1].legend(fontsize=8)
    seeds = len(results.seeds) or 1
    fig.suptitle(f"swarm-node bench --mode {results.mode} (target {results.target_loss:.3f}, dotted; "
                 f"{seeds} seed{'s' if seeds > 1 else ''}, band ± sd)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_to_target(results: BenchResults, path: pathlib.Path) -> None:
    """Minutes to the target per strategy (bars, mean over the seeds that reached it, ± sd) at each rate;
    a strategy that some seed never brought to the target is marked with how many did."""
    plt = _pyplot()
    rates = _rates(results)
    rows = results.summary or summarize(results.runs)
    kinds = sorted({(r.strategy, r.variant) for r in rows}, key=_order)
    colours = _colours(plt, kinds)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(rates) * len(kinds)), 4.2))
    width = 0.8 / max(1, len(kinds))
    for k, kind in enumerate(kinds):
        xs, heights, errors = [], [], []
        for i, rate in enumerate(rates):
            none = kind[0] is BenchStrategy.NONE  # one no-failure row, shown at every rate
            row = next((r for r in rows if (r.strategy, r.variant) == kind and (none or r.failure_rate == rate)),
                       None)  # fmt: skip
            if row is None:
                continue
            x = i + (k - (len(kinds) - 1) / 2) * width
            if row.seconds_to_target is None:
                ax.text(x, 0, "never", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            xs.append(x)
            heights.append(row.seconds_to_target.mean / 60)
            errors.append(row.seconds_to_target.sd / 60)
            if row.reached < row.seeds:
                ax.text(x, heights[-1], f"{row.reached}/{row.seeds}", ha="center", va="bottom", fontsize=7)
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=run_label(*kind), color=colours.get(kind))
    ax.set_xticks(range(len(rates)), [f"p = {r:g}" for r in rates])
    ax.set_xlim(-0.5, len(rates) - 0.5)
    ax.set_ylabel(f"minutes to validation loss {results.target_loss:.3f}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"bench --mode {results.mode}: time to target, mean ± sd over {len(results.seeds) or 1} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_ORDER = list(STRATEGIES)
