"""A node taking over a stage: claim a vacant stage (``--stage auto``), then (re)build its weights.

Claiming has no central arbiter: a spare announces itself ``recovering`` for the lowest vacant stage, waits
one DHT refresh period so that rival claims become visible, and keeps the stage only if
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

from node.checkpoint import restore_runtime
from node.proto import stage_pb2 as pb
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
from node.train.optim import clip_coefficient
from node.wire.records import RecoveryRecord, StageState
from node.wire.tensors import TensorAssembler

if TYPE_CHECKING:
    from node.stage.daemon import StageDaemon

logger = logging.getLogger(__name__)


class StageTaken(RuntimeError):
    """The stage this node was to build turned out to be served by another peer: it waits as a spare."""


class Unrecoverable(RuntimeError):
    """The stage cannot be rebuilt with the chosen strategy; training cannot go on."""


async def claim_vacant_stage(d: StageDaemon) -> int:
    """Waits as a spare until a stage is vacant and this node wins the claim; returns the stage."""
    settle = d.opts.refresh_seconds  # a rival's claim is one DHT store away: visible within a refresh period
    poll = min(0.5, d.opts.refresh_seconds)
    while not d.stopping.is_set():
        try:
            await d.refresh_view()
            vacant = vacant_stages(
                d.swarm_view, fingerprint=d.fingerprint, num_stages=d.num_stages, suspects=d.suspected()
            )
        except Exception:  # no view this round: claim nothing on a stale one
            vacant = []
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
            await asyncio.wait_for(d.stopping.wait(), poll)
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
    claimed_at = time.monotonic()
    while not d.stopping.is_set():
        with contextlib.suppress(Exception):
            await d.refresh_view()
        others = [r for r in d.swarm_view if r.peer_id != d.peer_id]
        live = live_stages(others, fingerprint=d.fingerprint, num_stages=d.num_stages, suspects=d.suspected())
        committed = d.swarm_committed()
        replicas = {
            r.stage: r.replica_step
            for r in others
            if r.replica_step is not None and r.stage is not None and r.peer_id not in d.suspected()
        }
        plan = plan_recovery(d.stage, d.num_stages, live - {d.stage}, committed, d.opts.recovery, replicas)
        if plan.method == Method.UNRECOVERABLE:
            if await _served_by_another(d):
                raise StageTaken(f"stage {d.stage} is served by another peer after all")
            raise Unrecoverable(f"stage {d.stage} cannot be rebuilt: {plan.reason}")
        try:
            await _execute(d, plan, committed, claimed_at)
            return
        except ConnectionError as err:
            logger.warning("recovery of stage %d by %s failed (%s); re-planning", d.stage, plan.method, err)
            await asyncio.sleep(0.2)


async def _served_by_another(d: StageDaemon) -> bool:
    """Before calling a stage unrecoverable: is it served after all? A view taken just after start can miss
    records (a DHT lookup that found nothing yet), and a served stage's record shows up within one record
    lifetime (2 refresh periods), so a node never stops the swarm over a stage that is alive."""
    deadline = time.monotonic() + 3 * d.opts.refresh_seconds
    while not d.stopping.is_set():
        with contextlib.suppress(Exception):
            await d.refresh_view()
        others = [r for r in d.swarm_view if r.peer_id != d.peer_id]
        if d.stage in live_stages(others, fingerprint=d.fingerprint, num_stages=d.num_stages, suspects=d.suspected()):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(min(0.5, d.opts.refresh_seconds))
    return False


async def _execute(d: StageDaemon, plan: RecoveryPlan, committed: int, started: float) -> None:
    cfg, stage = d.config, d.stage
    assert stage is not None
    if plan.method == Method.FRESH:
        d.runtime = await d.compute(StageRuntime, cfg, stage, d.device)
        return
    t0 = time.monotonic()
    d.fetch_seconds = 0.0
    if plan.method == Method.CHECKPOINT:
        store = d.open_checkpoints()
        found = await asyncio.to_thread(store.latest_loadable)
        step = found[0].step if found is not None else 0
        d.runtime = await d.compute(restore_runtime, cfg, stage, d.device, found)
        d.fetch_seconds = time.monotonic() - t0
        if found is not None or committed > 0:  # not a plain first start
            nbytes = found[0].size if found is not None else 0
            _finish(d, plan, step, [], nbytes, t0, started, lr_scale=d.runtime.lr_scale)
        return
    if plan.method == Method.EMBEDDING_REPLICA:
        step, nbytes = await _rebuild_stage0(d, plan.sources[0])
        _finish(d, plan, step, [], nbytes, t0, started, lr_scale=1.0)
        if d.opts.save_dir is not None:
            await d.save_weights(d.opts.save_dir / f"stage{stage}.recovered-step{step}.safetensors")
        return
    fetched: list[tuple[int, float, dict[str, torch.Tensor]]] = []
    nbytes = 0
    for src in plan.sources:
        step, norm, weights, n = await fetch_committed(d, src)
        fetched.append((step, norm, weights))
        nbytes += n
    d.fetch_seconds = time.monotonic() - t0
    steps = {step for step, _, _ in fetched} | ({committed} if plan.method == Method.RANDOM else set())
    if len(steps) > 1:  # a commit was landing while we fetched: fetch again
        raise ConnectionError(f"sources disagree on the committed step {sorted(steps)}")
    step = steps.pop() if steps else committed
    await _check_not_behind_stage0(d, step)
    lr_scale = d.opts.lr_scale
    if plan.method == Method.CHECKFREE:
        (_, g_lo, w_lo), (_, g_hi, w_hi) = fetched
        weights = await d.compute(checkfree_average, w_lo, g_lo, w_hi, g_hi)
        norm = (g_lo + g_hi) / 2
    elif plan.method in (Method.COPY, Method.PARTNER_COPY):
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
    _finish(d, plan, step, [n for _, n, _ in fetched], nbytes, t0, started, lr_scale)
    if d.opts.save_dir is not None:  # what was built, for audit and tests
        await d.save_weights(d.opts.save_dir / f"stage{stage}.recovered-step{step}.safetensors")


def _finish(
    d: StageDaemon,
    plan: RecoveryPlan,
    step: int,
    norms: list[float],
    nbytes: int,
    t0: float,
    started: float,
    lr_scale: float,
) -> None:
    """Records a completed rebuild: DHT record, metrics, event, log."""
    rebuild_seconds = time.monotonic() - t0
    d.last_recovery = RecoveryRecord(
        method=plan.method.value, step=step, seconds=time.monotonic() - started, sources=[str(s) for s in plan.sources]
    )
    d.metrics.recoveries.labels(method=plan.method.value).inc()
    d.metrics.recovery_fetched_bytes.inc(nbytes)
    d.metrics.rebuild_seconds.observe(rebuild_seconds)
    d.metrics.recovery_seconds.observe(d.last_recovery.seconds)
    d.emit(
        {
            "event": "recovery",
            "stage": d.stage,
            "step": step,
            "method": plan.method.value,
            "sources": list(plan.sources),
            "source_grad_norms": norms,
            "bytes_fetched": nbytes,
            "rebuild_seconds": rebuild_seconds,
            "fetch_seconds": d.fetch_seconds,
            "lr_scale": lr_scale,
        }
    )
    logger.warning(
        "stage %d rebuilt at step %d by %s from %s (%d bytes, %.2fs)",
        d.stage,
        step,
        plan.method.value,
        list(plan.sources),
        nbytes,
        rebuild_seconds,
    )


async def _check_not_behind_stage0(d: StageDaemon, step: int) -> None:
    """A block stage rebuilt at ``step`` while stage 0 already committed the next step would miss that step:
    fetch again once the neighbours have it too."""
    peer = d.peer_of(0)
    if peer is None:
        return
    try:
        status = await d.channels.stub(peer.grpc_address).GetStatus(pb.StatusRequest(), timeout=d.opts.rpc_timeout)
    except grpc.aio.AioRpcError:
        return
    if status.committed_step > step:
        raise ConnectionError(f"sources are at step {step} but stage 0 committed {status.committed_step}")


async def _rebuild_stage0(d: StageDaemon, holder: int) -> tuple[int, int]:
    """checkfree+: stage 0 from the copy on ``holder`` (weights and AdamW state: exact when the copy is of
    the swarm's committed step). If stage 0 died between committing a step and telling every block stage,
    the copy carries its commit decision, and the new stage 0 finishes that commit first."""
    block = [
        r
        for r in d.swarm_view
        if r.stage not in (None, 0)
        and r.peer_id not in d.suspected()
        and r.config_fingerprint == d.fingerprint
        and r.state in (StageState.ONLINE, StageState.WAITING)
    ]
    if not block:
        raise ConnectionError("no live block stage")
    c_max = max(r.committed_step for r in block)
    peer = d.peer_of(holder)
    if peer is None:
        raise ConnectionError(f"replica holder stage {holder} is gone")
    asm = TensorAssembler(max_tensor_bytes=d.max_replica_bytes, max_stream_bytes=d.max_replica_bytes)
    nbytes = 0
    try:
        call = d.channels.stub(peer.grpc_address).FetchReplica(
            pb.FetchWeightsRequest(requester_stage=0, requester_peer=d.peer_id, step=c_max), timeout=d.opts.rpc_timeout
        )
        async for message in call:
            asm.feed(message)
            nbytes += len(message)
    except grpc.aio.AioRpcError as err:
        raise ConnectionError(f"fetching the stage-0 copy from stage {holder}: {err.code().name}") from None
    tensors = asm.finish()
    meta = asm.meta
    assert meta is not None
    runtime = await d.compute(lambda: StageRuntime(d.config, 0, d.device, committed_step=c_max))
    await d.compute(runtime.load_full_state, tensors)
    if meta.step != c_max:
        logger.warning(
            "stage-0 copy is of step %d, the swarm is at %d: embedding and head are %d step(s) stale "
            "(--embed-sync-every > 1)",
            meta.step,
            c_max,
            c_max - meta.step,
        )
    d.runtime = runtime
    lagging = [r.stage for r in block if r.committed_step == c_max - 1]
    if lagging:
        if meta.attempt == 0:
            raise ConnectionError(f"stages {lagging} missed the commit of step {c_max} and no decision is held")
        coef = clip_coefficient(meta.grad_norm, d.config.train.grad_clip)
        logger.warning("finishing the commit of step %d on stages %s", c_max, lagging)
        await asyncio.gather(*(d.commit_remote(s, c_max - 1, meta.attempt, meta.grad_norm, coef) for s in lagging))
    return c_max, nbytes


__all__ = ["StageTaken", "Unrecoverable", "build_stage_runtime", "claim_vacant_stage"]
