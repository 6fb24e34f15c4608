"""A node taking over a stage: claim a vacant stage (``--stage auto``), then (re)build its weights.

Claiming has no central arbiter: a spare announces itself ``recovering`` for the lowest vacant stage, waits
two DHT refresh periods so that rival claims become visible, and keeps the stage only if
:func:`~node.recovery.planner.claim_winner` names it (lowest peer id among claimants); the others go back
to being spares. Every node, including one started with an explicit ``--stage``, then builds its weights
by the plan of :func:`~node.recovery.planner.plan_recovery`; a fresh swarm gets the seed's weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

import grpc
import torch

from node.proto import stage_pb2 as pb
from node.recovery.faults import die_now
from node.recovery.planner import (
    Method,
    RecoveryPlan,
    claim_winner,
    live_stages,
    plan_recovery,
    vacant_stages,
)
from node.recovery.rebuild import checkfree_average
from node.stage.runtime import StageRuntime
from node.wire.records import RecoveryRecord, StageState
from node.wire.tensors import TensorAssembler

if TYPE_CHECKING:
    from node.stage.daemon import StageDaemon

logger = logging.getLogger(__name__)


class Unrecoverable(RuntimeError):
    """The stage cannot be rebuilt with the chosen strategy; training cannot go on."""


async def claim_vacant_stage(d: StageDaemon) -> int:
    """Waits as a spare until a stage is vacant and this node wins the claim; returns the stage."""
    settle = 2 * d.opts.refresh_seconds
    while not d.stopping.is_set():
        with contextlib.suppress(Exception):
            await d.refresh_view()
        vacant = vacant_stages(d.swarm_view, fingerprint=d.fingerprint, num_stages=d.num_stages, suspects=d.suspected())
        if vacant:
            d.stage = vacant[0]
            await d.announce(StageState.RECOVERING)
            logger.info("claiming vacant stage %d", d.stage)
            await asyncio.sleep(settle)
            with contextlib.suppress(Exception):
                await d.refresh_view()
            winner = claim_winner(d.swarm_view, d.stage, fingerprint=d.fingerprint, num_stages=d.num_stages)
            if winner == d.peer_id:
                return d.stage
            logger.info("stage %d went to %s; staying spare", d.stage, winner)
            d.stage = None
        await d.announce(StageState.SPARE)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(d.stopping.wait(), d.opts.refresh_seconds)
    raise asyncio.CancelledError


async def fetch_committed(d: StageDaemon, stage: int) -> tuple[int, float, dict[str, torch.Tensor], int]:
    """(committed step, gradient norm, weights, bytes) of stage ``stage``'s serving peer, over FetchWeights."""
    peer = d.peer_of(stage)
    if peer is None:
        raise ConnectionError(f"no live peer for stage {stage}")
    stub = d.channels.stub(peer.grpc_address)
    asm = TensorAssembler(max_tensor_bytes=1 << 36, max_stream_bytes=1 << 38)
    nbytes = 0
    try:
        call = stub.FetchWeights(
            pb.FetchWeightsRequest(requester_stage=d.stage or 0, requester_peer=d.peer_id),
            timeout=max(d.opts.rpc_timeout, 60.0),
        )
        async for message in call:
            asm.feed(message)
            nbytes += len(message)
            d.check_fault("fetch", stage=d.stage, step=d.swarm_committed() + 1)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            d.suspect(peer, f"FetchWeights failed: {err.code().name}")
        raise ConnectionError(f"fetching stage {stage} from {peer.peer_id}: {err.code().name}") from None
    tensors = asm.finish()
    if asm.meta is None:
        raise ConnectionError(f"stage {stage} sent a weight stream without its step and gradient norm")
    return int(asm.meta.step), float(asm.meta.grad_norm), tensors, nbytes


