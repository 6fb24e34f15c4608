"""The Stage service's weight streams: ``FetchWeights``, ``ExportWeights`` and ``FetchReplica``.

``FetchWeights`` is served one stream at a time from a single snapshot of the committed weights, made once
per committed step and shared by every caller of that step (dropped when the stage commits again);
``ExportWeights`` is served from the same snapshot, for exactly the step the exporter asks, waiting for its
commit; ``FetchReplica`` (copies already in memory) is served one at a time too. A caller finding a stream
in progress waits for its turn, at most ``FetchLimits.wait_seconds`` and behind at most
``FetchLimits.max_waiting`` others; otherwise it is refused with ``RESOURCE_EXHAUSTED`` (reason ``busy``) and
asks again or another source. A reader that takes no chunk for ``stall_seconds``, or whose stream runs
past ``stream_seconds``, loses the stream (``DEADLINE_EXCEEDED``), so a stalled caller cannot hold the turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from node.proto import stage_pb2 as pb
from node.stage.participant import PipelineParticipant
from node.stage.refusals import Refusals
from node.stage.runtime import Reject
from node.wire.tensors import encode_stream

EXPORT_AHEAD_STEPS = 100  # an exporter asks for a step just ahead of the newest committed one; further is refused


@dataclass(frozen=True)
class FetchLimits:
    """How weight streams (FetchWeights, FetchReplica) are shared: one at a time, each bounded in time."""

    wait_seconds: float = 20.0  # a caller waits this long for the stream in progress, then gets ``busy``
    max_waiting: int = 4  # callers waiting beyond this get ``busy`` at once
    stall_seconds: float = 20.0  # a reader that takes no chunk for this long loses its stream
    stream_seconds: float = 300.0  # no stream lasts longer


class OneAtATime:
    """A turn for one stream at a time; a bounded number of callers wait for it, for a bounded time."""

    def __init__(self, limits: FetchLimits) -> None:
        self.limits = limits
        self._lock = asyncio.Lock()
        self._waiting = 0

    async def acquire(self) -> bool:
        """Takes the turn (True), or gives up (False) when too many wait or the wait runs out."""
        if self._lock.locked() and self._waiting >= self.limits.max_waiting:
            return False
        self._waiting += 1
        try:
            await asyncio.wait_for(self._lock.acquire(), self.limits.wait_seconds)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._lock.release()


@dataclass
class _Snapshot:
    runtime: weakref.ref  # the runtime it was taken from: a rollback installs another one
    step: int
    value: tuple[int, float, dict[str, torch.Tensor]]


class WeightStreams:
    """Streams this stage's weights to callers (see the module docstring). ``status()`` names the sender."""

    def __init__(
        self, participant: PipelineParticipant, refusals: Refusals, status: Callable[[], Any], limits: FetchLimits
    ) -> None:
        self.participant, self.refusals, self.status, self.limits = participant, refusals, status, limits
        self.weights_turn, self.replica_turn = OneAtATime(limits), OneAtATime(limits)
        self._snapshot: _Snapshot | None = None
        participant.after_commit.append(self._drop_snapshot)

    @contextlib.asynccontextmanager
    async def turn(self, context, rpc: str, replica: bool = False) -> AsyncIterator[None]:
        """This caller's turn at the weights (or, ``replica``, at the stage-0 copies); refused ``busy`` when
        it cannot get one (``context.abort`` raises: the body does not run)."""
        turn = self.replica_turn if replica else self.weights_turn
        if not await turn.acquire():
            await self.refusals.refuse(context, Reject.BUSY, f"another {rpc} stream is being served")
        try:
            yield
        finally:
            turn.release()

    def _drop_snapshot(self, committed: int | None = None) -> None:
        """The stage moved on: the snapshot of the previous committed step is of no more use."""
        self._snapshot = None

    async def committed_snapshot(self) -> tuple[int, float, dict[str, torch.Tensor]]:
        """The committed weights, snapshotted at most once per committed step (of the installed runtime)."""
        seat, cached = self.participant.seat, self._snapshot
        if cached is not None and cached.runtime() is seat.runtime and cached.step == seat.committed_step:
            return cached.value
        self._snapshot = None  # the old copy is dropped before the new one is made
        runtime = seat.runtime
        value = await self.participant.snapshot_committed()
        self._snapshot = _Snapshot(weakref.ref(runtime), value[0], value)
        return value

    async def send(self, context, chunks: Iterable[bytes], rpc: str) -> None:
        """Writes ``chunks`` to the caller, each within the stall limit and all within the stream limit; a
        reader that falls behind loses its stream (``DEADLINE_EXCEEDED``) and with it the turn."""
        loop, limits = asyncio.get_running_loop(), self.limits
        end = loop.time() + limits.stream_seconds
        for chunk in chunks:
            try:
                async with asyncio.timeout(min(limits.stall_seconds, end - loop.time())):
                    await context.write(chunk)
            except TimeoutError:
                self.refusals.log.log(f"{rpc} stalled", "cut off a %s stream: its reader fell behind", rpc)
                try:  # the status waits behind the chunk in flight: it goes out if the reader ever reads again
                    async with asyncio.timeout(1.0):
                        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{rpc}: the reader fell behind")
                except TimeoutError:
                    raise asyncio.CancelledError from None  # ends the handler (and the turn) without it

    async def send_committed(self, context, rpc: str, step: int | None = None) -> None:
        """The committed weights (of exactly ``step``, if given: the next step may have committed while the
        caller waited for its turn), from the snapshot shared per committed step. Holds the weights turn."""
        committed, norm, state = await self.committed_snapshot()
        if step is not None and committed != step:
            await self.refusals.refuse(context, Reject.UNKNOWN_STEP, f"at step {committed}, past {step}")
        me = self.status()
        meta = pb.MicrobatchMeta(step=committed, sender_stage=me.stage, sender_peer=me.peer_id, grad_norm=norm)
        await self.send(context, encode_stream(meta, list(state.items())), rpc)

    async def export(self, request: pb.FetchWeightsRequest, context) -> None:
        """The committed weights of exactly ``request.step``, for ``swarm-node export`` from a live swarm: every
        stage is asked for the same step, so the export is one committed step of the whole model. Waits for
        that commit (within the call's deadline, at most ``stream_seconds``); a stage already past it refuses
        (``unknown_step``), and the exporter asks every stage again for a later step. Training pauses only for
        the one copy of the weights that FetchWeights shares."""
        seat, refuse = self.participant.seat, self.refusals.refuse
        if request.step > seat.committed_step + EXPORT_AHEAD_STEPS:
            await refuse(context, Reject.UNKNOWN_STEP, f"step {request.step} is far ahead of this stage's")
        wait = min(context.time_remaining() or math.inf, self.limits.stream_seconds)
        if not await self.participant.wait_committed(request.step, wait):
            await refuse(context, Reject.UNKNOWN_STEP, f"step {request.step} not committed in time")
        if seat.committed_step != request.step:
            await refuse(context, Reject.UNKNOWN_STEP, f"at step {seat.committed_step}, past {request.step}")
        async with self.turn(context, "ExportWeights"):
            await self.send_committed(context, "ExportWeights", request.step)

    async def copy_to_replica(self, request: pb.FetchWeightsRequest, context) -> None:
        """This replica's exact state, to a node joining its stage as another replica. Only between steps: a
        step prepared here waits for its commit or abort first (the caller asks again)."""
        seat, refuse = self.participant.seat, self.refusals.refuse
        if request.requester_stage != seat.stage:
            await refuse(context, Reject.BAD_ROUTE, f"stage {seat.stage} is not {request.requester_stage}")
        if seat.runtime is None or seat.runtime.prepared:
            await refuse(context, Reject.BUSY, "a prepared step waits for its commit or abort; ask again")
        step, state = await self.participant.snapshot_full()
        me = self.status()
        meta = pb.MicrobatchMeta(step=step, sender_stage=me.stage, sender_peer=me.peer_id)
        await self.send(context, encode_stream(meta, list(state.items())), "FetchWeights")
