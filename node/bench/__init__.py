"""``swarm-node bench``: recovery strategies compared by wall-clock time to a target validation loss.

``simulate`` holds every stage in one process and draws stage failures per iteration (as the CheckFree
paper did); ``live`` runs a real local swarm with real SIGKILLs. Both write ``results.json`` and
``loss_vs_time.png`` (:mod:`node.bench.results`).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from node.config import SwarmConfig
from node.options import RecoveryOptions, RecoveryStrategy, default


class BenchStrategy(enum.StrEnum):
    """What a bench run compares: the daemon's recovery strategies, plus ``none`` (no failures: the reference
    curve). Redundant computation is not one: nodes do not run their neighbour's layers, and a row derived
    from the paper's cost ratio would not be a measurement."""

    NONE = "none"
    CHECKFREE = "checkfree"
    CHECKFREE_PLUS = "checkfree+"
    CHECKPOINT = "checkpoint"
    LADDER = "ladder"
    COPY = "copy"
    RANDOM = "random"

    @property
    def fails(self) -> bool:
        """Whether this run sees the failure draws (``none`` never loses a stage)."""
        return self is not BenchStrategy.NONE

    @property
    def recovery(self) -> RecoveryStrategy:
        """The daemon strategy it runs with (plain CheckFree when it never loses a stage)."""
        return RecoveryStrategy(self.value) if self.fails else RecoveryStrategy.CHECKFREE


STRATEGIES = tuple(BenchStrategy)
PAPER_STEP_SECONDS = 91.35  # the paper's measured s/iteration (medium model, checkpointing)


def per_iteration_rate(per_hour: float, step_seconds: float) -> float:
    """The per-stage, per-iteration failure probability that gives a stage ``per_hour`` probability of failing
    within an hour of iterations that take ``step_seconds`` each (independent draws per iteration)."""
    if not 0.0 <= per_hour < 1.0 or step_seconds <= 0:
        raise ValueError(f"a per-hour rate in [0, 1) and a positive step time, not {per_hour} and {step_seconds}")
    return 1.0 - (1.0 - per_hour) ** (step_seconds / 3600.0)


@dataclass
class BenchOptions:
    """What both modes take (see ``swarm-node bench --help``, whose defaults are these)."""

    config: SwarmConfig  # out_of_order is set per strategy
    strategies: list[BenchStrategy]
    failure_rates: list[float]
    iterations: int
    seed: int = 0  # the first seed (model, batch order and failure draws); each further one is the next integer
    seeds: int = 3  # runs per strategy and rate, one per seed: the tables give mean ± sd over them
    target_loss: float | None = None
    # checkpoint: the intervals K compared, each a run of its own ("auto": Young–Daly, simulate mode)
    checkpoint_every: list[int | str] = dataclasses.field(default_factory=lambda: [10])
    # ladder: the neighbour-snapshot intervals K compared, each a run of its own
    snapshot_neighbour_every: list[int] = dataclasses.field(
        default_factory=lambda: [default(RecoveryOptions, "snapshot_neighbour_every")]
    )
    lr_scale: float = default(RecoveryOptions, "lr_scale")
    eval_every: int = 10
    # 64 × 4 × 64 = 16k held-out tokens: with 256 batches the no-failure curve rises just as often (once in 30
    # evaluations over 300 iterations), so what is left is the training's own noise, not the sample's
    eval_batches: int = 64
    notice_fraction: float = 0.0  # the share of failures that come with a preemption notice (a handoff)
    notice_seconds: float = 30.0  # live: that notice's window
    stage0_failures: bool = True  # stage 0 fails like the others (the paper's CheckFree runs spare it)

    def __post_init__(self) -> None:
        self.strategies = [BenchStrategy(s) for s in self.strategies]
        for k in self.checkpoint_every:
            if k != AUTO and not (isinstance(k, int) and k >= 1):
                raise ValueError(f"a checkpoint interval is a positive number of steps or {AUTO!r}, not {k!r}")
        if not self.snapshot_neighbour_every or any(k < 1 for k in self.snapshot_neighbour_every):
            raise ValueError(f"snapshot intervals are positive numbers of steps, not {self.snapshot_neighbour_every}")

    def variants(self, strategy: BenchStrategy) -> list[tuple[str, int | str | None]]:
        """(label, interval K) of each run ``strategy`` makes at a rate: one per checkpoint interval, and one per
        snapshot interval for the ladder (labelled only when there are several)."""
        if strategy is BenchStrategy.CHECKPOINT:
            return [(f"K={k}", k) for k in self.checkpoint_every]
        if strategy is BenchStrategy.LADDER:
            ks = self.snapshot_neighbour_every
            return [(f"K={k}" if len(ks) > 1 else "", k) for k in ks]
        return [("", None)]


AUTO = "auto"


@dataclass
class SimulateOptions(BenchOptions):
    """``--mode simulate``'s own: the regime its clock charges (see :mod:`node.bench.costs`)."""

    failure_overhead_seconds: float = 0.0  # added to every failure (detection, claim, replacement start-up)
    device: str = "cpu"
    step_seconds: float | None = None  # the clock's seconds per iteration (None: measured here)
    stage_mib: float | None = None  # a block stage's weights in MiB on the clock (None: the trained model's)
    storage_bandwidth: float = 100.0  # MB/s, one node to off-node storage (checkpoints)
    storage_latency: float = 0.05  # seconds per storage request
    link_bandwidth: float = 125.0  # MB/s, one node's network link (rebuilds, snapshots, stage-0 copies)


def run_label(strategy: BenchStrategy | str, variant: str = "") -> str:
    """How tables and figures name a run: the strategy, and its variant where it has several."""
    return f"{strategy} {variant}" if variant else str(strategy)
