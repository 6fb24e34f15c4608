"""The commit coordinator against a fake peer RPC, and the pure commit decision (no network)."""

from __future__ import annotations

import asyncio
import math

import pytest

from node.events import EventLog, RollbackStartEvent, read_events
from node.stage.coordinator import CommitCoordinator, PeerError
from node.stage.runtime import StepFailed
from node.train.commit import decide_commit
from node.train.optim import clip_coefficient


class FakeStage:
    """One stage's state as the coordinator can change it."""

    def __init__(self, norm_sq: float = 1.0) -> None:
        self.norm_sq = norm_sq
        self.committed = 0
        self.aborted: list[tuple[int, int]] = []
        self.coefs: list[float] = []
        self.checkpoints: list[int] = []

    async def prepare(self, step: int, attempt: int) -> float:
        return self.norm_sq

    async def commit(self, step: int, attempt: int, clip_coef: float) -> int:
        if self.committed == step:
            self.committed, self.coefs = step + 1, [*self.coefs, clip_coef]
        return self.committed

    async def abort(self, step: int, attempt: int) -> None:
        self.aborted.append((step, attempt))

    @property
    def committed_step(self) -> int:
        return self.committed


class FakePeers:
    """PeerRPC over FakeStages, with scripted misbehaviour per stage and call."""

    def __init__(self, stages: dict[int, FakeStage]) -> None:
        self.stages = stages
        self.prepare_errors: dict[int, Exception] = {}
        self.commit_failures: dict[int, list[Exception]] = {}  # raised in order, then commits
        self.abort_errors: dict[int, Exception] = {}
        self.calls: list[tuple[str, int]] = []
        self.order: list[str] = []

    async def prepare(self, stage: int, step: int, attempt: int, peer: str = "", shares=None) -> float:
        self.calls.append(("prepare", stage))
        if stage in self.prepare_errors:
            raise self.prepare_errors[stage]
        return await self.stages[stage].prepare(step, attempt)

    async def commit(self, stage, step, attempt, global_norm, clip_coef, peer: str = "") -> tuple[int, str]:
        self.calls.append(("commit", stage))
        failures = self.commit_failures.get(stage, [])
        if failures:
            raise failures.pop(0)
        self.order.append(f"commit{stage}")
        return await self.stages[stage].commit(step, attempt, clip_coef), f"peer{stage}"

    async def abort(self, stage: int, step: int, attempt: int, peer: str = "") -> None:
        if stage in self.abort_errors:
            raise self.abort_errors[stage]
        await self.stages[stage].abort(step, attempt)

    async def rollback(self, stage: int, step: int, attempt: int) -> tuple[int, str]:
        self.stages[stage].committed = step
        return step, f"peer{stage}"

    async def checkpoint_steps(self, stage: int) -> list[int]:
        return self.stages[stage].checkpoints


class Local(FakeStage):
    def __init__(self, order: list[str], norm_sq: float = 1.0) -> None:
        super().__init__(norm_sq)
        self.order = order

    async def commit(self, step: int, attempt: int, clip_coef: float) -> int:
        self.order.append("commit0")
        return await super().commit(step, attempt, clip_coef)


def make(n: int = 4, tmp_path=None, **kwargs):
    stages = {s: FakeStage(float(s)) for s in range(1, n)}
    peers = FakePeers(stages)
    local = Local(peers.order, norm_sq=0.5)
    events = EventLog(None if tmp_path is None else tmp_path / "events.jsonl")
    coord = CommitCoordinator(n, peers, local, 1.0, events, asyncio.Event(), retry_seconds=0.0, **kwargs)
    return coord, peers, local, stages


async def test_commit_decides_from_every_stage_and_commits_stage0_first() -> None:
    coord, peers, local, stages = make()
    decision = await coord.prepare_all(0, 7)
    expected = math.sqrt(0.5 + 1 + 2 + 3)
    assert decision.commit and decision.global_norm == pytest.approx(expected)
    assert decision.clip_coef == clip_coefficient(expected, 1.0)
    seen: list[str] = []

    async def after_local() -> None:
        seen.append(f"after local, stage 0 at {local.committed}, others at {[s.committed for s in stages.values()]}")

    await coord.commit_all(0, 7, decision, after_local)
    assert peers.order[0] == "commit0" and seen == ["after local, stage 0 at 1, others at [0, 0, 0]"]
    assert all(s.committed == 1 and s.coefs == [decision.clip_coef] for s in stages.values())
    assert coord.in_sync == {1: "peer1", 2: "peer2", 3: "peer3"}


