"""``--recovery checkpoint`` in a daemon: checkpoints after commits, restore on recovery, local rollback.

Every ``checkpoint_every`` committed steps the stage snapshots its weights and AdamW state to host memory
on its compute thread, right after the commit and before the next step can touch a parameter (the only
cost on the training path), and a background thread writes it (:mod:`node.checkpoint.writer`). A node
that takes over the stage restores its newest loadable checkpoint (method ``checkpoint``); stage 0 then
rolls the whole swarm back to the newest checkpoint every stage has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import torch

from node.checkpoint.restore import restore_runtime
from node.checkpoint.store import CheckpointError, CheckpointStore
from node.checkpoint.writer import BackgroundWriter
from node.config import SwarmConfig
from node.events import CheckpointEvent, CheckpointSnapshotEvent, EventLog, RollbackEvent
from node.metrics import StageMetrics
from node.recovery.methods import Recovered, RecoveryContext
from node.recovery.planner import Method, RecoveryPlan
from node.stage.compute import Background, Compute
from node.stage.runtime import Reject, StageRuntime, StepError
from node.stage.seat import Seat
from node.storage import Storage

logger = logging.getLogger(__name__)


class CheckpointKeeper:
    """The checkpoints of this node's stage: written after commits, restored by recovery and rollback."""

    methods = frozenset({Method.CHECKPOINT})

    def __init__(
        self,
        storage: Storage,
        every: int,
        seat: Seat,
        config: SwarmConfig,
        device: torch.device,
        compute: Compute,
        install: Callable[[StageRuntime], Awaitable[None]],
        metrics: StageMetrics,
        events: EventLog,
        secret: bytes | None = None,
    ) -> None:
        """``secret``: the swarm secret; manifests then carry an HMAC and one without it is never loaded."""
        self.secret = secret
        self.storage, self.every, self.seat, self.config, self.device = storage, every, seat, config, device
        self.compute, self.install, self.metrics, self.events = compute, install, metrics, events
        self.fingerprint = config.fingerprint()
        self.store: CheckpointStore | None = None
        self.writer: BackgroundWriter | None = None
        self.durable_steps: frozenset[int] = frozenset()
        self._snapshot: asyncio.Task[None] | None = None
        self._background = Background()
        t = config.train
        self.samples_per_step = t.microbatches_per_step * t.microbatch_size

    def open(self, stage: int) -> CheckpointStore:
        """The store of ``stage`` and its background writer (reopened when the node's stage changes)."""
        if self.store is None or self.store.stage != stage:
            if self.writer is not None:
                self.writer.close()
            self.store = CheckpointStore(self.storage, stage, self.fingerprint, secret=self.secret)
            self.writer = BackgroundWriter(self.store, self.metrics, self._on_durable)
            self.durable_steps = frozenset()  # listed off the event loop: by recover(), and after each write
        return self.store

    async def attach(self, stage: int) -> None:
        """Opens ``stage``'s store and lists its checkpoints, off the event loop, once the node holds the stage
        (by whatever method): a node that took it over by a handoff or a replica copy then reports the previous
        owner's checkpoints to a rollback instead of none until its own first one."""
        store = self.open(stage)
        try:
            listed = await asyncio.to_thread(store.steps)
        except Exception as err:  # storage unreachable now: the node serves, and the next write lists again
            logger.warning("stage %d: cannot list its checkpoints yet (%s)", stage, err)
            return
        # a write that finished meanwhile has listed its step already: keep it
        self.durable_steps = self.durable_steps | frozenset(listed)

    def _on_durable(self, step: int, seconds: float, nbytes: int) -> None:  # on the writer thread
        assert self.store is not None
        self.durable_steps = frozenset(self.store.steps())
        self.events.emit(CheckpointEvent(stage=self.store.stage, step=step, write_seconds=seconds, bytes=nbytes))

    # ---- after each commit -------------------------------------------------------------------------
    def after_commit(self, committed: int) -> None:
        """Snapshots the state after ``committed`` on the compute thread, submitted now so it runs before the
        next step can touch a parameter; the write happens on the writer's thread."""
        rt = self.seat.runtime
        if committed % self.every or rt is None:
            return
        self.open(rt.stage)
        writer = self.writer
        assert writer is not None

        def snapshot() -> tuple[dict[str, torch.Tensor], float, float]:
            started = time.perf_counter()
            writer.wait()  # at most one snapshot in memory besides the live state
            return rt.full_state(), rt.last_grad_norm, time.perf_counter() - started

        future = self.compute.submit(snapshot)

        async def persist() -> None:
            tensors, norm, seconds = await future
            self.metrics.checkpoint_snapshot_seconds.observe(seconds)
            self.events.emit(CheckpointSnapshotEvent(stage=rt.stage, step=committed, seconds=seconds))
            writer.submit(
                committed,
                tensors,
                data_position=committed * self.samples_per_step,
                lr_scale=rt.lr_scale,
                grad_norm=norm,
            )

        self._snapshot = self._background.spawn(persist())

    async def _settle(self) -> None:
        """Waits for the snapshot in flight and the write in progress."""
        if self._snapshot is not None:
            with contextlib.suppress(Exception):
                await self._snapshot
        if self.writer is not None:
            await asyncio.to_thread(self.writer.wait)

    # ---- recovery ----------------------------------------------------------------------------------
    async def recover(self, plan: RecoveryPlan, ctx: RecoveryContext, committed: int) -> Recovered:
        """The stage's newest loadable checkpoint (or the seed's weights when there is none)."""
        started = time.monotonic()
        store = self.open(ctx.stage)
        self.durable_steps = frozenset(await asyncio.to_thread(store.steps))
        found = await asyncio.to_thread(store.latest_loadable)
        runtime = await ctx.compute.run(restore_runtime, ctx.config, ctx.stage, ctx.device, found)
        return Recovered(
            runtime,
            found[0].step if found is not None else 0,
            runtime.lr_scale,
            nbytes=found[0].size if found is not None else 0,
            fetch_seconds=time.monotonic() - started,
            report=found is not None or committed > 0,  # not a plain first start
            audit=False,
        )

    # ---- rollback ----------------------------------------------------------------------------------
    async def rollback(self, step: int, attempt: int) -> int:
        """Restores this stage's checkpoint of ``step`` (weights, AdamW state) and forgets newer ones."""
        rt = self.seat.runtime
        if rt is None:
            raise StepError(Reject.NOT_READY, "this node holds no stage yet (spare or rebuilding)")
        store = self.open(rt.stage)  # opened by attach() already, unless the rollback came first
        if attempt < rt.attempt:
            raise StepError(Reject.STALE_ATTEMPT, f"rollback attempt {attempt} is older than {rt.attempt}")
        await self._settle()  # a write of a newer step must not land after the discard
        before = rt.committed_step
        try:
            found = None if step == 0 else await asyncio.to_thread(store.load, step)
            runtime = await self.compute.run(restore_runtime, self.config, store.stage, self.device, found)
        except CheckpointError as err:
            # corrupt although complete-looking (e.g. bit rot): stop offering it, so that stage 0's next
            # rollback picks an older common step instead of asking for this one forever
            await asyncio.to_thread(store.discard, step)
            self.durable_steps = frozenset(await asyncio.to_thread(store.steps))
            raise StepError(Reject.NO_CHECKPOINT, str(err)) from None
        runtime.attempt = attempt
        await self.install(runtime)  # steps up to the old committed step run again, in microbatch order
        await asyncio.to_thread(store.discard_after, step)
        self.durable_steps = frozenset(await asyncio.to_thread(store.steps))
        self.metrics.rollbacks.inc()
        self.events.emit(RollbackEvent(stage=store.stage, step=step, from_step=before, attempt=attempt))
        logger.warning("stage %d rolled back from step %d to checkpoint %d", store.stage, before, step)
        return step

    async def close(self) -> None:
        """A snapshot still waiting for the writer is handed to it, and the write in progress completes:
        a clean exit loses no checkpoint."""
        if self._snapshot is not None:
            with contextlib.suppress(Exception):
                await self._snapshot
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
