"""The stage daemon: one pipeline stage as an asyncio (uvloop) program.

Step protocol (driven by stage 0; every other stage only reacts to messages):

1. Stage 0 takes the batch of step ``t`` (a pure function of (seed, t)), bumps the step's *attempt*
   counter and, for each of the M microbatches, embeds it and pushes the activation to the next stage on
   the microbatch's route with ``Forward``. All M microbatches are in flight at once, so the stages work
   concurrently (GPipe-style); each stage computes on one thread and admits microbatches in index order
   (MicrobatchOrder), so gradients accumulate exactly as in a single process.
2. Each block stage computes its blocks, keeps the autograd graph, acks, and pushes the output on. The last
   hop is stage 0 again: it computes the loss (scaled by 1/M) and pushes the gradient back with
   ``Backward``; each stage backpropagates, accumulates its parameter gradients and pushes the input
   gradient further back, until it reaches stage 0's embedding.
3. When all M backward passes are home, stage 0 runs a two-phase commit: ``Prepare`` on every stage (each
   checks that it has M backward passes and returns its squared gradient norm, taken before clipping),
   then ``Commit`` with the global clip coefficient, on every stage. A stage applies AdamW only in Commit,
   and Commit is idempotent, so a retried Commit never applies a step twice.
4. If anything fails before the commit decision (a send, a timeout, a refused Prepare), stage 0 sends
   ``Abort`` and replays step ``t`` with a higher attempt on the same data: a message of an older attempt
   is refused, and a newer attempt discards whatever a stage held of the older one. No parameter has
   changed, so the step is applied on every stage or on none.

5. ``--recovery checkpoint`` (the baseline): every ``checkpoint_every`` committed steps each stage snapshots
   its weights and AdamW state to host memory right after the commit (the only cost on the training path)
   and writes it in the background (:mod:`node.checkpoint`). A replacement restores its stage's newest
   checkpoint. Whenever stage 0 finds every stage served but not all at its committed step, it asks every
   stage for its durable checkpoints, picks the newest step they all have (``rollback_target``; step 0 is
   the seed's weights) and sends ``Rollback`` to every stage, then restores its own: weights, moments and
   the data position (batches are a function of the step) go back together. Rollback is idempotent and
   deletes newer checkpoints, so a rollback interrupted by another failure converges on the next try.
6. ``eval_every``: after every E-th commit stage 0 sends the held-out batches forward only (``meta.eval``)
   on the committed weights and logs the validation loss; nothing is kept and no step changes.

Each stage records its committed step and the gradient norm of its last commit: CheckFree recovery needs
both. The daemon announces itself in the DHT every ``refresh_seconds`` with an expiry of twice that, and
announces ``offline`` before a clean exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import pathlib
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import hivemind
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from safetensors.torch import save_file

from node import __version__
from node.checkpoint import BackgroundWriter, CheckpointError, CheckpointStore, restore_runtime, rollback_target
from node.config import SwarmConfig
from node.data import batch_for_step, load_corpus, validation_batches
from node.dht.directory import SwarmDirectory, pick_peer
from node.metrics import StageMetrics
from node.proto import stage_pb2 as pb
from node.recovery.faults import FaultSpec, die_now
from node.recovery.planner import heartbeat_side, neighbour_stages, replica_holders
from node.recovery.replacement import StageTaken, Unrecoverable, build_stage_runtime, claim_vacant_stage
from node.stage.runtime import Reject, StageRuntime, StepError
from node.stage.schedule import route_for, swap_partner
from node.stage.service import StageService
from node.train.optim import clip_coefficient, pick_device
from node.transport.channels import SERVER_OPTIONS, ChannelPool
from node.transport.stage_rpc import add_stage_service
from node.wire.records import RecoveryRecord, StageRecord, StageState
from node.wire.tensors import encode_stream

logger = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MicrobatchOrder:
    """Admits the microbatches of the step in flight to the compute thread in index order, per direction.

    Messages that are not for the step in flight (stale, ahead, older attempt) are not held back: the
    runtime refuses them. A newer attempt of the step releases everyone waiting on the older one.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._key: tuple[int, int] = (-1, -1)
        self._next: dict[str, int] = {}

    async def turn(self, step: int, attempt: int, direction: str, mb: int, committed: int, timeout: float) -> None:
        async with self._cond:
            if step != committed or (step, attempt) < self._key:
                return
            if (step, attempt) > self._key:
                self._key, self._next = (step, attempt), {}
                self._cond.notify_all()
            key = self._key
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self._key != key or self._next.get(direction, 0) >= mb), timeout
                )

    async def reset(self) -> None:
        """Forgets the step in flight (after a rollback the next step is an older one); releases waiters."""
        async with self._cond:
            self._key, self._next = (-1, -1), {}
            self._cond.notify_all()

    async def advance(self, step: int, attempt: int, direction: str, mb: int) -> None:
        async with self._cond:
            if (step, attempt) == self._key:
                self._next[direction] = max(self._next.get(direction, 0), mb + 1)
                self._cond.notify_all()


class StepFailed(Exception):
    """The step in flight cannot complete; stage 0 aborts and replays it."""


@dataclass
class DaemonOptions:
    """Everything ``swarm-node run`` configures."""

    config: SwarmConfig
    stage: int | None  # None: ``--stage auto`` (take a vacant stage, or wait as a spare)
    swarm: str = "default"
    initial_peers: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    announce_host: str | None = None
    dht_port: int = 0
    refresh_seconds: float = 1.0
    steps: int | None = None
    events_file: pathlib.Path | None = None
    save_dir: pathlib.Path | None = None
    device: str = "auto"
    threads: int | None = None
    rpc_timeout: float = 30.0
    step_timeout: float = 120.0
    metrics_port: int | None = None
    recovery: str = "checkfree"
    embed_sync_every: int = 1
    lr_scale: float = 1.1
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 1.0
    faults: list[FaultSpec] = field(default_factory=list)
    checkpoint_every: int = 100
    checkpoint_dir: pathlib.Path | None = None  # shared storage: a replacement restores from it
    eval_every: int = 0  # stage 0: validation loss every E committed steps (0: never)
    eval_batches: int = 4


