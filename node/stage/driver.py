"""Stage 0's training driver: the data, the loop of steps (with aborts, replays and rollbacks) and
evaluation. Each step's commit goes through the :class:`~node.stage.coordinator.CommitCoordinator`.

Attempts only grow, across stage-0 incarnations too: a rebuilt stage 0 must outrank its predecessor's
attempts, which block stages still remember, so the driver starts from the wall clock in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from node.checkpoint.keeper import CheckpointKeeper
from node.config import SwarmConfig
from node.data import load_corpus_for, training_batch, validation_batches
from node.events import AbortEvent, AttemptEvent, DoneEvent, EvalEvent, EventLog, RolledBackEvent, StepEvent
from node.metrics import StageMetrics
from node.options import EvalOptions, RecoveryOptions, TimingOptions
from node.proto import stage_pb2 as pb
from node.recovery.stage0_copies import Stage0Copies
from node.stage.compute import Compute
from node.stage.coordinator import CommitCoordinator
from node.stage.participant import PipelineParticipant
from node.stage.presence import Presence
from node.stage.routing import Replica, StepRouting, plan_step
from node.stage.runtime import StageRuntime, StepError, StepFailed
from node.topology import route_for
from node.wire.records import StageState

logger = logging.getLogger(__name__)
GONE_POLL_SECONDS = 0.1  # how often a step in flight checks its peers against the view (no DHT read)
Batches = list[tuple[torch.Tensor, torch.Tensor]]


class Stage0Driver:
    """Drives every step of the swarm from stage 0 until ``steps`` are committed."""

    def __init__(
        self,
        config: SwarmConfig,
        compute: Compute,
        participant: PipelineParticipant,
        coordinator: CommitCoordinator,
        presence: Presence,
        copies: Stage0Copies,
        checkpoints: CheckpointKeeper | None,
        timing: TimingOptions,
        recovery: RecoveryOptions,
        evaluation: EvalOptions,
        metrics: StageMetrics,
        events: EventLog,
        stopping: asyncio.Event,
        leaving: asyncio.Event | None = None,
    ) -> None:
        self.config, self.compute, self.participant, self.coordinator = config, compute, participant, coordinator
        self.presence, self.copies, self.checkpoints = presence, copies, checkpoints
        self.timing, self.recovery, self.evaluation = timing, recovery, evaluation
        self.metrics, self.events, self.stopping = metrics, events, stopping
        self.leaving = leaving or asyncio.Event()  # preempted: finish the step in flight, start no other
        t = config.train
        self.tokens_per_step = t.microbatches_per_step * t.microbatch_size * t.seq_len
        self.routing: StepRouting | None = None  # the replica assignment of the attempt in flight
        self.prepare_seconds: float | None = None  # the last attempt's prepare round

    @property
    def runtime(self) -> StageRuntime:
        return self.participant.runtime

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    async def drive(self, steps: int) -> None:
        corpus = await self.compute.run(load_corpus_for, self.config)
        corpus.check_fits(self.config.train.seq_len)
        attempt = max(self.runtime.attempt, int(time.time() * 1000) * 1000)
        t, every = self.config.train, self.evaluation.every
        val = (
            validation_batches(corpus.val, num_batches=self.evaluation.batches, batch_size=t.microbatch_size,
                               seq_len=t.seq_len)
            if every
            else []
        )  # fmt: skip
        evaluated: int | None = None  # the committed step last evaluated (forgotten by a rollback)
        while not self.stopping.is_set() and not self.leaving.is_set():
            committed = self.runtime.committed_step
            eval_due = bool(every) and committed % every == 0 and committed != evaluated
            if committed >= steps and not eval_due:
                break
            diverged = await self.wait_for_swarm()
            if self.stopping.is_set():
                break
            if diverged:
                assert self.checkpoints is not None
                attempt += 1
                try:
                    target = await self.coordinator.rollback_all(attempt, self.checkpoints)
                except StepFailed as err:
                    logger.warning("rollback failed: %s; retrying", err)
                    await asyncio.sleep(min(1.0, self.timing.refresh_seconds))
                    continue
                evaluated = None
                self.events.emit(RolledBackEvent(step=target, attempt=attempt))
                continue
            if eval_due and self.runtime.committed_step == committed:
                if await self.evaluate(val) is not None:
                    evaluated = committed
                else:  # a stage was lost or refused: let the swarm settle before trying again
                    await asyncio.sleep(min(1.0, self.timing.refresh_seconds))
                continue  # the swarm may have changed meanwhile
            attempt += 1
            await self._step(corpus.train, attempt)
        if self.runtime.committed_step >= steps:
            self.events.emit(DoneEvent(step=self.runtime.committed_step))

    async def _step(self, tokens: torch.Tensor, attempt: int) -> None:
        """One attempt at the next step: committed (step event), or aborted everywhere to be replayed."""
        step = self.runtime.committed_step
        started = time.perf_counter()
        self.events.emit(AttemptEvent(step=step + 1, attempt=attempt))
        try:
            loss, decision = await self.train_step(tokens, step, attempt)
        except (StepFailed, StepError) as err:  # StepError: this stage refused, e.g. a stale attempt
            logger.warning("step %d attempt %d failed: %s; aborting and replaying", step, attempt, err)
            self.metrics.steps_aborted.inc()
            self.events.emit(AbortEvent(step=step, attempt=attempt, reason=str(err)))
            # joiners too: one that prepared (with an empty share) must not stay prepared for this attempt
            await self.coordinator.abort_all(step, attempt, self._shares(joiners=True))
            return
        seconds = time.perf_counter() - started
        self.metrics.loss.set(loss)
        self.metrics.tokens.inc(self.tokens_per_step)
        self.events.emit(
            StepEvent(
                step=step + 1,
                loss=loss,
                seconds=seconds,
                prepare_seconds=self.prepare_seconds,
                tokens=self.tokens_per_step,
                attempt=attempt,
                grad_norm=decision.global_norm,
                stage_grad_norms=list(decision.stage_norms),
                assignment=(self.routing.assignment() or None) if self.routing is not None else None,
            )
        )
        logger.info("step %d loss %.4f (%.2fs)", step + 1, loss, seconds)

    async def train_step(self, tokens: torch.Tensor, step: int, attempt: int):
        """Forward and backward of every microbatch through the pipeline, then the two-phase commit.
        Returns (mean loss, commit decision); raises :class:`StepFailed` before the commit decision."""
        rt, inflight = self.runtime, self.participant.inflight
        batch = training_batch(tokens, self.config.train, step)
        inflight.start({mb: y for mb, (_, y) in enumerate(batch)})
        await self.compute.run(rt.check_step, step, attempt)
        self.routing = routing = self.plan_routing(len(batch))
        for stage, shares in routing.shares.items():
            for peer, mbs in shares.items():
                self.metrics.microbatches_routed.labels(stage=str(stage), peer=peer).inc(len(mbs))
        for mb, (x, _) in enumerate(batch):
            h = await self.compute.run(rt.embed, mb, x)
            route = route_for(mb, self.num_stages, self.config.out_of_order)
            meta = pb.MicrobatchMeta(
                step=step, microbatch=mb, route=route, hop=0, sender_stage=0,
                sender_peer=self.presence.me.peer_id, attempt=attempt,
                route_peers=routing.route_peers(route, mb), prev_microbatch=routing.prev_microbatches(route, mb),
            )  # fmt: skip
            self.participant.push(meta, h, "Forward", 1)
        try:
            await self._wait_for_microbatches(inflight, routing)
        finally:
            inflight.cancel_rest()
        shares = self._shares(joiners=True)
        started = time.perf_counter()
        decision = await self.coordinator.prepare_all(step, attempt, shares)
        self.prepare_seconds = time.perf_counter() - started

        async def leave_copies() -> None:
            # checkfree+: the decision (and every K steps stage 0's new state) goes to stages 1 and S-1, so
            # that a rebuilt stage 0 can finish a commit it did not live to send
            with_state = (step + 1) % self.recovery.embed_sync_every == 0
            await self.copies.push(rt, step, attempt, decision.global_norm, with_state)

        after_local = leave_copies if self.config.out_of_order else None
        await self.coordinator.commit_all(step, attempt, decision, after_local, shares)
        return sum(inflight.losses.values()) / len(inflight.losses), decision

    async def _wait_for_microbatches(self, inflight, routing: StepRouting) -> None:
        """Until every microbatch is home (:class:`StepFailed` after the step timeout). A peer of the routing that
        leaves this node's view, or its stage, fails the step at once: its microbatches will not come back."""
        everything = asyncio.ensure_future(asyncio.gather(*inflight.pending.values()))
        deadline = time.monotonic() + self.timing.step_timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    futures = inflight.pending.values()
                    home = sum(f.done() and not f.cancelled() and f.exception() is None for f in futures)
                    raise StepFailed(
                        f"only {home} of {len(inflight.pending)} microbatches came back in {self.timing.step_timeout}s"
                    )
                done, _ = await asyncio.wait({everything}, timeout=min(left, GONE_POLL_SECONDS))
                if done:
                    everything.result()
                    return
                # gone: found dead, left its stage (a handover its successor completed, a replica that moved), or
                # (a replica of a replicated stage) its record expired over a record lifetime ago; a lone peer whose
                # record lapsed may only be slowed down: its heartbeats decide
                seen, replicated = {r.peer_id for r in self.presence.members_lately()}, routing.replicated()
                for stage, shares in routing.shares.items():
                    for peer, mbs in shares.items():
                        lapsed = stage in replicated and peer not in seen
                        if stage and mbs and (lapsed or self.presence.route_peer(peer, stage)[1]):
                            raise StepFailed(f"peer {peer} of stage {stage} left the swarm during the step")
        finally:
            everything.cancel()

    def plan_routing(self, num_microbatches: int) -> StepRouting:
        """This step's assignment of microbatches to the replicas of every stage at our committed step, by
        their measured throughput (:mod:`node.stage.routing`)."""
        committed, acked = self.runtime.committed_step, self.coordinator.acked
        replicas = {}
        for stage in range(1, self.num_stages):
            peers = [
                r
                for r in self.presence.replicas_of(stage)
                if r.committed_step == committed or r.peer_id in acked.get(stage, ())
            ]
            if not peers:  # in sync by its last acknowledged commit although its record lags behind
                peer = self.presence.peer_of(stage)
                peers = [peer] if peer is not None else []
            if not peers:
                raise StepFailed(f"no serving peer for stage {stage}")
            replicas[stage] = [Replica(r.peer_id, r.throughput) for r in peers]
        return plan_step(num_microbatches, self.presence.me.peer_id, replicas)

    def _shares(self, joiners: bool = False) -> dict[int, list[tuple[str, list[int]]]]:
        """The attempt's replica shares per stage; with ``joiners``, plus an empty share for every replica that
        reached our committed step since the step began (it joins at this commit without computing)."""
        if self.routing is None:
            return {}
        out = {s: list(shares.items()) for s, shares in self.routing.shares.items() if s != 0}
        if joiners:
            committed = self.runtime.committed_step
            for stage, group in out.items():
                known = {peer for peer, _ in group}
                group += [
                    (r.peer_id, []) for r in self.presence.replicas_of(stage, committed) if r.peer_id not in known
                ]
        return out

    async def wait_for_swarm(self) -> bool:
        """Blocks (state ``waiting``) until every stage has a serving peer at our committed step.

        The first check uses the cached view (refreshed every period; dead peers are already excluded by
        suspicion), so a healthy swarm pays no DHT lookup per step, unless a peer nudged this node since its
        last read (a stage handed over, served again); only a missing stage makes it poll.
        Under ``--recovery checkpoint`` it returns True as soon as every stage is served but some are at
        another step: the swarm must roll back."""
        announced_waiting, first = False, True
        while not self.stopping.is_set():
            if not first or self.presence.nudges.pending:  # a peer told us the swarm changed during the step
                await self.presence.try_refresh()
            first = False
            missing, elsewhere = [], []
            for s in range(1, self.num_stages):
                peer = self.presence.peer_of(s)
                # a peer that acknowledged our last commit is in step even if its DHT record lags behind
                in_sync = peer is not None and self.coordinator.in_sync.get(s) == peer.peer_id
                if peer is None:
                    missing.append(s)
                elif peer.committed_step != self.runtime.committed_step and not in_sync:
                    elsewhere.append(s)
            if self.checkpoints is not None and not missing and elsewhere:
                logger.warning("stage(s) %s are not at step %d: rolling back", elsewhere, self.runtime.committed_step)
                return True
            missing += elsewhere
            if not missing:
                if self.presence.state != StageState.ONLINE:  # (the periodic announce keeps the record alive)
                    self.presence.announce_soon(StageState.ONLINE)  # for others to read: the step need not wait
                return False
            if not announced_waiting:
                logger.info("waiting for stage(s) %s", missing)
                await self.presence.announce(StageState.WAITING)
                announced_waiting = True
            # a new owner nudges it
            await self.presence.nudges.pause(min(0.25, self.timing.refresh_seconds), self.stopping)
        return False

    async def evaluate(self, batches: Batches) -> float | None:
        """Validation loss of the committed weights over ``batches`` (None if a stage was lost)."""
        rt, inflight = self.runtime, self.participant.inflight
        step, started, losses = rt.committed_step, time.perf_counter(), []
        route = route_for(0, self.num_stages, self.config.out_of_order)  # the in-order model
        try:
            for x, y in batches:
                h = await self.compute.run(rt.eval_embed, x)
                fut = inflight.start_eval(y)
                meta = pb.MicrobatchMeta(
                    step=step, microbatch=0, route=route, hop=0, sender_stage=0,
                    sender_peer=self.presence.me.peer_id, attempt=rt.attempt, eval=True,
                )  # fmt: skip
                self.participant.push(meta, h, "Forward", 1)
                losses.append(await asyncio.wait_for(fut, self.timing.step_timeout))
        except (StepFailed, TimeoutError) as err:
            logger.warning("evaluation at step %d failed: %s", step, err)
            return None
        finally:
            inflight.finish_eval()
        val_loss, seconds = sum(losses) / len(losses), time.perf_counter() - started
        self.metrics.validation_loss.set(val_loss)
        self.events.emit(EvalEvent(step=step, val_loss=val_loss, seconds=seconds))
        logger.info("step %d validation loss %.4f (%.2fs)", step, val_loss, seconds)
        return val_loss
