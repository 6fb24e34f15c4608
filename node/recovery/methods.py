"""The interface every recovery method implements, and the narrow context it works in.

A method is a plug-in: it names the planner's :class:`~node.recovery.planner.Method` values it carries
out and turns a plan into a runtime for the stage. Adding a method is a new module that implements
:class:`RecoveryMethod` and is handed to :class:`node.recovery.replacement.StageBuilder`; the
planner decides when it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from node.config import SwarmConfig
from node.options import TimingOptions
from node.recovery.faults import FaultInjector
from node.recovery.planner import Method, RecoveryPlan
from node.stage.compute import Compute
from node.stage.presence import Presence
from node.stage.runtime import StageRuntime
from node.transport.channels import ChannelPool
from node.wire.records import StageRecord


class Unrecoverable(RuntimeError):
    """The stage cannot be rebuilt with the chosen strategy; training cannot go on."""


class SourceLost(ConnectionError):
    """A source of the recovery died, disagreed or sent bad data: plan again with whoever is alive.
    ``bad_peer``: a peer that sent state this stage cannot use; it is not asked again."""

    def __init__(self, message: str, bad_peer: str | None = None) -> None:
        super().__init__(message)
        self.bad_peer = bad_peer


@dataclass
class RecoveryContext:
    """The I/O a recovery method may use: the swarm view, channels to peers and the compute thread."""

    stage: int
    config: SwarmConfig
    device: torch.device
    compute: Compute
    presence: Presence
    channels: ChannelPool
    timing: TimingOptions
    faults: FaultInjector
    distrusted: set[str] = field(default_factory=set)  # peers that sent bad state during this recovery

    def peer_of(self, stage: int) -> StageRecord | None:
        """The peer to fetch ``stage``'s state from, never one that already sent bad state."""
        return self.presence.peer_of(stage, exclude=frozenset(self.distrusted))


@dataclass
class Recovered:
    """What a method built, and what it cost."""

    runtime: StageRuntime
    step: int  # committed step the stage starts from
    lr_scale: float
    source_grad_norms: list[float] = field(default_factory=list)
    nbytes: int = 0  # fetched from sources (or storage)
    fetch_seconds: float = 0.0
    report: bool = True  # False: a plain first start, nothing was recovered
    audit: bool = True  # save what was built as ``stage<N>.recovered-step<K>.safetensors`` (with --save-dir)
    stale_steps: int = 0  # the swarm committed this many steps since the state was taken (a parked handoff)


class RecoveryMethod(Protocol):
    """A way to rebuild a stage; raises :class:`SourceLost` to make the node plan again."""

    methods: frozenset[Method]

    async def recover(self, plan: RecoveryPlan, ctx: RecoveryContext, committed: int) -> Recovered: ...
