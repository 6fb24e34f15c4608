"""Exporting from a live swarm: every stage's committed weights at one step, while the swarm trains on.

The exporter is a member of the swarm (its key bundle, or ``--insecure`` for an open swarm). It reads the
stage records, picks one serving peer per stage, asks each for its committed step (``GetStatus``), and then
asks every stage for the weights of the same step ``S`` with ``ExportWeights``. A stage still before ``S``
waits for that commit; one already past it refuses, and the exporter asks every stage again for a step just
ahead of the newest it sees, which each stage then serves right after committing it. Stages copy their
weights once per committed step (shared with ``FetchWeights``), so training pauses for that copy only.

Every stream is checked as a rebuild source is: the stage's exact names, shapes and dtypes, finite values,
no more bytes than the stage has, and the step asked for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import grpc
import torch

from node.config import SwarmConfig
from node.dht.directory import pick_peer
from node.export.hf import ExportError
from node.export.io import StageWeights
from node.proto import stage_pb2 as pb
from node.recovery.rebuild import BadSource, check_weights, expected_state, state_bytes
from node.transport.channels import ChannelPool
from node.wire.records import SERVING_STATES, StageRecord
from node.wire.tensors import TensorAssembler, WireError

logger = logging.getLogger(__name__)
ATTEMPTS = 6  # rounds of asking every stage for one step before giving up
STATUS_TIMEOUT = 10.0
RETRYABLE = {  # a stage that was past the step, busy serving another stream, or briefly unreachable
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


class Retry(Exception):
    """One stage could not give this step now; every stage is asked again for a later one."""


def match_config(records: Iterable[StageRecord], candidates: Iterable[SwarmConfig]) -> SwarmConfig:
    """The candidate configuration that the swarm's serving peers run (same fingerprint and stage count);
    :class:`ExportError` naming what the swarm runs when none does."""
    serving = [r for r in records if r.state in SERVING_STATES]
    if not serving:
        raise ExportError("no stage of this swarm is serving (is it training? is --swarm right?)")
    candidates = list(candidates)
    for cfg in candidates:
        if any(r.config_fingerprint == cfg.fingerprint() and r.num_stages == cfg.num_stages for r in serving):
            return cfg
    seen = sorted({f"{r.config_fingerprint} ({r.num_stages} stages)" for r in serving})
    mine = ", ".join(sorted({c.fingerprint() for c in candidates}))
    raise ExportError(
        f"the swarm runs configuration {', '.join(seen)}, not this one ({mine}); pass the swarm's "
        "--preset/--config/--tokenizer"
    )


def choose_peers(records: Iterable[StageRecord], cfg: SwarmConfig) -> dict[int, StageRecord]:
    """One serving peer per stage (the one ``pick_peer`` would train with); :class:`ExportError` naming the
    stages nobody serves."""
    records = list(records)
    fp = cfg.fingerprint()
    peers = {s: pick_peer(records, s, fingerprint=fp, num_stages=cfg.num_stages) for s in range(cfg.num_stages)}
    missing = [s for s, peer in peers.items() if peer is None]
    if missing:
        raise ExportError(
            f"stage(s) {', '.join(map(str, missing))} have no serving peer right now (a recovery under way?); "
            "try again, or export a snapshot with --from"
        )
    return {s: peer for s, peer in peers.items() if peer is not None}


async def committed_steps(channels: ChannelPool, peers: dict[int, StageRecord]) -> dict[int, int]:
    """Each stage's committed step, asked of its peer."""

    async def one(peer: StageRecord) -> int:
        reply = await channels.stub(peer).GetStatus(pb.StatusRequest(), timeout=STATUS_TIMEOUT)
        return int(reply.committed_step)

    steps = await asyncio.gather(*(one(p) for p in peers.values()))
    return dict(zip(peers, steps, strict=True))


async def fetch_stage(
    channels: ChannelPool, peer: StageRecord, cfg: SwarmConfig, stage: int, step: int, timeout: float
) -> dict[str, torch.Tensor]:
    """Stage ``stage``'s committed weights of exactly ``step``, checked; :class:`Retry` when the stage cannot
    give that step now, :class:`ExportError` when it refuses for good or sends a bad stream."""
    spec = expected_state(cfg, stage)
    limit = state_bytes(spec)
    asm = TensorAssembler(max_tensor_bytes=limit, max_stream_bytes=limit)
    request = pb.FetchWeightsRequest(requester_stage=stage, step=step)
    try:
        async for message in channels.stub(peer).ExportWeights(request, timeout=timeout):
            asm.feed(message)
        weights = asm.finish()
    except grpc.aio.AioRpcError as err:
        text = f"stage {stage} ({peer.grpc_address}): {err.code().name} {err.details() or ''}".rstrip()
        if err.code() in RETRYABLE:
            raise Retry(text) from None
        raise ExportError(text) from None
    except WireError as err:
        raise ExportError(f"stage {stage} ({peer.grpc_address}) sent a bad weight stream: {err}") from None
    if asm.meta is None or asm.meta.step != step:
        got = None if asm.meta is None else asm.meta.step
        raise ExportError(f"stage {stage} ({peer.grpc_address}) sent step {got}, not {step}")
    try:
        check_weights(weights, spec, f"stage {stage} ({peer.grpc_address})")
    except BadSource as err:
        raise ExportError(str(err)) from None
    return weights


async def export_live(
    channels: ChannelPool,
    peers: dict[int, StageRecord],
    cfg: SwarmConfig,
    source: str,
    *,
    wait_seconds: float = 120.0,
    attempts: int = ATTEMPTS,
) -> StageWeights:
    """Every stage's committed weights at one step (see the module docstring)."""
    try:
        step = max((await committed_steps(channels, peers)).values())
    except grpc.aio.AioRpcError as err:
        raise ExportError(f"could not ask the stages for their committed step: {err.code().name}") from None
    last = ""
    for attempt in range(attempts):
        logger.info("asking every stage for the weights of step %d (round %d)", step, attempt + 1)
        results = await asyncio.gather(
            *(fetch_stage(channels, peer, cfg, s, step, wait_seconds) for s, peer in peers.items()),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return StageWeights(cfg, step, dict(zip(peers, results, strict=True)), source)
        if fatal := [e for e in errors if not isinstance(e, Retry)]:
            raise fatal[0]
        last = "; ".join(map(str, errors))
        logger.info("step %d is not available on every stage (%s); asking for a later one", step, last)
        try:
            step = max((await committed_steps(channels, peers)).values()) + 1
        except grpc.aio.AioRpcError as err:
            raise ExportError(f"a stage stopped answering: {err.code().name}") from None
    raise ExportError(f"no step was available on every stage after {attempts} rounds ({last})")
