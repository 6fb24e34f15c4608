"""The simulated clock of ``bench --mode simulate``: what each operation costs, as pure functions.

Training dynamics come from the model actually trained in the process; the clock charges the costs of the
regime being simulated: seconds per iteration, bytes per stage (``--stage-mib`` scales every byte count and
every measured state copy), off-node storage for checkpoints (``--storage-bandwidth``, ``--storage-latency``)
and the network between nodes for rebuilds, snapshots and stage-0 copies (``--link-bandwidth``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MB = 1_000_000  # bandwidths are given in MB/s, as clouds quote them
MIB = 1 << 20


@dataclass(frozen=True)
class CostModel:
    """The costs a simulated run is charged. Bandwidths in bytes per second."""

    step_seconds: float  # one iteration (forward, backward, commit of every stage)
    byte_scale: float = 1.0  # the simulated stage's bytes over the trained model's
    storage_bandwidth: float = 100 * MB  # one node's write or read to object storage
    storage_latency: float = 0.05  # per object-storage request
    link_bandwidth: float = 125 * MB  # one node's network link (1 Gbit/s)
    failure_overhead: float = 0.0  # per failure: detection, claim, start-up (not the transfer)
    # the blocking copy of the largest stage's full state to host memory (a snapshot's, a checkpoint's, a
    # rollback's load), measured once on the trained model: every run clones the same bytes, so every run is
    # charged the same, and this machine's timing noise does not move one strategy against another
    clone_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("step_seconds", "byte_scale", "storage_bandwidth", "link_bandwidth"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.storage_latency < 0 or self.failure_overhead < 0 or self.clone_seconds < 0:
            raise ValueError("storage latency, failure overhead and clone time cannot be negative")

    def storage_seconds(self, nbytes: int) -> float:
        """One write or read of ``nbytes`` (of the trained model) to or from off-node storage."""
        return self.storage_latency + nbytes * self.byte_scale / self.storage_bandwidth

    def link_seconds(self, nbytes: int) -> float:
        """Receiving ``nbytes`` (of the trained model) over one node's link."""
        return nbytes * self.byte_scale / self.link_bandwidth

    @property
    def clone(self) -> float:
        """The blocking clone of the largest stage's full state, at the simulated stage size."""
        return self.scaled(self.clone_seconds)

    def scaled(self, measured_seconds: float) -> float:
        """A state copy measured on the trained model, at the simulated stage size (linear in bytes)."""
        return measured_seconds * self.byte_scale


@dataclass
class WriteQueue:
    """A stage's checkpoint writes on the simulated clock: one write in flight (the daemon's rule: a new
    checkpoint waits for the previous write), each durable once written, and lost if not when a node dies."""

    done_at: dict[int, float] = field(default_factory=dict)  # step -> clock time its write completes
    busy_until: float = 0.0

    def submit(self, step: int, now: float, seconds: float) -> float:
        """Queues the write of ``step`` taking ``seconds``; returns the stall (waiting for the previous one)."""
        stall = max(0.0, self.busy_until - now)
        self.busy_until = now + stall + seconds
        self.done_at[step] = self.busy_until
        return stall

    def durable(self, now: float) -> set[int]:
        """Steps whose write had completed at clock time ``now``."""
        return {step for step, t in self.done_at.items() if t <= now}

    def fail(self, now: float, keep_up_to: int) -> None:
        """A failure at ``now``: writes still in flight are lost, and checkpoints after the rollback target
        ``keep_up_to`` are discarded (the swarm replays those steps)."""
        self.done_at = {s: t for s, t in self.done_at.items() if t <= now and s <= keep_up_to}
        self.busy_until = min(self.busy_until, now)


def swarm_failure_probability(per_stage: float, stages: int) -> float:
    """The probability that at least one of ``stages`` independent stages fails in an iteration."""
    return 1.0 - (1.0 - per_stage) ** stages


def young_daly_interval(
    checkpoint_seconds: float, write_seconds: float, step_seconds: float, failure_probability: float
) -> int:
    """The checkpoint interval K in steps that minimises expected time lost (Young/Daly first order):
    K·T = √(2·C·M), with C the blocking cost of one checkpoint, T the step time and M = T / q the mean time
    between swarm failures (q: the chance an iteration sees one). A checkpoint counts once written, so K·T is
    never shorter than one write (``write_seconds``): writes would only queue behind each other."""
    if step_seconds <= 0 or checkpoint_seconds < 0 or write_seconds < 0:
        raise ValueError("a positive step time and non-negative checkpoint costs")
    floor = max(1, math.ceil(write_seconds / step_seconds))
    if failure_probability <= 0:
        return max(floor, 10**9)  # nothing fails: never worth checkpointing for recovery
    mtbf = step_seconds / failure_probability
    return max(floor, round(math.sqrt(2 * max(checkpoint_seconds, 1e-9) * mtbf) / step_seconds))


__all__ = ["MB", "MIB", "CostModel", "WriteQueue", "swarm_failure_probability", "young_daly_interval"]