class StageDaemon:
    """One stage: its gRPC server, DHT presence, and (on stage 0) the training driver."""

    def __init__(self, opts: DaemonOptions, dht: hivemind.DHT) -> None:
        self.opts = opts
        self.config = opts.config
        self.stage = opts.stage
        self.num_stages = opts.config.num_stages
        self.dht = dht
        self.peer_id = str(dht.peer_id)
        self.pid = os.getpid()
        self.directory = SwarmDirectory(dht, opts.swarm)
        self.metrics = StageMetrics()
        self.metrics_port: int | None = None
        self.state = StageState.JOINING
        self.device = pick_device(opts.device)
        self.fingerprint = self.config.fingerprint()
        self.rejected_total = 0
        self.swarm_view: list[StageRecord] = []
        self.channels = ChannelPool()
        self.stopping = asyncio.Event()
        self.grpc_address = ""
        t = self.config.train
        self.activation_shape = (t.microbatch_size, t.seq_len, self.config.model.d_model)
        self.max_activation_bytes = math.prod(self.activation_shape) * 4
        m = self.config.model
        # a stage-0 copy: fp32 weights and two AdamW moments, plus step counters
        self.max_replica_bytes = (2 * m.vocab_size * m.d_model + m.d_model) * 4 * 3 + (1 << 20)
        self.wire_dtype = WIRE_DTYPES.get(self.config.wire_dtype or "")
        self._compute_pool = ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.order = MicrobatchOrder()
        self._last_commit_at: float | None = None  # monotonic time of this node's last commit (step_seconds)
        self._io_pool = ThreadPoolExecutor(2, thread_name_prefix="dht")
        self._tasks: set[asyncio.Task[Any]] = set()
        self.runtime: StageRuntime | None = None  # built (or rebuilt) on the compute thread in run()
        self.suspects: dict[str, float] = {}  # peer id -> when it was found dead (monotonic)
        self.last_alive: dict[str, float] = {}  # peer id -> its last successful heartbeat (monotonic)
        self._reported_dead: set[str] = set()
        self.last_recovery: RecoveryRecord | None = None
        self.fetch_seconds = 0.0  # of the last rebuild: fetching the sources' weights
        self._last_global_norm = 0.0  # stage 0: of the last committed step, for the step event
        self._last_stage_norms: list[float] = []
        self.in_sync: dict[int, str] = {}  # stage 0: stage -> peer that acknowledged the last commit
        self._called_peer: dict[int, str] = {}
        # checkfree+ holders (stages 1 and S-1): committed step -> {"decision": (step, attempt, norm), "tensors"}
        self.replicas: dict[int, dict[str, Any]] = {}
        # Stage 0 only: futures of the microbatches whose backward has not come home, and their data.
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._targets: dict[int, torch.Tensor] = {}
        self._losses: dict[int, float] = {}
        # --recovery checkpoint
        self.checkpoints: CheckpointStore | None = None
        self.writer: BackgroundWriter | None = None
        self.durable_steps: frozenset[int] = frozenset()
        self._snapshot_task: asyncio.Task[None] | None = None
        self._eval_future: asyncio.Future[float] | None = None
        self._eval_targets: torch.Tensor | None = None

    # ---- helpers ----------------------------------------------------------------------------------
    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn`` on the stage's single compute thread (torch releases the GIL meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._compute_pool, fn, *args)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io_pool, fn, *args)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def record(self, state: StageState | None = None) -> StageRecord:
        return StageRecord(
            stage=self.stage,
            num_stages=self.num_stages,
            peer_id=self.peer_id,
            grpc_address=self.grpc_address,
            state=state or self.state,
            committed_step=self.runtime.committed_step if self.runtime is not None else 0,
            config_fingerprint=self.fingerprint,
            version=__version__,
            host=socket.gethostname(),
            pid=self.pid,
            metrics_port=self.metrics_port,
            last_recovery=self.last_recovery,
            swap_partner=None
            if self.stage is None
            else swap_partner(self.stage, self.num_stages, self.config.out_of_order),
            replica_step=self.replica_step,
        )

    def publish_identity(self) -> None:
        """``swarm_node_stage_info``: which stage this node serves (empty and role ``spare`` while it waits), so
        dashboards can put a stage on every per-node series."""
        self.metrics.info.info(
            {
                "stage": "" if self.stage is None else str(self.stage),
                "role": "spare" if self.stage is None else "embedding" if self.stage == 0 else "blocks",
                "version": __version__,
                "recovery": self.opts.recovery,
                "device": self.device.type,
            }
        )

    async def announce(self, state: StageState | None = None) -> None:
        if state is not None:
            self.state = state
        if self.stage is None and self.state == StageState.JOINING:
            return  # a --stage auto node has no record until it is a spare (a joining record needs a stage)
        try:
            await self._io(self.directory.announce, self.record(), 2 * self.opts.refresh_seconds)
        except Exception:  # the DHT is best effort; the next refresh tries again
            logger.exception("DHT announce failed")

    async def refresh_view(self) -> list[StageRecord]:
        before = self.directory.malformed_seen
        self.swarm_view = await self._io(self.directory.records)
        self.metrics.malformed_records.inc(self.directory.malformed_seen - before)
        online = {r.stage for r in self.swarm_view if r.state in (StageState.ONLINE, StageState.WAITING)}
        self.metrics.stages_online.set(len(online))
        return self.swarm_view

    async def _periodic(self) -> None:
        while not self.stopping.is_set():
            await self.announce()
            with contextlib.suppress(Exception):
                await self.refresh_view()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.opts.refresh_seconds)

    def suspected(self) -> frozenset[str]:
        """Peers found dead recently (a failed RPC or heartbeat); forgiven after 3 refresh periods, by when
        a dead peer's DHT record has expired."""
        now = time.monotonic()
        for peer, since in list(self.suspects.items()):
            if now - since > 3 * self.opts.refresh_seconds:
                del self.suspects[peer]
        return frozenset(self.suspects)

    def peer_of(self, stage: int) -> StageRecord | None:
        return pick_peer(
            self.swarm_view, stage, fingerprint=self.fingerprint, num_stages=self.num_stages, exclude=self.suspected()
        )

    def suspect(self, peer: StageRecord, why: str) -> None:
        """Marks ``peer`` dead at once (the DHT expiry confirms it) and fails the step in flight."""
        if peer.peer_id in self.suspects:
            return
        self.suspects[peer.peer_id] = time.monotonic()
        self._spawn(self.channels.drop(peer.grpc_address))
        if peer.peer_id not in self._reported_dead:
            self._reported_dead.add(peer.peer_id)
            # Tombstone: re-store the dead peer's record as offline so that spares see the vacancy now rather
            # than when the record expires. A peer suspected wrongly overwrites it at its next refresh.
            self._spawn(
                self._io(
                    self.directory.announce,
                    peer.model_copy(update={"state": StageState.OFFLINE}),
                    2 * self.opts.refresh_seconds,
                )
            )
            logger.warning("stage %s peer %s is unreachable (%s)", peer.stage, peer.peer_id, why)
            self.metrics.failures_detected.inc()
            if peer.peer_id in self.last_alive:
                self.metrics.failure_detection_seconds.observe(time.monotonic() - self.last_alive[peer.peer_id])
            self.emit(
                {"event": "failure_detected", "stage": peer.stage, "peer": peer.peer_id, "by": self.stage, "why": why}
            )
        self.fail_step_in_flight(StepFailed(f"stage {peer.stage} ({peer.peer_id}) lost: {why}"))

    def fail_step_in_flight(self, failure: StepFailed) -> None:
        """Stage 0: makes the step in flight (or the evaluation) give up now rather than at its timeout."""
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(failure)

    async def resolve(self, stage: int, deadline: float) -> StageRecord:
        """The serving peer of ``stage`` according to the DHT, waiting for one until ``deadline``."""
        while True:
            peer = self.peer_of(stage)
            if peer is not None:
                return peer
            if time.monotonic() >= deadline or self.stopping.is_set():
                raise StepFailed(f"no serving peer for stage {stage}")
            await asyncio.sleep(min(0.2, self.opts.refresh_seconds))
            with contextlib.suppress(Exception):
                await self.refresh_view()

    # ---- sending ----------------------------------------------------------------------------------
    async def send_tensor(
        self, rpc: str, target: int, meta: pb.MicrobatchMeta, tensor: torch.Tensor, deadline: float
    ) -> None:
        """Streams ``tensor`` to stage ``target``; retries another/new peer on transport errors."""
        payload = tensor if self.wire_dtype is None else tensor.to(self.wire_dtype)
        direction = rpc.lower()
        nbytes = payload.numel() * payload.element_size()
        while True:
            rt = self.runtime
            if rt is not None and (rt.committed_step > meta.step or rt.attempt > meta.attempt):
                raise StepFailed(f"step {meta.step} attempt {meta.attempt} was superseded")
            peer = await self.resolve(target, deadline)
            stub = self.channels.stub(peer.grpc_address)
            try:
                await getattr(stub, rpc)(
                    encode_stream(meta, [("", payload)]),
                    timeout=max(0.1, min(self.opts.rpc_timeout, deadline - time.monotonic())),
                )
            except grpc.aio.AioRpcError as err:
                if err.code() in RETRYABLE and time.monotonic() < deadline and not self.stopping.is_set():
                    if err.code() == grpc.StatusCode.UNAVAILABLE:
                        self.suspect(peer, f"{rpc} failed: {err.code().name}")
                    await asyncio.sleep(0.1)
                    with contextlib.suppress(Exception):
                        await self.refresh_view()
                    continue
                raise StepFailed(
                    f"{rpc} step {meta.step} mb {meta.microbatch} to stage {target}: {err.code().name} {err.details()}"
                ) from None
            self.metrics.bytes_sent.labels(direction=direction).inc(nbytes)
            return

    def _forward_on(self, meta: pb.MicrobatchMeta, tensor: torch.Tensor, rpc: str, hop: int) -> None:
        """Pushes a result to the next hop in the background. A push that cannot be delivered fails the
        step in flight on stage 0; elsewhere it is logged, and stage 0 learns of the loss by heartbeat."""
        nxt = pb.MicrobatchMeta()
        nxt.CopyFrom(meta)
        nxt.hop, nxt.sender_stage, nxt.sender_peer = hop, self.stage, self.peer_id
        deadline = time.monotonic() + self.opts.step_timeout

        async def push() -> None:
            try:
                await self.send_tensor(rpc, meta.route[hop], nxt, tensor, deadline)
            except StepFailed as err:
                logger.warning("%s", err)
                fut = self._pending.get(meta.microbatch)
                if fut is not None and not fut.done():
                    fut.set_exception(err)

        self._spawn(push())

    # ---- message handlers (called by the service after validation) ---------------------------------
    async def _compute_in_order(self, meta: pb.MicrobatchMeta, direction: str, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the compute thread after every lower microbatch of this step went the same way.

        Gradients then accumulate in microbatch order on every stage, as in the single-process run, so the
        swarm's arithmetic is the reference's, bit for bit, whatever order the network delivers in.
        """
        self.check_fault(direction, stage=self.stage, step=meta.step + 1, microbatch=meta.microbatch)
        await self.order.turn(
            meta.step, meta.attempt, direction, meta.microbatch, self.runtime.committed_step, self.opts.step_timeout
        )
        started = time.perf_counter()
        future = asyncio.get_running_loop().run_in_executor(self._compute_pool, fn)
        await self.order.advance(meta.step, meta.attempt, direction, meta.microbatch)
        result = await future
        self.metrics.compute_seconds.labels(direction=direction).observe(time.perf_counter() - started)
        self.metrics.microbatches.labels(direction=direction).inc()
        return result

    async def on_eval_forward(self, meta: pb.MicrobatchMeta, x: torch.Tensor) -> None:
        """Evaluation: forward only on the committed weights, outside the step in flight."""
        rt = self.runtime
        if meta.step != rt.committed_step:
            reason = Reject.STALE_STEP if meta.step < rt.committed_step else Reject.UNKNOWN_STEP
            raise StepError(reason, f"evaluation of step {meta.step}, but this stage has committed {rt.committed_step}")
        if self.stage == 0:
            fut, targets = self._eval_future, self._eval_targets
            if fut is None or fut.done():
                raise StepError(Reject.BAD_MICROBATCH, "no evaluation is in flight")
            loss = await self.compute(rt.eval_loss, x, targets)
            if not fut.done():
                fut.set_result(loss)
            return
        self._forward_on(meta, await self.compute(rt.eval_forward, x), "Forward", meta.hop + 1)

    async def on_forward(self, meta: pb.MicrobatchMeta, x: torch.Tensor) -> None:
        if meta.eval:
            await self.on_eval_forward(meta, x)
            return
        rt = self.runtime
        if self.stage == 0:  # last hop: loss, and the gradient goes back
            targets = self._targets.get(meta.microbatch)

            def head() -> tuple[float, torch.Tensor]:
                rt.check_step(meta.step, meta.attempt)
                if targets is None:
                    raise StepError(Reject.BAD_MICROBATCH, f"microbatch {meta.microbatch} is not in flight")
                return rt.head(meta.microbatch, x, targets)

            loss, grad = await self._compute_in_order(meta, "forward", head)
            self._losses[meta.microbatch] = loss
            self._forward_on(meta, grad, "Backward", meta.hop - 1)
            return

        def fwd() -> torch.Tensor:
            rt.check_step(meta.step, meta.attempt)
            return rt.forward(meta.microbatch, x)

        self._forward_on(meta, await self._compute_in_order(meta, "forward", fwd), "Forward", meta.hop + 1)

    async def on_backward(self, meta: pb.MicrobatchMeta, grad: torch.Tensor) -> None:
        if meta.eval:
            raise StepError(Reject.BAD_STREAM, "evaluation messages only travel forward")
        rt = self.runtime
        if self.stage == 0:  # home: the embedding's gradient

            def bwd0() -> None:
                rt.check_step(meta.step, meta.attempt)
                rt.embed_backward(meta.microbatch, grad)

            await self._compute_in_order(meta, "backward", bwd0)
            fut = self._pending.get(meta.microbatch)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return

        def bwd() -> torch.Tensor:
            rt.check_step(meta.step, meta.attempt)
            return rt.backward(meta.microbatch, grad)

        self._forward_on(meta, await self._compute_in_order(meta, "backward", bwd), "Backward", meta.hop - 1)

    async def commit(self, step: int, attempt: int, clip_coef: float) -> int:
        before = self.runtime.committed_step
        committed = await self.compute(self.runtime.commit, step, attempt, clip_coef)
        self.metrics.committed_step.set(committed)
        if committed != before:
            now = time.monotonic()
            if self._last_commit_at is not None:
                self.metrics.step_seconds.observe(now - self._last_commit_at)
            self._last_commit_at = now
        if committed != before and self.writer is not None and committed % self.opts.checkpoint_every == 0:
            self._checkpoint(committed)
        return committed

    # ---- checkpoint strategy ----------------------------------------------------------------------
    def open_checkpoints(self) -> CheckpointStore:
        """The checkpoint store of this node's stage, and its background writer (``--recovery checkpoint``)."""
        assert self.stage is not None and self.opts.checkpoint_dir is not None
        if self.checkpoints is None or self.checkpoints.stage != self.stage:
            self.checkpoints = CheckpointStore(self.opts.checkpoint_dir, self.stage, self.fingerprint)
            self.writer = BackgroundWriter(self.checkpoints, self.metrics, self._on_durable)
            self.durable_steps = frozenset(self.checkpoints.steps())
        return self.checkpoints

    def _on_durable(self, step: int, seconds: float, nbytes: int) -> None:  # on the writer thread
        assert self.checkpoints is not None
        self.durable_steps = frozenset(self.checkpoints.steps())
        self.emit({"event": "checkpoint", "stage": self.stage, "step": step, "write_seconds": seconds, "bytes": nbytes})

    @property
    def samples_per_step(self) -> int:
        t = self.config.train
        return t.microbatches_per_step * t.microbatch_size

    def _checkpoint(self, committed: int) -> None:
        """Snapshots the state after ``committed`` on the compute thread, submitted now so it runs before the
        next step can touch a parameter; the write happens on the writer's thread."""
        rt, writer = self.runtime, self.writer
        assert writer is not None

        def snapshot() -> tuple[dict[str, torch.Tensor], float, float]:
            started = time.perf_counter()
            writer.wait()  # at most one snapshot in memory besides the live state
            return rt.full_state(), rt.last_grad_norm, time.perf_counter() - started

        future = asyncio.get_running_loop().run_in_executor(self._compute_pool, snapshot)

        async def persist() -> None:
            tensors, norm, seconds = await future
            self.metrics.checkpoint_snapshot_seconds.observe(seconds)
            self.emit({"event": "checkpoint_snapshot", "stage": self.stage, "step": committed, "seconds": seconds})
            writer.submit(
                committed,
                tensors,
                data_position=committed * self.samples_per_step,
                lr_scale=rt.lr_scale,
                grad_norm=norm,
            )

        self._snapshot_task = self._spawn(persist())

    async def rollback(self, step: int, attempt: int) -> int:
        """Restores this stage's checkpoint of ``step`` (weights, AdamW state) and forgets newer ones."""
        if self.checkpoints is None or self.writer is None:
            raise StepError(Reject.NO_CHECKPOINT, f"stage {self.stage} keeps no checkpoints (no --recovery checkpoint)")
        if attempt < self.runtime.attempt:
            raise StepError(Reject.STALE_ATTEMPT, f"rollback attempt {attempt} is older than {self.runtime.attempt}")
        if self._snapshot_task is not None:
            with contextlib.suppress(Exception):
                await self._snapshot_task
        await asyncio.to_thread(self.writer.wait)  # a write of a newer step must not land after the discard
        store, before = self.checkpoints, self.runtime.committed_step
        try:
            found = None if step == 0 else await asyncio.to_thread(store.load, step)
            runtime = await self.compute(restore_runtime, self.config, self.stage, self.device, found)
        except CheckpointError as err:
            # corrupt although complete-looking (e.g. bit rot): stop offering it, so that stage 0's next
            # rollback picks an older common step instead of asking for this one forever
            await asyncio.to_thread(store.discard, step)
            self.durable_steps = frozenset(await asyncio.to_thread(store.steps))
            raise StepError(Reject.NO_CHECKPOINT, str(err)) from None
        runtime.attempt = attempt
        self.runtime = runtime
        await self.order.reset()  # steps up to the old committed step run again, in microbatch order
        self._last_commit_at = None
        await asyncio.to_thread(store.discard_after, step)
        self.durable_steps = frozenset(await asyncio.to_thread(store.steps))
        self.metrics.rollbacks.inc()
        self.metrics.committed_step.set(step)
        self.emit({"event": "rollback", "stage": self.stage, "step": step, "from_step": before, "attempt": attempt})
        logger.warning("stage %d rolled back from step %d to checkpoint %d", self.stage, before, step)
        return step

    async def rollback_swarm(self, attempt: int) -> int:
        """Stage 0: every stage back to the newest checkpoint they all have; returns that step."""
        deadline = time.monotonic() + self.opts.rpc_timeout
        try:
            statuses = await asyncio.gather(
                *(self._unary(s, "GetStatus", pb.StatusRequest(), deadline) for s in range(1, self.num_stages))
            )
        except grpc.aio.AioRpcError as err:
            raise StepFailed(f"cannot read the stages' checkpoints: {err.code().name}") from None
        durable = {0: self.durable_steps} | {s: list(st.checkpoint_steps) for s, st in enumerate(statuses, 1)}
        target = rollback_target(durable, self.num_stages)
        self.emit({"event": "rollback_start", "step": target, "from_step": self.runtime.committed_step})
        request = pb.RollbackRequest(step=target, attempt=attempt, sender_peer=self.peer_id)

        async def one(stage: int) -> None:
            try:
                reply = await self._unary(stage, "Rollback", request, time.monotonic() + self.opts.rpc_timeout)
            except grpc.aio.AioRpcError as err:
                raise StepFailed(f"stage {stage} did not roll back: {err.code().name} {err.details()}") from None
            self.in_sync[stage] = self._called_peer[stage]
            if reply.committed_step != target:
                raise StepFailed(f"stage {stage} rolled back to {reply.committed_step}, not {target}")

        self.in_sync.clear()
        await asyncio.gather(*(one(s) for s in range(1, self.num_stages)))
        try:
            await self.rollback(target, attempt)
        except StepError as err:
            raise StepFailed(str(err)) from None
        return target

    def snapshot_committed(self) -> tuple[int, float, dict[str, torch.Tensor]]:
        """(committed step, last gradient norm, weights) — run on the compute thread for a consistent view."""
        rt = self.runtime
        return rt.committed_step, rt.last_grad_norm, {k: v.to("cpu").clone() for k, v in rt.committed_state().items()}

    # ---- stage 0: the driver ----------------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> None:
        """Appends one JSON line to the events file (one O_APPEND write, so daemons sharing it don't mix)."""
        if self.opts.events_file is None:
            return
        line = json.dumps({"time": time.time(), "pid": self.pid, **event}) + "\n"
        fd = os.open(self.opts.events_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    async def wait_for_swarm(self) -> bool:
        """Blocks (state ``waiting``) until every stage has a serving peer at our committed step.

        The first check uses the cached view (refreshed every period; dead peers are already excluded by
        suspicion), so a healthy swarm pays no DHT lookup per step; only a missing stage makes it poll.
        Under ``--recovery checkpoint`` it returns True as soon as every stage is served but some are at
        another step: the swarm must roll back."""
        announced_waiting = False
        first = True
        while not self.stopping.is_set():
            if not first:
                with contextlib.suppress(Exception):
                    await self.refresh_view()
            first = False
            missing, elsewhere = [], []
            for s in range(1, self.num_stages):
                peer = self.peer_of(s)
                # a peer that acknowledged our last commit is in step even if its DHT record lags behind
                in_sync = peer is not None and self.in_sync.get(s) == peer.peer_id
                if peer is None:
                    missing.append(s)
                elif peer.committed_step != self.runtime.committed_step and not in_sync:
                    elsewhere.append(s)
            if self.checkpoints is not None and not missing and elsewhere:
                logger.warning("stage(s) %s are not at step %d: rolling back", elsewhere, self.runtime.committed_step)
                return True
            missing += elsewhere
            if not missing:
                await self.announce(StageState.ONLINE)
                return False
            if not announced_waiting:
                logger.info("waiting for stage(s) %s", missing)
                await self.announce(StageState.WAITING)
                announced_waiting = True
            await asyncio.sleep(min(0.25, self.opts.refresh_seconds))
        return False

    async def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
        """Stage 0: validation loss of the committed weights over ``batches`` (None if a stage was lost)."""
        rt, loop = self.runtime, asyncio.get_running_loop()
        step, started, losses = rt.committed_step, time.perf_counter(), []
        route = route_for(0, self.num_stages, self.config.out_of_order)  # the in-order model
        try:
            for x, y in batches:
                h = await self.compute(rt.eval_embed, x)
                fut: asyncio.Future[float] = loop.create_future()
                self._eval_future, self._eval_targets, self._pending = fut, y, {0: fut}
                meta = pb.MicrobatchMeta(
                    step=step, microbatch=0, route=route, hop=0, sender_stage=0, sender_peer=self.peer_id,
                    attempt=rt.attempt, eval=True,
                )  # fmt: skip
                self._forward_on(meta, h, "Forward", 1)
                losses.append(await asyncio.wait_for(fut, self.opts.step_timeout))
        except (StepFailed, TimeoutError) as err:
            logger.warning("evaluation at step %d failed: %s", step, err)
            return None
        finally:
            self._eval_future, self._pending = None, {}
        val_loss, seconds = sum(losses) / len(losses), time.perf_counter() - started
        self.metrics.validation_loss.set(val_loss)
        self.emit({"event": "eval", "step": step, "val_loss": val_loss, "seconds": seconds})
        logger.info("step %d validation loss %.4f (%.2fs)", step, val_loss, seconds)
        return val_loss

    async def drive(self, steps: int) -> None:
        corpus = await self.compute(load_corpus, self.config.data)
        corpus.check_fits(self.config.train.seq_len)
        # Attempts only grow, across stage-0 incarnations too (a rebuilt stage 0 must outrank its predecessor's
        # attempts, which block stages still remember): start from the wall clock in milliseconds.
        attempt = max(self.runtime.attempt, int(time.time() * 1000) * 1000)
        t, every = self.config.train, self.opts.eval_every
        val = (
            validation_batches(
                corpus.val, num_batches=self.opts.eval_batches, batch_size=t.microbatch_size, seq_len=t.seq_len
            )
            if every
            else []
        )
        evaluated: int | None = None  # the committed step last evaluated (forgotten by a rollback)
        while not self.stopping.is_set():
            committed = self.runtime.committed_step
            eval_due = bool(every) and committed % every == 0 and committed != evaluated
            if committed >= steps and not eval_due:
                break
            diverged = await self.wait_for_swarm()
            if self.stopping.is_set():
                break
            if diverged:
                attempt += 1
                try:
                    target = await self.rollback_swarm(attempt)
                except StepFailed as err:
                    logger.warning("rollback failed: %s; retrying", err)
                    await asyncio.sleep(min(1.0, self.opts.refresh_seconds))
                    continue
                evaluated = None
                self.emit({"event": "rolled_back", "step": target, "attempt": attempt})
                continue
            if eval_due and self.runtime.committed_step == committed:
                if await self.evaluate(val) is not None:
                    evaluated = committed
                else:  # a stage was lost or refused: let the swarm settle before trying again
                    await asyncio.sleep(min(1.0, self.opts.refresh_seconds))
                continue  # the swarm may have changed meanwhile
            attempt += 1
            step = self.runtime.committed_step
            started = time.perf_counter()
            self.emit({"event": "attempt", "step": step + 1, "attempt": attempt})
            try:
                loss = await self.train_step(corpus.train, step, attempt)
            except StepFailed as err:
                logger.warning("step %d attempt %d failed: %s; aborting and replaying", step, attempt, err)
                self.metrics.steps_aborted.inc()
                self.emit({"event": "abort", "step": step, "attempt": attempt, "reason": str(err)})
                await self.abort_everywhere(step, attempt)
                continue
            seconds = time.perf_counter() - started
            tokens = self.tokens_per_step
            self.metrics.loss.set(loss)
            self.metrics.tokens.inc(tokens)
            self.emit(
                {
                    "event": "step",
                    "step": step + 1,
                    "loss": loss,
                    "seconds": seconds,
                    "tokens": tokens,
                    "attempt": attempt,
                    "grad_norm": self._last_global_norm,
                    "stage_grad_norms": self._last_stage_norms,
                }
            )
            logger.info("step %d loss %.4f (%.2fs)", step + 1, loss, seconds)
        if self.runtime.committed_step >= steps:
            self.emit({"event": "done", "step": self.runtime.committed_step})

    @property
    def tokens_per_step(self) -> int:
        t = self.config.train
        return t.microbatches_per_step * t.microbatch_size * t.seq_len

    async def train_step(self, tokens: torch.Tensor, step: int, attempt: int) -> float:
        t = self.config.train
        rt = self.runtime
        loop = asyncio.get_running_loop()
        batch = batch_for_step(
            tokens,
            seed=t.seed,
            step=step,
            num_microbatches=t.microbatches_per_step,
            microbatch_size=t.microbatch_size,
            seq_len=t.seq_len,
        )
        self._pending = {mb: loop.create_future() for mb in range(len(batch))}
        self._targets = {mb: y for mb, (_, y) in enumerate(batch)}
        self._losses = {}
        await self.compute(rt.check_step, step, attempt)
        for mb, (x, _) in enumerate(batch):
            h = await self.compute(rt.embed, mb, x)
            route = route_for(mb, self.num_stages, self.config.out_of_order)
            meta = pb.MicrobatchMeta(
                step=step, microbatch=mb, route=route, hop=0, sender_stage=0, sender_peer=self.peer_id, attempt=attempt
            )
            self._forward_on(meta, h, "Forward", 1)
        try:
            await asyncio.wait_for(asyncio.gather(*self._pending.values()), self.opts.step_timeout)
        except TimeoutError:
            done = sum(f.done() for f in self._pending.values())
            raise StepFailed(
                f"only {done} of {len(batch)} microbatches came back in {self.opts.step_timeout}s"
            ) from None
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.cancel()

        # Phase 1: prepare everywhere (each stage's gradient norm before clipping).
        norms = await asyncio.gather(
            self.compute(rt.prepare, step, attempt),
            *(self._prepare_remote(s, step, attempt) for s in range(1, self.num_stages)),
            return_exceptions=True,
        )
        for n in norms:
            if isinstance(n, BaseException):
                raise StepFailed(f"prepare failed: {n}")
        global_norm = math.sqrt(sum(norms))  # type: ignore[arg-type]
        self._last_stage_norms = [math.sqrt(n) for n in norms]  # type: ignore[arg-type]
        coef = clip_coefficient(global_norm, t.grad_clip)
        self._last_global_norm = global_norm
        # Phase 2: the decision is commit. Stage 0 commits first; under checkfree+ it then leaves the decision
        # (and every K steps its new state) with stages 1 and S-1, so that a rebuilt stage 0 can finish a commit
        # it did not live to send. Commit is idempotent and retried until every stage has it.
        await self.commit(step, attempt, coef)
        if self.config.out_of_order:
            await self.replicate(step, attempt, global_norm, with_state=(step + 1) % self.opts.embed_sync_every == 0)
        await asyncio.gather(
            *(self.commit_remote(s, step, attempt, global_norm, coef) for s in range(1, self.num_stages))
        )
        return sum(self._losses.values()) / len(self._losses)

    async def replicate(self, step: int, attempt: int, global_norm: float, with_state: bool) -> None:
        """Stores the commit decision of ``step`` (and stage 0's state after it) on stages 1 and S-1."""
        tensors = await self.compute(self.runtime.full_state) if with_state else {}
        meta = pb.MicrobatchMeta(
            step=step, attempt=attempt, grad_norm=global_norm, sender_stage=0, sender_peer=self.peer_id
        )
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())

        async def push(holder: int) -> None:
            peer = self.peer_of(holder)
            if peer is None:
                return
            try:
                await self.channels.stub(peer.grpc_address).PushReplica(
                    encode_stream(meta, tensors.items()), timeout=self.opts.rpc_timeout
                )
                self.metrics.replica_bytes_sent.inc(nbytes)
            except grpc.aio.AioRpcError as err:  # the other holder still has a copy
                logger.warning("stage-0 copy for step %d not stored on stage %d: %s", step + 1, holder, err.code().name)

        await asyncio.gather(*(push(h) for h in replica_holders(self.num_stages)))

    def store_replica(self, meta: pb.MicrobatchMeta, tensors: dict[str, torch.Tensor]) -> None:
        """Holder side: keeps the decisions and stage-0 copies of the last few committed steps."""
        committed = meta.step + 1
        entry = self.replicas.setdefault(committed, {"decision": None, "tensors": None})
        entry["decision"] = (int(meta.step), int(meta.attempt), float(meta.grad_norm))
        if tensors:
            entry["tensors"] = tensors
        # keep the decisions of the last 3 steps and the 2 newest full copies (with K > 1 most entries are
        # decisions only, and a full copy must not be pushed out by them)
        full = sorted(s for s, e in self.replicas.items() if e["tensors"])[-2:]
        for old in sorted(self.replicas)[:-3]:
            if old not in full:
                del self.replicas[old]
        self.metrics.replica_bytes_held.set(
            sum(
                t.numel() * t.element_size()
                for e in self.replicas.values()
                if e["tensors"]
                for t in e["tensors"].values()
            )
        )

    @property
    def replica_step(self) -> int | None:
        """Committed step of the newest full stage-0 copy held here."""
        return max((s for s, e in self.replicas.items() if e["tensors"]), default=None)

    async def _unary(self, stage: int, rpc: str, request: Any, deadline: float) -> Any:
        peer = await self.resolve(stage, deadline)
        self._called_peer[stage] = peer.peer_id
        stub = self.channels.stub(peer.grpc_address)
        return await getattr(stub, rpc)(
            request, timeout=max(0.1, min(self.opts.rpc_timeout, deadline - time.monotonic()))
        )

    async def _prepare_remote(self, stage: int, step: int, attempt: int) -> float:
        deadline = time.monotonic() + self.opts.rpc_timeout
        try:
            reply = await self._unary(stage, "Prepare", pb.PrepareRequest(step=step, attempt=attempt), deadline)
        except grpc.aio.AioRpcError as err:
            raise StepFailed(f"stage {stage} refused prepare: {err.code().name} {err.details()}") from None
        return reply.grad_norm_sq

    async def commit_remote(self, stage: int, step: int, attempt: int, norm: float, coef: float) -> None:
        request = pb.CommitRequest(step=step, attempt=attempt, global_grad_norm=norm, clip_coef=coef)
        while not self.stopping.is_set():
            deadline = time.monotonic() + self.opts.rpc_timeout
            try:
                reply = await self._unary(stage, "Commit", request, deadline)
                if reply.committed_step == step + 1:
                    self.in_sync[stage] = self._called_peer[stage]
                    return
                logger.error(
                    "stage %d reports committed step %d after committing %d", stage, reply.committed_step, step
                )
                return
            except (grpc.aio.AioRpcError, StepFailed) as err:
                code = err.code() if isinstance(err, grpc.aio.AioRpcError) else None
                if self.checkpoints is not None and code == grpc.StatusCode.FAILED_PRECONDITION:
                    # a replacement restored from a checkpoint: the swarm rolls back before the next step
                    logger.warning("stage %d cannot take the commit of step %d: %s", stage, step, err.details())
                    return
                logger.warning("commit of step %d on stage %d not acknowledged (%s); retrying", step, stage, err)
                await asyncio.sleep(0.5)

    async def abort_everywhere(self, step: int, attempt: int) -> None:
        await self.compute(self.runtime.abort, step, attempt)
        request = pb.AbortRequest(step=step, attempt=attempt, reason="replay")

        async def one(stage: int) -> None:
            with contextlib.suppress(Exception):
                await self._unary(stage, "Abort", request, time.monotonic() + 2.0)

        await asyncio.gather(*(one(s) for s in range(1, self.num_stages)))

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start_server(self) -> None:
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        add_stage_service(StageService(self), self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        service_names = (
            pb.DESCRIPTOR.services_by_name["Stage"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(service_names, self.server)
        port = self.server.add_insecure_port(f"{self.opts.host}:{self.opts.port}")
        if port == 0:
            raise OSError(f"cannot bind gRPC server to {self.opts.host}:{self.opts.port}")
        host = self.opts.announce_host or (
            self.opts.host if self.opts.host not in ("0.0.0.0", "::") else socket.gethostname()
        )
        self.grpc_address = f"{host}:{port}"
        await self.server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _set_health(self, status: int) -> None:
        result = self.health.set("", status)
        if asyncio.iscoroutine(result):
            await result

    # ---- liveness ---------------------------------------------------------------------------------
    def swarm_committed(self) -> int:
        """The highest committed step any other live peer of this swarm announces."""
        return max(
            (
                r.committed_step
                for r in self.swarm_view
                if r.peer_id != self.peer_id
                and r.config_fingerprint == self.fingerprint
                and r.state in (StageState.ONLINE, StageState.WAITING)
            ),
            default=0,
        )

    def check_fault(self, phase: str, *, stage: int | None, step: int, microbatch: int | None = None) -> None:
        """Fault injection (tests, ``swarm-node local --kill``): dies here when a spec matches."""
        if microbatch is not None and microbatch != self.config.train.microbatches_per_step // 2:
            return
        for spec in self.opts.faults:
            # a replacement replays the step its predecessor died in: that kill has already happened
            replayed = phase != "fetch" and self.last_recovery is not None and step <= self.last_recovery.step + 1
            if spec.stage == stage and spec.step == step and spec.phase == phase and not replayed:
                self.emit({"event": "killed", "stage": stage, "step": step, "phase": phase})
                logger.warning("fault injection: dying in %s of step %d", phase, step)
                die_now()

    async def _heartbeats(self) -> None:
        """Pings the route neighbours (stage 0: every stage) every ``heartbeat_interval``; a failed or late
        reply makes the peer suspect at once. A block stage with a neighbour missing announces ``waiting``."""
        interval, timeout = self.opts.heartbeat_interval, self.opts.heartbeat_timeout

        async def ping(stage: int) -> bool:
            peer = self.peer_of(stage)
            if peer is None:
                # No serving peer left: a neighbour found it dead and re-stored its record as offline before
                # our own heartbeat could fail. The step in flight cannot finish either way.
                self.fail_step_in_flight(StepFailed(f"stage {stage} has no serving peer"))
                return False
            request = pb.HeartbeatRequest(
                sender_stage=self.stage or 0,
                sender_peer=self.peer_id,
                committed_step=self.runtime.committed_step if self.runtime else 0,
            )
            started = time.perf_counter()
            try:
                await self.channels.stub(peer.grpc_address).Heartbeat(request, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                self.suspect(peer, f"heartbeat: {err.code().name}")
                return False
            self.last_alive[peer.peer_id] = time.monotonic()
            if (side := heartbeat_side(self.stage, stage, self.num_stages)) is not None:
                self.metrics.heartbeat_rtt.labels(side=side).observe(time.perf_counter() - started)
            return True

        while not self.stopping.is_set():
            if self.stage is not None and self.runtime is not None:
                neighbours = neighbour_stages(self.stage, self.num_stages)
                alive = await asyncio.gather(*(ping(s) for s in neighbours))
                if self.stage != 0 and self.state in (StageState.ONLINE, StageState.WAITING):
                    wanted = StageState.ONLINE if all(alive) else StageState.WAITING
                    if wanted != self.state:
                        await self.announce(wanted)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    # ---- lifecycle --------------------------------------------------------------------------------
    async def _serving_peer(self, stage: int) -> str | None:
        """Another live (or rebuilding) peer of this swarm that holds ``stage``, per the DHT."""
        with contextlib.suppress(Exception):
            await self.refresh_view()
        for r in self.swarm_view:
            if (
                r.stage == stage
                and r.peer_id != self.peer_id
                and r.config_fingerprint == self.fingerprint
                and r.state in (StageState.ONLINE, StageState.WAITING, StageState.RECOVERING)
            ):
                return r.peer_id
        return None

    def _warm_up(self) -> None:
        """A spare pays torch's first-use costs (kernels, allocator, AdamW) before it is needed, not during
        a recovery: one throw-away forward, backward and optimizer step of a block stage."""
        rt = StageRuntime(self.config, 1, self.device)
        x = torch.zeros(1, min(8, self.config.train.seq_len), self.config.model.d_model, device=self.device)
        rt.module(x.requires_grad_(True)).sum().backward()
        rt.optimizer.step()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        if self.opts.metrics_port is not None:
            # on the gRPC server's interface: a loopback daemon does not expose its metrics to the network
            self.metrics_port = self.metrics.serve(self.opts.metrics_port, host=self.opts.host)
        await self.start_server()
        periodic = self._spawn(self._periodic())
        self._spawn(self._heartbeats())
        exit_code = 0
        try:
            if self.stage is not None and (holder := await self._serving_peer(self.stage)) is not None:
                # e.g. a restarted container whose stage a spare took over meanwhile: become the spare
                logger.warning("stage %d is already served by %s; waiting as a spare", self.stage, holder)
                self.stage = None
            warmed = False
            while True:
                if self.stage is None:
                    if not warmed:
                        await self.compute(self._warm_up)
                        warmed = True
                    self.publish_identity()
                    await self.announce(StageState.SPARE)
                    logger.info("spare node %s waiting for a vacant stage", self.peer_id)
                    await claim_vacant_stage(self)
                else:
                    await self.announce(StageState.JOINING)
                try:
                    await build_stage_runtime(self)
                    break
                except StageTaken as err:  # our view had missed its serving peer
                    logger.warning("%s; waiting as a spare", err)
                    self.stage = None
            self.publish_identity()
            self.metrics.committed_step.set(self.runtime.committed_step)
            logger.info(
                "stage %d serving on %s (peer %s, device %s)", self.stage, self.grpc_address, self.peer_id, self.device
            )
            await self.announce(StageState.ONLINE if self.stage else StageState.WAITING)
            if self.stage == 0 and self.opts.steps is not None:
                driver = self._spawn(self.drive(self.opts.steps))
                stop = self._spawn(self.stopping.wait())
                await asyncio.wait({driver, stop}, return_when=asyncio.FIRST_COMPLETED)
                if driver.done() and driver.exception() is not None:
                    logger.error("training driver failed", exc_info=driver.exception())
                    exit_code = 1
            else:
                await self.stopping.wait()
        except Unrecoverable as err:
            logger.error("%s; training cannot continue", err)
            self.emit({"event": "unrecoverable", "stage": self.stage, "reason": str(err)})
            exit_code = 3
        except asyncio.CancelledError:
            pass
        finally:
            self.stopping.set()
            periodic.cancel()
            await self.shutdown()
        return exit_code

    async def shutdown(self) -> None:
        """Clean exit: save the committed weights, announce ``offline`` (so nobody waits for a record to
        expire), then stop serving."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.opts.save_dir is not None and self.runtime is not None:
            await self.save_weights(pathlib.Path(self.opts.save_dir) / f"stage{self.stage}.safetensors")
        try:
            await asyncio.wait_for(self.announce(StageState.OFFLINE), timeout=5.0)
        except TimeoutError:
            logger.warning("could not announce offline within 5 s")
        if self._snapshot_task is not None:  # a snapshot still waiting for the writer is handed to it first
            with contextlib.suppress(Exception):
                await self._snapshot_task
        for task in list(self._tasks):
            task.cancel()
        if self.writer is not None:  # the write in progress completes: a clean exit loses no checkpoint
            await asyncio.to_thread(self.writer.close)
        await self.server.stop(grace=1.0)
        await self.channels.close()
        self._compute_pool.shutdown(wait=False)
        self._io_pool.shutdown(wait=False)

    async def save_weights(self, path: pathlib.Path) -> None:
        """The committed weights as safetensors, with the committed step and gradient norm as metadata."""
        step, norm, state = await self.compute(self.snapshot_committed)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "stage": str(self.stage),
            "committed_step": str(step),
            "grad_norm": repr(norm),
            "config_fingerprint": self.fingerprint,
        }
        tmp = path.with_suffix(".tmp")
        await self.compute(save_file, {k: v.contiguous() for k, v in state.items()}, str(tmp), meta)
        os.replace(tmp, path)


def run_daemon(opts: DaemonOptions) -> int:
    """Entry point of ``swarm-node run``: DHT first (it forks), then the uvloop event loop and gRPC."""
    import uvloop

    dht = hivemind.DHT(
        initial_peers=opts.initial_peers,
        host_maddrs=[f"/ip4/{_dht_bind(opts.host)}/tcp/{opts.dht_port}"],
        start=True,
        await_ready=True,
    )
    try:
        return uvloop.run(StageDaemon(opts, dht).run())
    finally:
        dht.shutdown()


def _dht_bind(host: str) -> str:
    return host if host.replace(".", "").isdigit() else "0.0.0.0"
