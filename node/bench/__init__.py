"""``swarm-node bench``: recovery strategies compared by wall-clock time to a target validation loss.

``simulate`` holds every stage in one process and draws stage failures per iteration (as the CheckFree
paper did); ``live`` runs a real local swarm with real SIGKILLs. Both write ``results.json`` and
``loss_vs_time.png`` (:mod:`node.bench.results`).
"""

from __future__ import annotations

from dataclasses import dataclass

from node.config import SwarmConfig
from node.options import EvalOptions, RecoveryOptions, default

STRATEGIES = ("none", "checkfree", "checkfree+", "checkpoint", "copy", "random", "redundant")
PAPER_REDUNDANT_FACTOR = 151.04 / 91.35  # the paper's s/iteration, redundant computation over checkpointing


@dataclass
class BenchOptions:
    """What both modes take (see ``swarm-node bench --help``, whose defaults are these)."""

    config: SwarmConfig  # out_of_order is set per strategy
    strategies: list[str]
    failure_rates: list[float]
    iterations: int
    seed: int = 0
    target_loss: float | None = None
    checkpoint_every: int = 10
    redundant_factor: float = PAPER_REDUNDANT_FACTOR
    lr_scale: float = default(RecoveryOptions, "lr_scale")
    eval_every: int = 10
    eval_batches: int = default(EvalOptions, "batches")
