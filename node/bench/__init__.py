"""``swarm-node bench``: recovery strategies compared by wall-clock time to a target validation loss.

``simulate`` holds every stage in one process and draws stage failures per iteration (as the CheckFree
paper did); ``live`` runs a real local swarm with real SIGKILLs. Both write ``results.json`` and
``loss_vs_time.png`` (:mod:`node.bench.results`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from node.config import SwarmConfig
from node.options import EvalOptions, RecoveryOptions, RecoveryStrategy, default


class BenchStrategy(enum.StrEnum):
    """What a bench run compares: the daemon's recovery strategies, plus ``none`` (no failures: the reference
    curve) and ``redundant`` (no progress lost, every iteration dearer)."""

    NONE = "none"
    CHECKFREE = "checkfree"
    CHECKFREE_PLUS = "checkfree+"
    CHECKPOINT = "checkpoint"
    LADDER = "ladder"
    COPY = "copy"
    RANDOM = "random"
    REDUNDANT = "redundant"

    @property
    def fails(self) -> bool:
        """Whether this run sees the failure draws (``none`` and ``redundant`` never lose a stage)."""
        return self not in (BenchStrategy.NONE, BenchStrategy.REDUNDANT)

    @property
    def recovery(self) -> RecoveryStrategy:
        """The daemon strategy it runs with (plain CheckFree when it never loses a stage)."""
        return RecoveryStrategy(self.value) if self.fails else RecoveryStrategy.CHECKFREE


STRATEGIES = tuple(BenchStrategy)
PAPER_STEP_SECONDS = 91.35  # the paper's measured s/iteration (medium model, checkpointing)
PAPER_REDUNDANT_FACTOR = 151.04 / PAPER_STEP_SECONDS  # redundant computation's s/iteration over checkpointing's


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
    checkpoint_every: int = 10
    snapshot_neighbour_every: int = default(RecoveryOptions, "snapshot_neighbour_every")  # ladder: K
    redundant_factor: float = PAPER_REDUNDANT_FACTOR
    lr_scale: float = default(RecoveryOptions, "lr_scale")
    eval_every: int = 10
    eval_batches: int = default(EvalOptions, "batches")
    notice_fraction: float = 0.0  # the share of failures that come with a preemption notice (a handoff)
    notice_seconds: float = 30.0  # live: that notice's window

    def __post_init__(self) -> None:
        self.strategies = [BenchStrategy(s) for s in self.strategies]
