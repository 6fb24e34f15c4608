"""The serving side of handoffs, for the Stage service: a leaving owner's full state to its successor, and a
leaving neighbour's state kept here when nobody took it in time (docs/RECOVERY.md, section 10)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import torch

from node.proto import stage_pb2 as pb
from node.recovery.handoff import check_handoff, max_state_bytes
from node.recovery.rebuild import BadSource, expected_state
from node.stage.participant import PipelineParticipant
from node.stage.refusals import Refusals
from node.stage.runtime import Reject
from node.wire.tensors import encode_stream

logger = logging.getLogger(__name__)
Send = Callable[[Any, Iterable[bytes], str], Awaitable[None]]  # (context, chunks, rpc)


class Handoffs:
    """Serves ``FetchWeights(full_state)`` from a node handing its stage over, keeps ``ParkState`` states and
    serves them back with ``FetchWeights(parked)``. ``send`` streams chunks to a caller (the service's, with
    its stall limits)."""

    def __init__(self, participant: PipelineParticipant, refusals: Refusals, send: Send, me: Callable[[], Any]):
        self.participant, self.refusals, self.send, self.me = participant, refusals, send, me
        self.handed_over: list[int] = []  # committed steps whose full state was streamed to a successor
        self.parked: tuple[int, int, dict[str, torch.Tensor]] | None = None  # a leaving neighbour's state

    @property
    def parked_at(self) -> tuple[int, int] | None:
        """(stage, committed step) of the state a preempted neighbour left here, if any."""
        return (self.parked[0], self.parked[1]) if self.parked is not None else None

    def park_limit(self) -> int:
        """Byte limit of a parked state: the largest stage's full state."""
        cfg = self.participant.config
        return max(max_state_bytes(expected_state(cfg, s)) for s in range(cfg.num_stages))

    async def hand_over(self, request: pb.FetchWeightsRequest, context) -> None:
        """The exact state of a stage whose owner is handing it over, to the node that claimed the stage. Only
        between steps: a step prepared here waits for its commit or abort first (the caller asks again). The
        caller holds the service's weight-stream turn."""
        seat, refuse = self.participant.seat, self.refusals.refuse
        if not seat.handing_over:
            await refuse(context, Reject.NOT_READY, f"stage {seat.stage} is not being handed over")
        if request.requester_stage != seat.stage:
            await refuse(context, Reject.BAD_ROUTE, f"stage {seat.stage} is not {request.requester_stage}")
        if seat.runtime is None or seat.runtime.prepared:
            await refuse(context, Reject.BUSY, "a prepared step waits for its commit or abort; ask again")
        step, state = await self.participant.snapshot_full()
        meta = pb.MicrobatchMeta(step=step, sender_stage=seat.stage, sender_peer=self.me().peer_id)
        await self.send(context, encode_stream(meta, list(state.items())), "FetchWeights")
        self.handed_over.append(step)

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
        self.parked = (stage, step, tensors)
        logger.warning("keeping the state of stage %d at step %d for its next owner", stage, step)

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
