"""CheckFree+'s copies of stage 0 (embedding, final norm, LM head and their AdamW state).

Stage 0 cannot be rebuilt from block stages, so under checkfree+ it leaves its commit decision after every
step, and its full state every ``embed_sync_every`` steps, with its two route neighbours (stages 1 and
S-1, the *holders*). A node that rebuilds stage 0 restores the freshest copy (``embedding_replica``) and,
if stage 0 died between committing a step and telling every block stage, finishes that commit first.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import torch

from node.config import SwarmConfig
from node.metrics import StageMetrics
from node.options import TimingOptions
from node.proto import stage_pb2 as pb
from node.recovery.methods import Recovered, RecoveryContext, SourceLost
from node.recovery.planner import Method, RecoveryPlan
from node.recovery.rebuild import BadSource, TensorSpec, check_weights, expected_state
from node.stage.compute import Compute
from node.stage.presence import Presence
from node.stage.runtime import StageRuntime
from node.topology import copy_holders
from node.train.optim import clip_coefficient
from node.transport.channels import ChannelPool
from node.wire.records import SERVING_STATES
from node.wire.tensors import TensorAssembler, WireError, encode_stream

logger = logging.getLogger(__name__)
FinishCommit = Callable[[int, int, int, float, float], Awaitable[None]]  # (stage, step, attempt, norm, coef)


@dataclass
class HeldCopy:
    """What a holder keeps for one committed step: the decision, and maybe stage 0's full state."""

    step: int  # the step that was committed (the copy is of the state after it: committed step step + 1)
    attempt: int
    global_norm: float
    tensors: dict[str, torch.Tensor] | None = None


def max_copy_bytes(cfg: SwarmConfig) -> int:
    """Size limit of a stage-0 copy: fp32 weights and two AdamW moments, plus step counters."""
    m = cfg.model
    return (2 * m.vocab_size * m.d_model + m.d_model) * 4 * 3 + (1 << 20)


def check_copy(
    meta: pb.MicrobatchMeta | None, tensors: dict[str, torch.Tensor], spec: TensorSpec, source: str
) -> None:
    """A stage-0 copy is usable: its weights (``w.*``) fit stage 0's spec, its optimizer state is finite, and
    the decision it carries has a finite, non-negative gradient norm."""
    if meta is None:
        raise BadSource(f"{source} sent a stage-0 copy without its step")
    if not (math.isfinite(meta.grad_norm) and meta.grad_norm >= 0):
        raise BadSource(f"{source} sent a stage-0 copy with gradient norm {meta.grad_norm}")
    check_weights({k[2:]: v for k, v in tensors.items() if k.startswith("w.")}, spec, source)
    for name, t in tensors.items():
        if not name.startswith(("w.", "opt.")):
            raise BadSource(f"{source} sent an unknown tensor {name!r} in a stage-0 copy")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadSource(f"{source}: {name} holds NaN or Inf")


