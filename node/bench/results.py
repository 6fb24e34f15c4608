"""The results of a benchmark run: typed records, time-to-target, and the loss-vs-time figure."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from node import __version__
from node.bench import STRATEGIES, BenchStrategy


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
    failure_rate: float
    failures: int
    iterations_to_target: int | None
    seconds_to_target: float | None
    final_val_loss: float | None
    step_seconds: float = Field(description="seconds per iteration used for this run's clock")
    recover_seconds: list[float] = Field(default_factory=list, description="per failure, measured")
    methods: dict[str, int] = Field(default_factory=dict, description="recoveries by method")
    extra: dict[str, Any] = Field(default_factory=dict, description="strategy-specific measured costs")
    curve: list[CurvePoint] = Field(default_factory=list)


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
    target_loss: float
    target_source: str
    costs: dict[str, Any] = Field(description="every cost the clock uses, measured on this machine, and how")
    runs: list[BenchRun]


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


def time_to_target(curve: list[CurvePoint], target: float) -> tuple[int | None, float | None]:
    """(iterations, seconds) at the first evaluation at or below ``target``; (None, None) if never."""
    for point in curve:
        if point.val_loss <= target:
            return point.iteration, point.seconds
    return None, None


def finish_run(run: BenchRun, target: float) -> BenchRun:
    """Fills in the time-to-target fields of ``run`` from its curve."""
    run.iterations_to_target, run.seconds_to_target = time_to_target(run.curve, target)
    run.final_val_loss = run.curve[-1].val_loss if run.curve else None
    return run


def write_results(results: BenchResults, out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes ``out/results.json`` and ``out/loss_vs_time.png``; returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "results.json", out / "loss_vs_time.png"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(results.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, json_path)
    plot(results, png_path)
    return json_path, png_path


def plot(results: BenchResults, path: pathlib.Path) -> None:
    """Validation loss against wall-clock time, one panel per failure rate, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({r.failure_rate for r in results.runs if r.strategy is not BenchStrategy.NONE}) or [0.0]
    fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 4.2), squeeze=False, sharey=True)
    colours = dict(zip(_ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, rate in zip(axes[0], rates, strict=True):
        for run in sorted(results.runs, key=lambda r: _ORDER.index(r.strategy) if r.strategy in _ORDER else 99):
            if run.failure_rate != rate and run.strategy is not BenchStrategy.NONE:
                continue
            xs = [p.seconds / 60 for p in run.curve]
            none = run.strategy is BenchStrategy.NONE
            label = "none (no failures)" if none else f"{run.strategy} ({run.failures} failures)"
            ax.plot(xs, [p.val_loss for p in run.curve], label=label, color=colours.get(run.strategy))
        ax.axhline(results.target_loss, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")  # the end of training, where the strategies differ, stays readable
        ax.set_title(f"failure rate {rate:g} per stage per iteration")
        ax.set_xlabel("wall-clock minutes")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"swarm-node bench --mode {results.mode} (target {results.target_loss:.3f}, dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_ORDER = list(STRATEGIES)
