"""The serving side of handoffs, for the Stage service: a leaving owner's full state to its successor, and a
leaving neighbour's state kept here when nobody took it in time (docs/RECOVERY.md, section 10).

On a soft notice the full state is pre-staged: serialized after every commit (on the compute thread, then a
worker thread), so that a hard notice streams it (or parks it) without cloning and encoding it first. A
parked state is dropped once its stage is served again (:func:`~node.recovery.handoff.parked_state_served`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import torch

from node.proto import stage_pb2 as pb
from node.recovery.handoff import check_handoff, largest_state_bytes, parked_state_served
from node.recovery.rebuild import BadSource, expected_state
from node.stage.participant import PipelineParticipant
from node.stage.presence import Presence
from node.stage.refusals import Refusals
from node.stage.runtime import Reject
from node.wire.tensors import encode_stream

logger = logging.getLogger(__name__)
Send = Callable[[Any, Iterable[bytes], str], Awaitable[None]]  # (context, chunks, rpc)
RELEASE_POLL_SECONDS = 0.5  # how often a holder checks whether its parked state's stage is served again
PARKED_ANNOUNCE_SECONDS = 5.0  # at most this long before a parked state is acknowledged: its record is stored


class Handoffs:
    """Serves ``FetchWeights(full_state)`` from a node handing its stage over, keeps ``ParkState`` states and
    serves them back with ``FetchWeights(parked)``. ``send`` streams chunks to a caller (the service's, with
    its stall limits)."""

    def __init__(self, participant: PipelineParticipant, refusals: Refusals, send: Send, me: Callable[[], Any]):
        self.participant, self.refusals, self.send, self.me = participant, refusals, send, me
        self.handed_over: list[int] = []  # committed steps whose full state was streamed to a successor
        self.preparing = 0  # Prepare calls under way (the service counts them)
        self.sealed = False  # the full state is going to a successor or a neighbour: no step is prepared from now
        self.parked: tuple[int, int, dict[str, torch.Tensor]] | None = None  # a leaving neighbour's state
        self.parked_by: str | None = None  # the peer id of the node that parked it
        self.prestaging = False  # a soft notice: keep the full state serialized, refreshed after each commit
        self.prestaged: tuple[int, list[bytes]] | None = None  # (committed step, the encoded full-state stream)
        self._staging: asyncio.Task | None = None
        self._stage_again = False
        self._announce: Callable[[], Awaitable[None]] | None = None  # stores this node's record (release_parked)
        self._announcing: asyncio.Future | None = None
        self._park_limit: int | None = None

    @property
    def parked_at(self) -> tuple[int, int] | None:
        """(stage, committed step) of the state a preempted neighbour left here, if any."""
        return (self.parked[0], self.parked[1]) if self.parked is not None else None

    def park_limit(self) -> int:
        """Byte limit of a parked state or a neighbour snapshot: the largest stage's full state (computed once)."""
        if self._park_limit is None:
            self._park_limit = largest_state_bytes(self.participant.config)
        return self._park_limit

    async def hand_over(self, request: pb.FetchWeightsRequest, context) -> None:
        """The exact state of a stage whose owner is handing it over, to the node that claimed the stage. Only
        between steps: a step prepared here waits for its commit or abort first (the caller asks again). The
        caller holds the service's weight-stream turn."""
        seat, refuse = self.participant.seat, self.refusals.refuse
        if not seat.handing_over:
            await refuse(context, Reject.NOT_READY, f"stage {seat.stage} is not being handed over")
        if request.requester_stage != seat.stage:
            await refuse(context, Reject.BAD_ROUTE, f"stage {seat.stage} is not {request.requester_stage}")
        if not self.seal():
            await refuse(context, Reject.BUSY, "a prepared step waits for its commit or abort; ask again")
        step, chunks = await self.full_stream()
        await self.send(context, chunks, "FetchWeights")
        self.handed_over.append(step)

    def seal(self) -> bool:
        """On a leaving node, between steps: from now on no step is prepared here (``Prepare`` is refused), so
        the full state about to be sent stays the stage's state. False while a step is being prepared or waits
        for its commit or abort: the node finishes the step in flight first (ask again)."""
        runtime = self.participant.seat.runtime
        if runtime is None or runtime.prepared or self.preparing:
            return False
        self.sealed = True
        return True

    # ---- pre-staging on a soft notice ---------------------------------------------------------------
    async def full_stream(self) -> tuple[int, Iterable[bytes]]:
        """(committed step, the full state as a stream of messages, which may be iterated more than once) for a
        successor or a parking neighbour: the pre-staged stream when it holds the committed step, else a
        snapshot encoded as it is sent (:class:`EncodedState`). Only
        between steps (no prepared step), like every full-state snapshot."""
        seat = self.participant.seat
        staged = self.staged(seat.committed_step)
        if staged is not None:
            return seat.committed_step, staged
        step, state = await self.participant.snapshot_full()
        meta = pb.MicrobatchMeta(step=step, sender_stage=seat.stage, sender_peer=self.me().peer_id)
        return step, EncodedState(meta, state)

    def staged(self, step: int) -> list[bytes] | None:
        """The pre-staged stream of committed step ``step``, if that is what was pre-staged."""
        staged = self.prestaged
        return staged[1] if staged is not None and staged[0] == step else None

    def prestage(self) -> None:
        """A soft notice: from now on keep the full state of the latest committed step encoded (refreshed
        after every commit), so that a hard notice's handover starts streaming at once. Idempotent; call on
        the event loop."""
        if not self.prestaging:
            self.prestaging = True
            self.participant.after_commit.append(lambda _step: self._restage())
        self._restage()

    def _restage(self) -> None:
        """Starts a refresh of the pre-staged stream, or asks the one running to go again when it ends."""
        if self.participant.seat.runtime is None:
            return
        if self._staging is not None and not self._staging.done():
            self._stage_again = True
            return
        self._staging = asyncio.get_running_loop().create_task(self._stage())

    async def _stage(self) -> None:
        seat = self.participant.seat
        while seat.runtime is not None:
            self._stage_again = False
            started = time.perf_counter()
            try:
                step, state = await self.participant.snapshot_full()
                meta = pb.MicrobatchMeta(step=step, sender_stage=seat.stage, sender_peer=self.me().peer_id)
                chunks = await asyncio.to_thread(_encoded, meta, state)
            except Exception:  # the stage was lost meanwhile (or a bug): a handover snapshots as before
                logger.exception("could not pre-stage the full state")
                return
            self.prestaged = (step, chunks)
            logger.debug("pre-staged the full state of step %d (%d bytes) in %.3f s", step,
                         sum(len(c) for c in chunks), time.perf_counter() - started)  # fmt: skip
            if not self._stage_again:
                return

    # ---- parked states ------------------------------------------------------------------------------
    def drop_parked_if_served(self, records: Iterable[Any]) -> bool:
        """Drops the parked state once its stage is served again (see ``parked_state_served``); True when it
        dropped one (the caller announces the record without ``parked_stage``)."""
        parked = self.parked_at
        by = parked_state_served(parked, records, self.parked_by)
        if parked is None or by is None:
            return False
        self.parked = None
        logger.warning(
            "stage %d is served again by %s at step %d: dropped its parked state of step %d",
            parked[0], by.peer_id, by.committed_step, parked[1],
        )  # fmt: skip
        return True

    async def release_parked(self, presence: Presence, stopping: asyncio.Event) -> None:
        """Until ``stopping``: every ``RELEASE_POLL_SECONDS``, drops a parked state whose stage is served again
        in this node's view (which ``Presence.run_periodic`` keeps fresh) and announces the record without it at
        once, so that the planner stops offering it. Also makes :meth:`keep` store the record before it
        acknowledges a park."""
        self._announce = presence.announce
        while not stopping.is_set():
            if self.parked is not None and self.drop_parked_if_served(presence.members()):
                await presence.announce()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), RELEASE_POLL_SECONDS)

    async def keep(self, meta: pb.MicrobatchMeta | None, tensors: dict[str, torch.Tensor], context) -> None:
        """Keeps a route neighbour's state, decoded from ``ParkState`` (one at a time: a newer one replaces it)."""
        seat, cfg, refuse = self.participant.seat, self.participant.config, self.refusals.refuse
        if seat.stage is None:
            await refuse(context, Reject.NOT_READY, "this node holds no stage")
        stage = meta.sender_stage if meta is not None else -1
        if not 0 <= stage < cfg.num_stages or stage == seat.stage:
            await refuse(context, Reject.BAD_ROUTE, f"stage {stage} cannot be parked on stage {seat.stage}")
        try:
            step, _, _ = check_handoff(meta, tensors, expected_state(cfg, stage), f"the node leaving stage {stage}")
        except BadSource as err:
            await refuse(context, Reject.BAD_STREAM, str(err))
        self.parked, self.parked_by = (stage, step, tensors), meta.sender_peer if meta is not None else None
        logger.warning("keeping the state of stage %d at step %d for its next owner", stage, step)
        if self._announce is not None:
            # the record says parked_stage before the leaving owner hears the park went through (and exits): a
            # node that plans the stage's recovery once the owner is gone then finds the copy, not an older
            # record. Within the caller's deadline (a short notice); the store goes on in the background.
            remaining = context.time_remaining() if context is not None else None
            budget = PARKED_ANNOUNCE_SECONDS if remaining is None else min(PARKED_ANNOUNCE_SECONDS, remaining - 0.2)
            stored = asyncio.ensure_future(self._announce())
            self._announcing = stored  # a reference, so the store is not collected before it ends
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stored), max(budget, 0.0))

    async def give_back(self, request: pb.FetchWeightsRequest, context) -> None:
        """The parked state of ``request.requester_stage``, to the node that took that stage."""
        parked = self.parked
        if parked is None or parked[0] != request.requester_stage:
            await self.refusals.refuse(
                context, Reject.UNKNOWN_STEP, f"no parked state of stage {request.requester_stage}"
            )
        stage, step, tensors = parked
        meta = pb.MicrobatchMeta(step=step, sender_stage=stage, sender_peer=self.me().peer_id)
        await self.send(context, encode_stream(meta, list(tensors.items())), "FetchWeights")


class EncodedState:
    """A full state that encodes itself (``encode_stream``) each time it is iterated: sent as it is encoded."""

    def __init__(self, meta: pb.MicrobatchMeta, state: dict[str, torch.Tensor]) -> None:
        self.meta, self.state = meta, state

    def __iter__(self) -> Iterator[bytes]:
        return encode_stream(self.meta, list(self.state.items()))


def _encoded(meta: pb.MicrobatchMeta, state: dict[str, torch.Tensor]) -> list[bytes]:
    return list(encode_stream(meta, list(state.items())))