async def build_stage_runtime(d: StageDaemon) -> None:
    """Builds ``d.runtime`` for ``d.stage``: fresh at step 0, otherwise by the recovery plan, retrying with
    whoever is alive when a source dies mid-fetch."""
    died_at = time.monotonic()
    while not d.stopping.is_set():
        with contextlib.suppress(Exception):
            await d.refresh_view()
        others = [r for r in d.swarm_view if r.peer_id != d.peer_id]
        live = live_stages(others, fingerprint=d.fingerprint, num_stages=d.num_stages, suspects=d.suspected())
        committed = d.swarm_committed()
        plan = plan_recovery(d.stage, d.num_stages, live - {d.stage}, committed, d.opts.recovery)
        if plan.method == Method.UNRECOVERABLE:
            raise Unrecoverable(f"stage {d.stage} cannot be rebuilt: {plan.reason}")
        try:
            await _execute(d, plan, committed, died_at)
            return
        except ConnectionError as err:
            logger.warning("recovery of stage %d by %s failed (%s); re-planning", d.stage, plan.method, err)
            await asyncio.sleep(0.2)


async def _execute(d: StageDaemon, plan: RecoveryPlan, committed: int, started: float) -> None:
    cfg, stage = d.config, d.stage
    assert stage is not None
    if plan.method == Method.FRESH:
        d.runtime = await d.compute(StageRuntime, cfg, stage, d.device)
        return
    t0 = time.monotonic()
    fetched: list[tuple[int, float, dict[str, torch.Tensor]]] = []
    nbytes = 0
    for src in plan.sources:
        step, norm, weights, n = await fetch_committed(d, src)
        fetched.append((step, norm, weights))
        nbytes += n
    steps = {step for step, _, _ in fetched} | ({committed} if plan.method == Method.RANDOM else set())
    if len(steps) > 1:  # a commit was landing while we fetched: fetch again
        raise ConnectionError(f"sources disagree on the committed step {sorted(steps)}")
    step = steps.pop() if steps else committed
    lr_scale = d.opts.lr_scale
    if plan.method == Method.CHECKFREE:
        (_, g_lo, w_lo), (_, g_hi, w_hi) = fetched
        weights = await d.compute(checkfree_average, w_lo, g_lo, w_hi, g_hi)
        norm = (g_lo + g_hi) / 2
    elif plan.method == Method.COPY:
        _, norm, weights = fetched[0]
    else:  # RANDOM
        weights, norm = None, 0.0
    seed = int.from_bytes(os.urandom(7), "little") if plan.method == Method.RANDOM else None
    d.runtime = await d.compute(
        lambda: StageRuntime(
            cfg,
            stage,
            d.device,
            lr_scale=lr_scale,
            weights=weights,
            committed_step=step,
            last_grad_norm=norm,
            random_seed=seed,
        )
    )
    rebuild_seconds = time.monotonic() - t0
    d.last_recovery = RecoveryRecord(
        method=plan.method.value, step=step, seconds=time.monotonic() - started, sources=[str(s) for s in plan.sources]
    )
    d.metrics.recoveries.labels(method=plan.method.value).inc()
    d.metrics.recovery_fetched_bytes.inc(nbytes)
    d.metrics.rebuild_seconds.observe(rebuild_seconds)
    d.emit(
        {
            "event": "recovery",
            "stage": stage,
            "step": step,
            "method": plan.method.value,
            "sources": list(plan.sources),
            "source_grad_norms": [n for _, n, _ in fetched],
            "bytes_fetched": nbytes,
            "rebuild_seconds": rebuild_seconds,
            "lr_scale": lr_scale,
        }
    )
    logger.warning(
        "stage %d rebuilt at step %d by %s from %s (%d bytes, %.2fs)",
        stage,
        step,
        plan.method.value,
        list(plan.sources),
        nbytes,
        rebuild_seconds,
    )
    if d.opts.save_dir is not None:  # what was built, for audit and tests
        await d.save_weights(d.opts.save_dir / f"stage{stage}.recovered-step{step}.safetensors")


__all__ = ["Unrecoverable", "build_stage_runtime", "claim_vacant_stage", "die_now"]
