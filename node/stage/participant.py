"""A stage's part in the pipeline: microbatch order, the Forward/Backward handlers, pushing results on,
and the local side of the two-phase commit.

Every handler runs its torch work on the stage's compute thread, admitted in microbatch order per
direction (:class:`MicrobatchOrder`), so gradients accumulate exactly as in the single-process run
whatever order the network delivers in. The step protocol is described in ``docs/PROTOCOL.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
import torch

from node.config import SwarmConfig
from node.metrics import StageMetrics
from node.options import TimingOptions
from node.proto import stage_pb2 as pb
from node.recovery.faults import FaultInjector
from node.stage.compute import Background, Compute
from node.stage.inflight import MicrobatchOrder, PartialGradients, StepInFlight
from node.stage.presence import Presence
from node.stage.runtime import Reject, StageRuntime, StepError, StepFailed
from node.stage.seat import Seat
from node.transport.channels import ChannelPool
from node.wire.quantize import wire_form
from node.wire.tensors import encode_stream

logger = logging.getLogger(__name__)
T = TypeVar("T")
# a push is retried (to the stage's current peer) until the step's deadline when the peer is gone or slow, is
# busy with other streams, or has not yet seen this node's record (its membership check refuses the push)
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


def retryable(err: grpc.aio.AioRpcError) -> bool:
    """Whether a failed push may succeed if sent again (an oversize refusal never does; ``busy`` may)."""
    busy = err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (err.details() or "").startswith("busy")
    return busy or err.code() in RETRYABLE


class PipelineParticipant:
    """Receives microbatches, computes them in order, pushes results on, and prepares/commits/aborts."""

    def __init__(
        self,
        seat: Seat,
        compute: Compute,
        presence: Presence,
        channels: ChannelPool,
        config: SwarmConfig,
        timing: TimingOptions,
        metrics: StageMetrics,
        faults: FaultInjector,
        stopping: asyncio.Event,
        slowdown: float = 1.0,
        emulate_compute: float = 0.0,
    ) -> None:
        """Benchmark aids: ``slowdown`` makes every microbatch's compute take this many times as long (the
        compute thread sleeps for the difference); ``emulate_compute`` adds that many seconds of sleep per
        microbatch and direction on a block stage, so replica parallelism shows on few cores."""
        self.slowdown, self.emulate_compute = slowdown, emulate_compute
        self._ema_seconds: dict[str, float] = {}  # direction -> compute seconds per microbatch (moving average)
        self.seat, self.compute, self.presence, self.channels = seat, compute, presence, channels
        self.config, self.timing, self.metrics, self.faults, self.stopping = config, timing, metrics, faults, stopping
        t = config.train
        self.activation_shape = (t.microbatch_size, t.seq_len, config.model.d_model)
        self.max_activation_bytes = math.prod(self.activation_shape) * 4
        self.order = MicrobatchOrder()
        self.inflight = StepInFlight()
        self.gradients = PartialGradients()
        self.after_commit: list[Callable[[int], None]] = []  # called with each newly committed step
        self._committed = asyncio.Event()  # set and replaced at each commit: wakes wait_committed
        self._last_commit_at: float | None = None  # monotonic time of this node's last commit (step_seconds)
        self._background = Background()
        presence.on_peer_lost.append(self.inflight.fail)

    @property
    def runtime(self) -> StageRuntime:
        rt = self.seat.runtime
        if rt is None:
            raise StepError(Reject.NOT_READY, "this node holds no stage yet (spare or rebuilding)")
        return rt

    @property
    def committed_step(self) -> int:
        return self.seat.committed_step

    # ---- sending ----------------------------------------------------------------------------------
    async def send_tensor(
        self,
        rpc: str,
        target: int,
        meta: pb.MicrobatchMeta,
        tensor: torch.Tensor,
        deadline: float,
        peer_id: str = "",
    ) -> None:
        """Streams ``tensor`` to stage ``target`` (to its replica ``peer_id`` when given); retries another/new
        peer on transport errors. A chosen replica that is gone fails the microbatch: another replica lacks
        its activations, so stage 0 replays the step with a new assignment."""
        tensors = wire_form(tensor, self.config.wire_dtype)
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        while True:
            rt = self.seat.runtime
            if rt is not None and (rt.committed_step > meta.step or rt.attempt > meta.attempt):
                raise StepFailed(f"step {meta.step} attempt {meta.attempt} was superseded")
            if peer_id:
                # a peer handing its stage over still takes the step in flight (it finishes it before it goes)
                peer, gone = self.presence.route_peer(peer_id, target)
                if peer is None:
                    # not in this node's view yet (it starts up): wait for it as for any stage's peer
                    if gone or time.monotonic() >= deadline or self.stopping.is_set():
                        raise StepFailed(f"replica {peer_id} of stage {target} is gone")
                    await asyncio.sleep(min(0.2, self.timing.refresh_seconds))
                    await self.presence.try_refresh()
                    continue
            else:
                # a node handing its stage over finishes the step in flight: it takes microbatches until its
                # successor serves
                peer = await self.presence.resolve(target, deadline, self.stopping, leaving_ok=True)
            stub = self.channels.stub(peer)
            try:
                await getattr(stub, rpc)(
                    encode_stream(meta, tensors),
                    timeout=max(0.1, min(self.timing.rpc_timeout, deadline - time.monotonic())),
                )
            except grpc.aio.AioRpcError as err:
                if retryable(err) and time.monotonic() < deadline and not self.stopping.is_set():
                    if err.code() == grpc.StatusCode.UNAVAILABLE:
                        self.presence.suspect(peer, f"{rpc} failed: {err.code().name}")
                        if peer_id:
                            raise StepFailed(f"replica {peer_id} of stage {target} is unreachable") from None
                    await asyncio.sleep(0.1 if err.code() == grpc.StatusCode.UNAVAILABLE else 0.5)
                    await self.presence.try_refresh()
                    continue
                raise StepFailed(
                    f"{rpc} step {meta.step} mb {meta.microbatch} to stage {target}: {err.code().name} {err.details()}"
                ) from None
            self.metrics.bytes_sent.labels(direction=rpc.lower()).inc(nbytes)
            return

    def push(self, meta: pb.MicrobatchMeta, tensor: torch.Tensor, rpc: str, hop: int) -> None:
        """Pushes a result to ``meta.route[hop]`` in the background. A push that cannot be delivered fails
        the step in flight on stage 0; elsewhere it is logged, and stage 0 learns of the loss by heartbeat."""
        nxt = pb.MicrobatchMeta()
        nxt.CopyFrom(meta)
        nxt.hop, nxt.sender_stage, nxt.sender_peer = hop, self.seat.stage, self.presence.me.peer_id
        deadline = time.monotonic() + self.timing.step_timeout

        peer_id = meta.route_peers[hop] if len(meta.route_peers) > hop else ""

        async def send() -> None:
            try:
                await self.send_tensor(rpc, meta.route[hop], nxt, tensor, deadline, peer_id)
            except StepFailed as err:
                logger.warning("%s", err)
                self.inflight.fail(err, meta.microbatch)

        self._background.spawn(send())

    # ---- message handlers (called by the service after validation) ---------------------------------
    async def _compute_in_order(self, meta: pb.MicrobatchMeta, direction: str, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the compute thread after every lower microbatch of this step went the same way."""
        self.faults.check(direction, stage=self.seat.stage, step=meta.step + 1, microbatch=meta.microbatch)
        prev = meta.prev_microbatch[meta.hop] if len(meta.prev_microbatch) > meta.hop else meta.microbatch - 1
        await self.order.turn(
            meta.step, meta.attempt, direction, prev, self.runtime.committed_step, self.timing.step_timeout
        )
        slowed = self.slowdown != 1.0 or (self.emulate_compute and self.seat.stage)
        work = self._slowed(fn) if slowed else fn

        def timed() -> tuple[T, float]:
            # timed on the compute thread: the wait in its queue behind other microbatches is not this node's
            # speed (counted in, a busy replica looked slower, got fewer microbatches, and the shares swung)
            started = time.perf_counter()
            return work(), time.perf_counter() - started

        future = self.compute.submit(timed)
        await self.order.advance(meta.step, meta.attempt, direction, meta.microbatch)
        result, seconds = await future
        self.metrics.compute_seconds.labels(direction=direction).observe(seconds)
        old = self._ema_seconds.get(direction)
        self._ema_seconds[direction] = seconds if old is None else 0.8 * old + 0.2 * seconds
        self.metrics.microbatches.labels(direction=direction).inc()
        return result

    def _slowed(self, fn: Callable[[], T]) -> Callable[[], T]:
        emulated = self.emulate_compute if self.seat.stage else 0.0

        def slow() -> T:
            started = time.perf_counter()
            result = fn()
            time.sleep((self.slowdown - 1.0) * (time.perf_counter() - started) + self.slowdown * emulated)
            return result

        return slow

    def throughput(self) -> float | None:
        """Microbatches per second this node computes, forward and backward (None until it has done both)."""
        f, b = self._ema_seconds.get("forward"), self._ema_seconds.get("backward")
        return None if f is None or b is None or f + b <= 0 else 1.0 / (f + b)

    async def on_eval_forward(self, meta: pb.MicrobatchMeta, x: torch.Tensor) -> None:
        """Evaluation: forward only on the committed weights, outside the step in flight."""
        rt = self.runtime
        if meta.step != rt.committed_step:
            reason = Reject.STALE_STEP if meta.step < rt.committed_step else Reject.UNKNOWN_STEP
            raise StepError(reason, f"evaluation of step {meta.step}, but this stage has committed {rt.committed_step}")
        if self.seat.stage == 0:
            fut, targets = self.inflight.eval_future, self.inflight.eval_targets
            if fut is None or fut.done():
                raise StepError(Reject.BAD_MICROBATCH, "no evaluation is in flight")
            loss = await self.compute.run(rt.eval_loss, x, targets)
            if not fut.done():
                fut.set_result(loss)
            return
        self.push(meta, await self.compute.run(rt.eval_forward, x), "Forward", meta.hop + 1)

    async def on_forward(self, meta: pb.MicrobatchMeta, x: torch.Tensor) -> None:
        if meta.eval:
            await self.on_eval_forward(meta, x)
            return
        rt = self.runtime
        if self.seat.stage == 0:  # last hop: loss, and the gradient goes back
            targets = self.inflight.targets.get(meta.microbatch)

            def head() -> tuple[float, torch.Tensor]:
                rt.check_step(meta.step, meta.attempt)
                if targets is None:
                    raise StepError(Reject.BAD_MICROBATCH, f"microbatch {meta.microbatch} is not in flight")
                return rt.head(meta.microbatch, x, targets)

            loss, grad = await self._compute_in_order(meta, "forward", head)
            self.inflight.losses[meta.microbatch] = loss
            self.push(meta, grad, "Backward", meta.hop - 1)
            return

        def forward() -> torch.Tensor:
            rt.check_step(meta.step, meta.attempt)
            return rt.forward(meta.microbatch, x)

        self.push(meta, await self._compute_in_order(meta, "forward", forward), "Forward", meta.hop + 1)

    async def on_backward(self, meta: pb.MicrobatchMeta, grad: torch.Tensor) -> None:
        if meta.eval:
            raise StepError(Reject.BAD_STREAM, "evaluation messages only travel forward")
        rt = self.runtime
        if self.seat.stage == 0:  # home: the embedding's gradient

            def embedding_backward() -> None:
                rt.check_step(meta.step, meta.attempt)
                rt.embed_backward(meta.microbatch, grad)

            await self._compute_in_order(meta, "backward", embedding_backward)
            self.inflight.resolve(meta.microbatch)
            return

        def backward() -> torch.Tensor:
            rt.check_step(meta.step, meta.attempt)
            return rt.backward(meta.microbatch, grad)

        self.push(meta, await self._compute_in_order(meta, "backward", backward), "Backward", meta.hop - 1)

    # ---- the local side of the two-phase commit ----------------------------------------------------
    async def prepare(self, step: int, attempt: int, shares: list[tuple[str, list[int]]] | None = None) -> float:
        """Phase 1: every microbatch's backward is in; the squared gradient norm before clipping. With
        ``shares`` (several replicas of this stage in the step: peer -> its microbatches), the replicas first
        exchange their partial gradients and each sums them in the same order."""
        rt, me = self.runtime, self.presence.me.peer_id
        if not shares or len(shares) == 1:
            share = shares[0][1] if shares else None
            return await self.compute.run(rt.prepare, step, attempt, share)
        mine = next((mbs for peer, mbs in shares if peer == me), None)
        if mine is None:
            raise StepError(Reject.BAD_ROUTE, f"step {step}: this replica has no share")
        others = [(peer, mbs) for peer, mbs in shares if peer != me]
        sends = []
        if mine:
            partial = await self.compute.run(self._own_partial, rt, step, attempt, mine)
            meta = pb.MicrobatchMeta(
                step=step, attempt=attempt, microbatch=mine[0], sender_stage=self.seat.stage, sender_peer=me
            )
            sends = [self._send_partial(peer, meta, partial) for peer, _ in others]
        expected = {peer: mbs[0] for peer, mbs in others if mbs}
        timeout = self.timing.rpc_timeout
        results = await asyncio.gather(self.gradients.take(step, attempt, expected, timeout), *sends)
        partials = results[0]
        return await self.compute.run(rt.prepare, step, attempt, mine, partials)

    @staticmethod
    def _own_partial(rt: StageRuntime, step: int, attempt: int, share: list[int]) -> dict[str, torch.Tensor]:
        rt.check_step(step, attempt)
        done = rt.done_microbatches()
        if done != share:
            raise StepError(Reject.INCOMPLETE, f"step {step}: microbatches {done} are done, the share is {share}")
        return rt.partial_grads()

    async def _send_partial(self, peer_id: str, meta: pb.MicrobatchMeta, partial: dict[str, torch.Tensor]) -> None:
        peer = self.presence.member(peer_id, lately=True)
        if peer is None or peer.stage != self.seat.stage:
            raise StepError(Reject.INCOMPLETE, f"co-replica {peer_id} of stage {self.seat.stage} is gone")
        try:
            await self.channels.stub(peer).PushGradients(
                encode_stream(meta, list(partial.items())), timeout=self.timing.rpc_timeout
            )
        except grpc.aio.AioRpcError as err:
            raise StepError(
                Reject.INCOMPLETE, f"partial gradient to {peer_id}: {err.code().name} {err.details()}"
            ) from None

    async def commit(self, step: int, attempt: int, clip_coef: float) -> int:
        """Phase 2: clip and apply AdamW (idempotent); returns the committed step."""
        rt = self.runtime
        before = rt.committed_step
        committed = await self.compute.run(rt.commit, step, attempt, clip_coef)
        self.metrics.committed_step.set(committed)
        if committed != before:
            now = time.monotonic()
            if self._last_commit_at is not None:
                self.metrics.step_seconds.observe(now - self._last_commit_at)
            self._last_commit_at = now
            if (throughput := self.throughput()) is not None:
                self.metrics.throughput.set(throughput)
            for hook in self.after_commit:
                hook(committed)
            self._committed.set()
            self._committed = asyncio.Event()
        return committed

    async def wait_committed(self, step: int, timeout: float) -> bool:
        """Whether this stage has committed ``step`` (or a later one), waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.seat.committed_step < step:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._committed.wait(), remaining)
        return True

    async def abort(self, step: int, attempt: int) -> None:
        """Discards the step in flight (parameters untouched)."""
        await self.compute.run(self.runtime.abort, step, attempt)

    async def install(self, runtime: StageRuntime) -> None:
        """Serves ``runtime`` from now on (a rollback): the steps after its committed step run again."""
        self.seat.runtime = runtime
        await self.order.reset()
        self._last_commit_at = None
        self.metrics.committed_step.set(runtime.committed_step)

    async def snapshot_committed(self) -> tuple[int, float, dict[str, torch.Tensor]]:
        """(committed step, last gradient norm, weights cloned to CPU): a consistent view, taken between
        steps on the compute thread."""
        rt = self.runtime

        def snapshot() -> tuple[int, float, dict[str, torch.Tensor]]:
            state = {k: v.to("cpu").clone() for k, v in rt.committed_state().items()}
            return rt.committed_step, rt.last_grad_norm, state

        return await self.compute.run(snapshot)

    async def snapshot_full(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(committed step, everything a successor needs to continue exactly): weights, AdamW state and the
        0-d tensors ``meta.lr_scale`` and ``meta.last_grad_norm``, cloned to CPU on the compute thread."""
        rt = self.runtime

        def snapshot() -> tuple[int, dict[str, torch.Tensor]]:
            return rt.committed_step, rt.handover_state()

        return await self.compute.run(snapshot)

    def close(self) -> None:
        self._background.cancel_all()
