"""Stage 0's side of the two-phase commit: prepare-all, commit-all, abort-all and rollback-all.

The coordinator talks to the other stages through a small peer-RPC interface (:class:`PeerRPC`; over gRPC
in :mod:`node.stage.peers`, faked in the unit tests) and to its own stage through :class:`LocalStage`.
The decision itself is the pure :func:`~node.train.commit.decide_commit`. The order of a commit matters
for recovery and is written only here:

1. every stage prepares (its squared gradient norm before clipping); any refusal, timeout, missing
   answer or non-finite norm fails the step, which is then aborted everywhere and replayed;
2. stage 0 commits locally first (a replacement compares its sources against stage 0's committed step);
3. ``after_local`` runs (checkfree+: the decision and stage 0's state go to its copy holders);
4. every other stage commits; Commit is idempotent and retried until acknowledged, so a decided step is
   applied on every stage or, if stage 0 dies first, finished by the stage that rebuilds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from node.checkpoint.store import rollback_target
from node.events import EventLog, RollbackStartEvent
from node.stage.runtime import StepError, StepFailed
from node.train.commit import CommitDecision, decide_commit

logger = logging.getLogger(__name__)


class PeerError(Exception):
    """A stage did not do what was asked. ``refused``: it answered and said no (e.g. FAILED_PRECONDITION),
    as opposed to not answering at all."""

    def __init__(self, stage: int, message: str, refused: bool = False) -> None:
        super().__init__(f"stage {stage}: {message}")
        self.stage, self.refused = stage, refused


Shares = list[tuple[str, list[int]]]  # one stage's replicas in a step: (peer id, its microbatches)


class PeerRPC(Protocol):
    """The control calls stage 0 makes to the other stages. Each raises :class:`PeerError` or
    :class:`StepFailed` (no serving peer), and returns the id of the peer that answered where it matters.
    ``peer`` addresses one replica of the stage (empty: the stage's serving peer)."""

    async def prepare(
        self, stage: int, step: int, attempt: int, peer: str = "", shares: Shares | None = None
    ) -> float: ...

    async def commit(
        self, stage: int, step: int, attempt: int, global_norm: float, clip_coef: float, peer: str = ""
    ) -> tuple[int, str]:
        """Returns (the stage's committed step, the answering peer)."""
        ...

    async def abort(self, stage: int, step: int, attempt: int, peer: str = "") -> None: ...

    async def rollback(self, stage: int, step: int, attempt: int) -> tuple[int, str]: ...

    async def checkpoint_steps(self, stage: int) -> list[int]: ...


class LocalStage(Protocol):
    """Stage 0's own stage (the participant and, under ``--recovery checkpoint``, the checkpoint keeper)."""

    async def prepare(self, step: int, attempt: int) -> float: ...

    async def commit(self, step: int, attempt: int, clip_coef: float) -> int: ...

    async def abort(self, step: int, attempt: int) -> None: ...

    @property
    def committed_step(self) -> int: ...


class Checkpoints(Protocol):
    """Stage 0's own checkpoints (:class:`node.checkpoint.keeper.CheckpointKeeper`)."""

    durable_steps: frozenset[int]

    async def rollback(self, step: int, attempt: int) -> int: ...


class CommitCoordinator:
    """Runs the two-phase commit of each step, and aborts and rollbacks, across all stages."""

    def __init__(
        self,
        num_stages: int,
        peers: PeerRPC,
        local: LocalStage,
        grad_clip: float,
        events: EventLog,
        stopping: asyncio.Event,
        *,
        refused_commit_is_final: bool = False,
        retry_seconds: float = 0.5,
    ) -> None:
        self.num_stages, self.peers, self.local, self.grad_clip = num_stages, peers, local, grad_clip
        self.events, self.stopping = events, stopping
        # --recovery checkpoint: a stage restored from a checkpoint refuses the commit of a step it never
        # saw; the swarm then rolls back before the next step instead of retrying forever
        self.refused_commit_is_final = refused_commit_is_final
        self.retry_seconds = retry_seconds
        self.in_sync: dict[int, str] = {}  # stage -> peer that acknowledged the last commit (or rollback)
        self.acked: dict[int, set[str]] = {}  # stage -> every replica that acknowledged the last commit

    @property
    def others(self) -> range:
        return range(1, self.num_stages)

    async def prepare_all(self, step: int, attempt: int, shares: Mapping[int, Shares] | None = None) -> CommitDecision:
        """Phase 1 on every stage (on every replica of a stage, given its ``shares``); the decision, or
        :class:`StepFailed` when it is not to commit. Replicas of a stage must report the same norm."""
        shares = shares or {}

        async def stage_norm(stage: int) -> float:
            group = shares.get(stage, [])
            if len(group) <= 1:
                return await self.peers.prepare(stage, step, attempt, group[0][0] if group else "")
            norms = await asyncio.gather(*(self.peers.prepare(stage, step, attempt, p, group) for p, _ in group))
            if len(set(norms)) != 1:
                raise PeerError(stage, f"replicas disagree on the gradient norm: {norms}")
            return norms[0]

        answers = await asyncio.gather(
            self.local.prepare(step, attempt), *(stage_norm(s) for s in self.others), return_exceptions=True
        )
        decision = decide_commit(dict(enumerate(answers)), self.num_stages, self.grad_clip)
        if not decision.commit:
            raise StepFailed(f"prepare failed: {decision.reason}")
        return decision

    async def commit_all(
        self,
        step: int,
        attempt: int,
        decision: CommitDecision,
        after_local: Callable[[], Awaitable[None]] | None = None,
        shares: Mapping[int, Shares] | None = None,
    ) -> None:
        """Phase 2: stage 0 first, then ``after_local``, then every other stage (each replica of a stage in
        ``shares``), retried until it answers."""
        await self.local.commit(step, attempt, decision.clip_coef)
        self.acked = {}
        if after_local is not None:
            await after_local()
        g, c = decision.global_norm, decision.clip_coef
        await asyncio.gather(
            *(
                self.commit_remote(s, step, attempt, g, c, peer)
                for s in self.others
                for peer in ([p for p, _ in (shares or {}).get(s, [])] or [""])
            )
        )

    async def commit_remote(
        self, stage: int, step: int, attempt: int, global_norm: float, clip_coef: float, peer: str = ""
    ) -> None:
        """Commits a decided step on ``stage`` (on its replica ``peer``), retrying until it is acknowledged
        (or refused for good). A replica that is gone leaves the commit to whoever serves the stage then (a
        replica that committed acknowledges again; a rebuilt stage starts after the step)."""
        while not self.stopping.is_set():
            try:
                committed, answered = await self.peers.commit(stage, step, attempt, global_norm, clip_coef, peer)
            except (PeerError, StepFailed) as err:
                if self.refused_commit_is_final and isinstance(err, PeerError) and err.refused:
                    logger.warning("stage %d cannot take the commit of step %d: %s", stage, step, err)
                    return
                if peer and "is gone" in str(err):
                    peer = ""
                    continue
                logger.warning("commit of step %d on stage %d not acknowledged (%s); retrying", step, stage, err)
                await asyncio.sleep(self.retry_seconds)
                continue
            if committed == step + 1:
                self.in_sync[stage] = answered
                self.acked.setdefault(stage, set()).add(answered)
            else:
                logger.error("stage %d reports committed step %d after committing %d", stage, committed, step)
            return

    async def abort_all(self, step: int, attempt: int, shares: Mapping[int, Shares] | None = None) -> None:
        """Discards the attempt everywhere, on every replica in ``shares`` too (best effort: a stage that
        misses it refuses the old attempt later)."""
        await self.local.abort(step, attempt)

        async def one(stage: int, peer: str) -> None:
            try:
                await self.peers.abort(stage, step, attempt, peer)
            except (PeerError, StepFailed) as err:
                logger.debug("abort of step %d attempt %d not delivered: %s", step, attempt, err)

        await asyncio.gather(
            *(one(s, p) for s in self.others for p in ([p for p, _ in (shares or {}).get(s, [])] or [""]))
        )

    async def rollback_all(self, attempt: int, checkpoints: Checkpoints) -> int:
        """Every stage back to the newest checkpoint they all have (0: the seed's weights); returns it.

        The other stages roll back first, then stage 0. Rollback is idempotent, so one interrupted by
        another failure converges on the next try."""
        try:
            remote = await asyncio.gather(*(self.peers.checkpoint_steps(s) for s in self.others))
        except (PeerError, StepFailed) as err:
            raise StepFailed(f"cannot read the stages' checkpoints: {err}") from None
        durable = {0: checkpoints.durable_steps} | dict(zip(self.others, remote, strict=True))
        target = rollback_target(durable, self.num_stages)
        self.events.emit(RollbackStartEvent(step=target, from_step=self.local.committed_step))
        self.in_sync.clear()

        async def one(stage: int) -> None:
            try:
                rolled, peer = await self.peers.rollback(stage, target, attempt)
            except PeerError as err:
                raise StepFailed(f"stage {stage} did not roll back: {err}") from None
            self.in_sync[stage] = peer
            if rolled != target:
                raise StepFailed(f"stage {stage} rolled back to {rolled}, not {target}")

        await asyncio.gather(*(one(s) for s in self.others))
        try:
            await checkpoints.rollback(target, attempt)
        except StepError as err:
            raise StepFailed(str(err)) from None
        return target
