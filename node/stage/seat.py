"""The stage a node holds: which one, its runtime, and how it got it.

One :class:`Seat` per daemon, shared by its parts. Only the recovery path (claiming and rebuilding a
stage) and a rollback replace what it holds; every other part reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.stage.runtime import StageRuntime
from node.wire.records import RecoveryRecord


@dataclass
class Seat:
    stage: int | None  # None: a spare (``--stage auto``) waiting for a vacant stage
    runtime: StageRuntime | None = None  # None until the stage is built (or rebuilt)
    last_recovery: RecoveryRecord | None = None
    epoch: int = 0  # the claim it holds its stage by (node.wire.records.next_epoch)
    handing_over: bool = False  # preempted: no new steps; the exact state goes to a successor

    @property
    def committed_step(self) -> int:
        return self.runtime.committed_step if self.runtime is not None else 0

    @property
    def ready(self) -> bool:
        return self.runtime is not None
