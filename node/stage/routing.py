"""Which peer of each stage computes which microbatch: pure, deterministic functions over plain data.

With several peers (replicas) per stage, stage 0 decides at the start of each step, for every stage, which
replica computes each microbatch, in the way of SWARM parallelism's balancer: a replica's share is
proportional to its measured throughput (microbatches per second), new replicas (no measurement yet) count
as the stage's average, and the microbatches are interleaved so that every replica starts early. The same
peer takes a microbatch's backward pass as its forward (it holds the activations).

Each replica accumulates the gradients of its share in microbatch order (``prev_microbatch``), and at
``Prepare`` the replicas of a stage sum their partial gradients in the order of their first microbatch
(:func:`node.train.partials.combine_partials`): a fixed order, which the single-process reference follows
too, given the shares (:class:`StepRouting.assignment`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_THROUGHPUT = 1.0  # microbatches/s of a stage none of whose replicas has been measured yet


@dataclass(frozen=True)
class Replica:
    peer_id: str
    throughput: float | None  # measured microbatches per second, None before the first measurement


def assign_microbatches(num_microbatches: int, replicas: Sequence[Replica]) -> dict[str, list[int]]:
    """Microbatches of one stage per replica (ascending), proportional to throughput and interleaved: each
    microbatch in turn goes to the replica whose finishing time ``(assigned + 1) / throughput`` would be
    earliest (ties: the order of ``replicas``). Every replica appears, possibly with an empty share."""
    if not replicas:
        raise ValueError("a stage needs at least one replica")
    speed = speeds(replicas)
    shares: dict[str, list[int]] = {r.peer_id: [] for r in replicas}
    for mb in range(num_microbatches):
        best = min(range(len(replicas)), key=lambda i: ((len(shares[replicas[i].peer_id]) + 1) / speed[i], i))
        shares[replicas[best].peer_id].append(mb)
    return shares


def speeds(replicas: Sequence[Replica]) -> list[float]:
    """Each replica's speed for routing: its measured throughput, or the stage's average while unmeasured."""
    measured = [r.throughput for r in replicas if r.throughput is not None and r.throughput > 0]
    average = sum(measured) / len(measured) if measured else DEFAULT_THROUGHPUT
    return [r.throughput if r.throughput is not None and r.throughput > 0 else average for r in replicas]


def expected_shares(replicas: Sequence[Replica]) -> dict[str, float]:
    """The fraction of a stage's microbatches each replica gets, in the long run (its speed over the stage's)."""
    speed = speeds(replicas)
    total = sum(speed)
    return {r.peer_id: v / total for r, v in zip(replicas, speed, strict=True)}


def previous_in_share(shares: Mapping[str, Sequence[int]]) -> dict[int, int]:
    """Microbatch -> the microbatch its replica computes just before it in the step (-1: its first)."""
    out: dict[int, int] = {}
    for mbs in shares.values():
        for i, mb in enumerate(mbs):
            out[mb] = mbs[i - 1] if i else -1
    return out


def canonical_shares(shares: Mapping[str, Sequence[int]]) -> list[tuple[str, list[int]]]:
    """The non-empty shares in the order their partial gradients are summed: by first microbatch."""
    return sorted(((p, list(m)) for p, m in shares.items() if m), key=lambda item: item[1][0])


@dataclass(frozen=True)
class StepRouting:
    """One step's assignment: stage -> replica -> microbatches (stage 0 holds only itself)."""

    shares: dict[int, dict[str, list[int]]]

    def peer(self, stage: int, mb: int) -> str:
        return next(p for p, mbs in self.shares[stage].items() if mb in mbs)

    def route_peers(self, route: Sequence[int], mb: int) -> list[str]:
        return [self.peer(stage, mb) for stage in route]

    def prev_microbatches(self, route: Sequence[int], mb: int) -> list[int]:
        return [previous_in_share(self.shares[stage])[mb] for stage in route]

    def replicated(self) -> dict[int, dict[str, list[int]]]:
        """The stages served by more than one replica in this step."""
        return {s: shares for s, shares in self.shares.items() if len(shares) > 1}

    def assignment(self) -> dict[str, list[list[int]]]:
        """For the reference: stage -> the non-empty shares in summation order (replicated stages only)."""
        return {str(s): [m for _, m in canonical_shares(shares)] for s, shares in self.replicated().items()}


def plan_step(
    num_microbatches: int, stage0: str, replicas: Mapping[int, Sequence[Replica]]
) -> StepRouting:
    """The assignment of one step: every microbatch of stage 0 to itself, every other stage's by
    :func:`assign_microbatches` over its replicas (sorted by peer id, so that the plan is deterministic)."""
    shares = {0: {stage0: list(range(num_microbatches))}}
    for stage, peers in replicas.items():
        shares[stage] = assign_microbatches(num_microbatches, sorted(peers, key=lambda r: r.peer_id))
    return StepRouting(shares)