async def test_a_stage_that_refuses_prepare_fails_the_step_and_nothing_is_committed() -> None:
    coord, peers, local, stages = make()
    peers.prepare_errors[2] = PeerError(2, "incomplete_step", refused=True)
    with pytest.raises(StepFailed, match="stage 2 refused prepare"):
        await coord.prepare_all(0, 1)
    assert local.committed == 0 and all(s.committed == 0 for s in stages.values())


async def test_a_stage_that_never_answers_fails_the_step() -> None:
    coord, peers, _, _ = make()
    peers.prepare_errors[3] = StepFailed("no serving peer for stage 3")
    with pytest.raises(StepFailed, match="no serving peer for stage 3"):
        await coord.prepare_all(0, 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
async def test_a_non_finite_or_negative_norm_is_never_committed(bad: float) -> None:
    coord, _, _, stages = make()
    stages[1].norm_sq = bad
    with pytest.raises(StepFailed, match="squared gradient norm"):
        await coord.prepare_all(0, 1)


async def test_a_commit_that_times_out_is_retried_until_acknowledged() -> None:
    coord, peers, _, stages = make()
    peers.commit_failures[2] = [PeerError(2, "Commit: DEADLINE_EXCEEDED"), StepFailed("no serving peer for stage 2")]
    decision = await coord.prepare_all(0, 1)
    await coord.commit_all(0, 1, decision)
    assert [c for c in peers.calls if c == ("commit", 2)] == [("commit", 2)] * 3
    assert stages[2].committed == 1 and coord.in_sync[2] == "peer2"


async def test_a_refused_commit_is_final_only_under_the_checkpoint_strategy() -> None:
    coord, peers, _, stages = make(refused_commit_is_final=True)
    peers.commit_failures[1] = [PeerError(1, "Commit: stale_attempt", refused=True)]
    await coord.commit_all(0, 1, await coord.prepare_all(0, 1))
    assert stages[1].committed == 0 and 1 not in coord.in_sync  # stage 0 rolls the swarm back next
    assert stages[2].committed == 1


async def test_a_stale_commit_reply_is_not_counted_as_in_sync() -> None:
    coord, _, _, stages = make()
    stages[3].committed = 5  # e.g. a peer at another step: it does not apply step 0
    await coord.commit_all(0, 1, await coord.prepare_all(0, 1))
    assert 3 not in coord.in_sync and stages[3].committed == 5


async def test_commit_retries_stop_when_the_daemon_stops() -> None:
    coord, peers, _, _ = make()
    peers.commit_failures[1] = [PeerError(1, "UNAVAILABLE")] * 1000
    decision = await coord.prepare_all(0, 1)
    coord.stopping.set()
    await asyncio.wait_for(coord.commit_all(0, 1, decision), 5)


async def test_abort_reaches_every_answering_stage_and_ignores_the_rest() -> None:
    coord, peers, local, stages = make()
    peers.abort_errors[2] = PeerError(2, "UNAVAILABLE")
    await coord.abort_all(3, 9)
    assert local.aborted == [(3, 9)] and stages[1].aborted == [(3, 9)] and stages[3].aborted == [(3, 9)]
    assert stages[2].aborted == []


async def test_rollback_goes_to_the_newest_common_checkpoint(tmp_path) -> None:
    coord, _, local, stages = make(tmp_path=tmp_path)
    local.committed = 9
    stages[1].checkpoints, stages[2].checkpoints, stages[3].checkpoints = [3, 6, 9], [3, 6], [6, 9]

    class Keeper:
        durable_steps = frozenset({3, 6, 9})
        rolled: list[tuple[int, int]] = []

        async def rollback(self, step: int, attempt: int) -> int:
            self.rolled.append((step, attempt))
            return step

    keeper = Keeper()
    assert await coord.rollback_all(11, keeper) == 6
    assert keeper.rolled == [(6, 11)] and all(s.committed == 6 for s in stages.values())
    [start] = [e for e in read_events(tmp_path / "events.jsonl") if isinstance(e, RollbackStartEvent)]
    assert (start.step, start.from_step) == (6, 9)


def test_decision_needs_every_stage() -> None:
    assert not decide_commit({0: 1.0, 2: 1.0}, 3, 1.0).commit
    d = decide_commit({0: 1.0, 1: 4.0, 2: 4.0}, 3, 1.0)
    assert d.commit and d.global_norm == 3.0 and d.stage_norms == (1.0, 2.0, 2.0)
    assert d.clip_coef == min(1.0, 1.0 / (3.0 + 1e-6))
    assert decide_commit({0: 0.0, 1: 0.0}, 2, 1.0).clip_coef == 1.0