class Stage0Copies:
    """The sending side (stage 0), the holding side (stages 1 and S-1) and the ``embedding_replica``
    recovery method, in one place because they share the format."""

    methods = frozenset({Method.EMBEDDING_REPLICA})

    def __init__(
        self,
        config: SwarmConfig,
        compute: Compute,
        presence: Presence,
        channels: ChannelPool,
        timing: TimingOptions,
        metrics: StageMetrics,
        finish_commit: FinishCommit,
    ) -> None:
        self.config, self.compute, self.presence, self.channels = config, compute, presence, channels
        self.timing, self.metrics, self.finish_commit = timing, metrics, finish_commit
        self.max_bytes = max_copy_bytes(config)
        self.held: dict[int, HeldCopy] = {}  # committed step -> copy

    # ---- holder side -------------------------------------------------------------------------------
    def holds_copies(self, stage: int | None) -> bool:
        return self.config.out_of_order and stage in copy_holders(self.config.num_stages)

    def store(self, meta: pb.MicrobatchMeta, tensors: dict[str, torch.Tensor]) -> None:
        """Keeps the decisions of the last 3 steps and the 2 newest full copies (with K > 1 most entries are
        decisions only, and a full copy must not be pushed out by them)."""
        committed = meta.step + 1
        entry = self.held.setdefault(committed, HeldCopy(int(meta.step), 0, 0.0))
        entry.step, entry.attempt, entry.global_norm = int(meta.step), int(meta.attempt), float(meta.grad_norm)
        if tensors:
            entry.tensors = tensors
        full = self.full_steps()[-2:]
        for old in sorted(self.held)[:-3]:
            if old not in full:
                del self.held[old]
        self.metrics.replica_bytes_held.set(
            sum(t.numel() * t.element_size() for e in self.held.values() if e.tensors for t in e.tensors.values())
        )

    def full_steps(self) -> list[int]:
        """Committed steps of the full copies held here, oldest first."""
        return sorted(s for s, e in self.held.items() if e.tensors)

    @property
    def replica_step(self) -> int | None:
        """Committed step of the newest full copy held here (announced in the DHT record)."""
        return max(self.full_steps(), default=None)

    def copy_for(self, want: int) -> tuple[pb.MicrobatchMeta, dict[str, torch.Tensor]] | None:
        """The newest full copy at or before committed step ``want`` (0: the newest), with the decision of
        ``want`` if one is held (a rebuilt stage 0 finishes that commit)."""
        held = self.full_steps()
        want = want or (held[-1] if held else 0)
        usable = [s for s in held if s <= want]
        if not usable:
            return None
        decision = self.held.get(want)
        meta = pb.MicrobatchMeta(
            step=usable[-1],
            attempt=decision.attempt if decision else 0,
            grad_norm=decision.global_norm if decision else 0.0,
        )
        return meta, self.held[usable[-1]].tensors or {}

    # ---- stage-0 side ------------------------------------------------------------------------------
    async def push(self, runtime: StageRuntime, step: int, attempt: int, global_norm: float, with_state: bool) -> None:
        """Stores the commit decision of ``step`` (and stage 0's state after it) on stages 1 and S-1."""
        tensors = await self.compute.run(runtime.full_state) if with_state else {}
        meta = pb.MicrobatchMeta(
            step=step, attempt=attempt, grad_norm=global_norm, sender_stage=0, sender_peer=self.presence.me.peer_id
        )
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

        async def push_to(holder: int) -> None:
            peer = self.presence.peer_of(holder)
            if peer is None:
                return
            try:
                await self.channels.stub(peer).PushReplica(
                    encode_stream(meta, tensors.items()), timeout=self.timing.rpc_timeout
                )
                self.metrics.replica_bytes_sent.inc(nbytes)
            except grpc.aio.AioRpcError as err:  # the other holder still has a copy
                logger.warning("stage-0 copy for step %d not stored on stage %d: %s", step + 1, holder, err.code().name)

        await asyncio.gather(*(push_to(h) for h in copy_holders(self.config.num_stages)))

    # ---- the embedding_replica recovery method -----------------------------------------------------
    async def recover(self, plan: RecoveryPlan, ctx: RecoveryContext, committed: int) -> Recovered:
        """Stage 0 from the copy on ``plan.sources[0]`` (exact when the copy is of the swarm's step)."""
        started = time.monotonic()
        block = [r for r in ctx.presence.members(SERVING_STATES) if r.stage not in (None, 0)]
        if not block:
            raise SourceLost("no live block stage")
        c_max = max(r.committed_step for r in block)
        holder = plan.sources[0]
        peer = ctx.peer_of(holder)
        if peer is None:
            raise SourceLost(f"replica holder stage {holder} is gone")
        asm = TensorAssembler(max_tensor_bytes=self.max_bytes, max_stream_bytes=self.max_bytes)
        nbytes = 0
        try:
            call = ctx.channels.stub(peer).FetchReplica(
                pb.FetchWeightsRequest(requester_stage=0, requester_peer=ctx.presence.me.peer_id, step=c_max),
                timeout=ctx.timing.rpc_timeout,
            )
            async for message in call:
                asm.feed(message)
                nbytes += len(message)
            tensors, meta = asm.finish(), asm.meta
        except grpc.aio.AioRpcError as err:
            raise SourceLost(f"fetching the stage-0 copy from stage {holder}: {err.code().name}") from None
        except WireError as err:
            raise SourceLost(f"stage {holder} sent a bad stage-0 copy: {err}", peer.peer_id) from None
        try:
            check_copy(meta, tensors, expected_state(ctx.config, 0), f"stage {holder}")
        except BadSource as err:
            raise SourceLost(str(err), peer.peer_id) from None
        fetch_seconds = time.monotonic() - started

        def build() -> StageRuntime:
            runtime = StageRuntime(ctx.config, 0, ctx.device, committed_step=c_max)
            runtime.load_full_state(tensors)
            return runtime

        try:
            runtime = await ctx.compute.run(build)
        except (RuntimeError, ValueError, KeyError) as err:  # e.g. optimizer state of the wrong shape
            raise SourceLost(f"the stage-0 copy from stage {holder} cannot be loaded: {err}", peer.peer_id) from None
        if meta.step != c_max:
            logger.warning(
                "stage-0 copy is of step %d, the swarm is at %d: embedding and head are %d step(s) stale "
                "(--embed-sync-every > 1)",
                meta.step,
                c_max,
                c_max - meta.step,
            )
        lagging = [r.stage for r in block if r.committed_step == c_max - 1]
        if lagging:
            if meta.attempt == 0:
                raise SourceLost(f"stages {lagging} missed the commit of step {c_max} and no decision is held")
            coef = clip_coefficient(meta.grad_norm, ctx.config.train.grad_clip)
            logger.warning("finishing the commit of step %d on stages %s", c_max, lagging)
            await asyncio.gather(
                *(self.finish_commit(s, c_max - 1, meta.attempt, meta.grad_norm, coef) for s in lagging if s)
            )
        return Recovered(runtime, c_max, 1.0, nbytes=nbytes, fetch_seconds=fetch_seconds)
