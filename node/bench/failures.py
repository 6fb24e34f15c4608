"""Simulate mode's failures: which stages fail in which iteration, which failures come with a notice, and at
what moment of its iteration a failure strikes. Every draw is seeded and the same for every strategy, so the
strategies at a rate compare like for like, run for run."""

from __future__ import annotations

import random


def failure_schedule(seed: int, rate: float, iterations: int, num_stages: int, stage0: bool = False) -> list[list[int]]:
    """The stages failing in each iteration: seeded, the same for every strategy at ``rate``.

    One uniform draw per (iteration, stage), whatever the rate: a stage fails where its draw is below the
    rate, so the failures at a higher rate include those at a lower one (rates compare like for like). Stage
    0's draws (``stage0``) come from a stream of their own, so the block stages' are the same either way."""
    rng = random.Random(f"swarm-node-bench:{seed}")
    blocks = [[s for s in range(1, num_stages) if rng.random() < rate] for _ in range(iterations)]
    if not stage0:
        return blocks
    rng0 = random.Random(f"swarm-node-bench-stage0:{seed}")
    return [([0] if rng0.random() < rate else []) + failed for failed in blocks]


def notice_schedule(seed: int, fraction: float, schedule: list[list[int]], num_stages: int) -> set[tuple[int, int]]:
    """The (iteration, stage) failures that come with a preemption notice: one uniform draw per position, the
    same for every strategy and rate (so a higher fraction's notices include a lower one's)."""
    rng = random.Random(f"swarm-node-bench-notice:{seed}")
    draws = [[rng.random() for _ in range(num_stages)] for _ in schedule]
    return {(it, s) for it, failed in enumerate(schedule) for s in failed if draws[it][s] < fraction}


def failure_moment(seed: int, iteration: int) -> float:
    """Where in ``iteration`` its failures strike, as a fraction of the step in [0, 1): uniform, seeded, the same
    for every strategy and rate. The step in flight is lost up to there (aborted and replayed), and what was
    still being sent or written at that moment (the newest snapshot, the newest checkpoint) is not there yet."""
    return random.Random(f"swarm-node-bench-moment:{seed}:{iteration}").random()
