"""The stage-0 driver with a real stage-0 runtime and a fake pipeline: steps, replays, evaluation, rollback."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from node.config import build_config
from node.events import (
    AbortEvent,
    AttemptEvent,
    DoneEvent,
    EvalEvent,
    EventLog,
    RolledBackEvent,
    StepEvent,
    read_events,
)
from node.metrics import StageMetrics
from node.options import EvalOptions, RecoveryOptions, TimingOptions
from node.stage.compute import Compute
from node.stage.driver import Stage0Driver
from node.stage.inflight import StepInFlight
from node.stage.runtime import StageRuntime, StepFailed
from node.stage.seat import Seat
from node.train.commit import CommitDecision
from node.wire.records import StageRecord

CFG = build_config(overrides={"num_stages": 3, "train": {"microbatches_per_step": 2, "microbatch_size": 2,
                                                         "seq_len": 8}})  # fmt: skip


class FakeParticipant:
    """Every pushed microbatch comes home at once (its backward done), or fails while ``failing``."""

    def __init__(self, seat: Seat) -> None:
        self.seat, self.inflight, self.failing = seat, StepInFlight(), 0
        self.pushed: list[tuple[int, int, bool]] = []

    @property
    def runtime(self) -> StageRuntime:
        return self.seat.runtime

    def push(self, meta, tensor, rpc, hop) -> None:
        self.pushed.append((meta.step, meta.attempt, meta.eval))
        if meta.eval:
            self.inflight.eval_future.set_result(1.5)
        elif self.failing:
            self.failing -= 1
            self.inflight.fail(StepFailed("stage 1 lost"), meta.microbatch)
        else:
            self.inflight.losses[meta.microbatch] = 2.0 + meta.microbatch
            self.inflight.resolve(meta.microbatch)


class FakeCoordinator:
    def __init__(self, seat: Seat) -> None:
        self.seat, self.in_sync, self.acked, self.log = seat, {}, {}, []

    async def prepare_all(self, step, attempt, shares=None) -> CommitDecision:
        self.log.append(("prepare", step, attempt))
        return CommitDecision(True, global_norm=2.0, clip_coef=0.5, stage_norms=(1.0, 1.0, 1.4))

    async def commit_all(self, step, attempt, decision, after_local=None, shares=None) -> None:
        self.log.append(("commit", step, attempt))
        self.seat.runtime.committed_step += 1  # what the real local commit does, minus AdamW
        self.in_sync = {1: "p1", 2: "p2"}

    async def abort_all(self, step, attempt, shares=None) -> None:
        self.log.append(("abort", step, attempt))

    async def rollback_all(self, attempt, checkpoints) -> int:
        self.log.append(("rollback", attempt))
        self.seat.runtime.committed_step = 1
        self.in_sync = {1: "p1", 2: "p2"}
        return 1


class FakePresence:
    def __init__(self, steps: dict[int, int]) -> None:
        self.me, self.steps, self.states = SimpleNamespace(peer_id="p0"), steps, []
        self.state = "joining"
        self.nudges = SimpleNamespace(pending=False, pause=self.pause)

    def peer_of(self, stage: int) -> StageRecord | None:
        return SimpleNamespace(peer_id=f"p{stage}", committed_step=self.steps[stage], throughput=None)

    def replicas_of(self, stage: int, committed_step: int | None = None) -> list[StageRecord]:
        return [self.peer_of(stage)]

    async def try_refresh(self, max_age: float = 0.0) -> None:
        return None

    async def announce(self, state=None) -> None:
        self.states.append(state)
        self.state = state or self.state

    def announce_soon(self, state) -> None:
        self.states.append(state)
        self.state = state

    async def pause(self, seconds: float, stopping=None) -> None:
        await asyncio.sleep(seconds)


def make(tmp_path, steps_of: dict[int, int] | None = None, checkpoints=None, every: int = 0):
    seat = Seat(0, StageRuntime(CFG, 0, torch.device("cpu")))
    participant, coordinator = FakeParticipant(seat), FakeCoordinator(seat)
    presence = FakePresence(steps_of or {1: 0, 2: 0})
    coordinator.in_sync = {1: "p1", 2: "p2"}  # the peers acknowledged every commit
    driver = Stage0Driver(
        CFG, Compute(), participant, coordinator, presence, None, checkpoints, TimingOptions(refresh_seconds=0.01),
        RecoveryOptions(), EvalOptions(every=every, batches=1), StageMetrics(), EventLog(tmp_path / "events.jsonl"),
        asyncio.Event(),
    )  # fmt: skip
    return driver, participant, coordinator, presence


async def test_steps_are_committed_until_done_with_their_events(tmp_path) -> None:
    driver, _, coord, _ = make(tmp_path)
    await driver.drive(3)
    events = read_events(tmp_path / "events.jsonl")
    steps = [e for e in events if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [1, 2, 3] and steps[0].loss == 2.5 and steps[0].grad_norm == 2.0
    assert steps[0].stage_grad_norms == [1.0, 1.0, 1.4] and steps[0].tokens == 2 * 2 * 8
    assert all(0 <= e.prepare_seconds <= e.seconds for e in steps)  # the prepare round is part of the step
    assert next(e for e in events if isinstance(e, DoneEvent)).step == 3
    attempts = [e.attempt for e in events if isinstance(e, AttemptEvent)]
    assert attempts == sorted(set(attempts)) and attempts[0] > 1_000_000  # only grow, from the wall clock
    assert [c[0] for c in coord.log] == ["prepare", "commit"] * 3


async def test_a_failed_step_is_aborted_and_replayed_with_a_higher_attempt(tmp_path) -> None:
    driver, participant, coord, _ = make(tmp_path)
    participant.failing = 1
    await driver.drive(1)
    events = read_events(tmp_path / "events.jsonl")
    [abort] = [e for e in events if isinstance(e, AbortEvent)]
    [step] = [e for e in events if isinstance(e, StepEvent)]
    assert abort.step == 0 and "stage 1 lost" in abort.reason and step.attempt == abort.attempt + 1
    assert ("abort", 0, abort.attempt) in coord.log


async def test_evaluation_every_e_steps_on_the_committed_weights(tmp_path) -> None:
    driver, participant, _, _ = make(tmp_path, every=2)
    await driver.drive(4)
    evals = [e for e in read_events(tmp_path / "events.jsonl") if isinstance(e, EvalEvent)]
    assert [(e.step, e.val_loss) for e in evals] == [(0, 1.5), (2, 1.5), (4, 1.5)]
    assert sum(1 for *_, is_eval in participant.pushed if is_eval) == 3


async def test_under_checkpoints_a_stage_at_another_step_makes_the_swarm_roll_back(tmp_path) -> None:
    driver, _, coord, _presence = make(tmp_path, steps_of={1: 3, 2: 1}, checkpoints=object())
    driver.runtime.committed_step = 3
    coord.in_sync = {}
    await asyncio.wait_for(driver.drive(4), 10)
    events = read_events(tmp_path / "events.jsonl")
    assert [e.step for e in events if isinstance(e, RolledBackEvent)] == [1]
    assert [e.step for e in events if isinstance(e, StepEvent)][:1] == [2]


@pytest.mark.parametrize("missing", [1, 2])
async def test_the_driver_waits_while_a_stage_has_no_serving_peer(tmp_path, missing: int) -> None:
    driver, _, coord, presence = make(tmp_path)
    real = presence.peer_of
    presence.peer_of = lambda s: None if s == missing else real(s)
    task = asyncio.create_task(driver.drive(1))
    await asyncio.sleep(0.2)
    assert coord.log == [] and "waiting" in presence.states
    presence.peer_of = real
    await asyncio.wait_for(task, 10)
    assert [c[0] for c in coord.log] == ["prepare", "commit"]


async def test_a_step_error_on_stage0_itself_is_a_failed_step_not_an_exit(tmp_path) -> None:
    driver, _, coord, _ = make(tmp_path)
    commit = coord.commit_all

    async def forged_abort_lands(step, attempt, decision, after_local=None, shares=None) -> None:
        await commit(step, attempt, decision, after_local)
        driver.runtime.attempt = 2**63  # e.g. a forged Abort raised stage 0's attempt past the driver's

    coord.commit_all = forged_abort_lands
    task = asyncio.create_task(driver.drive(3))
    await asyncio.sleep(0.3)
    assert not task.done()  # it keeps aborting and replaying; the daemon does not exit
    aborts = [e for e in read_events(tmp_path / "events.jsonl") if isinstance(e, AbortEvent)]
    assert aborts and "superseded" in aborts[0].reason and ("abort", 1, aborts[0].attempt) in coord.log
    driver.stopping.set()
    await asyncio.wait_for(task, 5)


async def test_routing_leaves_out_a_replica_of_another_configuration_or_behind_the_committed_step(tmp_path) -> None:
    from node.stage.compute import BlockingIO
    from node.stage.presence import NodeIdentity, Presence
    from tests.unit.test_presence import FakeChannels, FakeDirectory, rec

    driver, participant, _, _ = make(tmp_path)
    participant.seat.runtime.committed_step = 5
    records = [
        rec(0, "p0"), rec(1, "b"), rec(1, "b-foreign", fp="other"), rec(1, "b-stale", step=4),
        rec(2, "c"), rec(2, "c2"),
    ]  # fmt: skip
    me = NodeIdentity(peer_id="p0", fingerprint="fp", num_stages=4, out_of_order=False, grpc_address="127.0.0.1:9")
    presence = Presence(
        FakeDirectory(records), BlockingIO(), participant.seat, me, TimingOptions(refresh_seconds=0.05),
        FakeChannels(), StageMetrics(), EventLog(tmp_path / "p.jsonl"),
    )  # fmt: skip
    await presence.refresh()
    driver.presence = presence
    try:
        routing = driver.plan_routing(4)
        assert sorted(routing.shares[1]) == ["b"]  # another fingerprint, or a step behind: not used
        assert sorted(routing.shares[2]) == ["c", "c2"]
        assert sorted(mb for mbs in routing.shares[2].values() for mb in mbs) == [0, 1, 2, 3]
        driver.coordinator.acked = {1: {"b-stale"}}  # it acknowledged the last commit: its record only lags
        assert sorted(driver.plan_routing(4).shares[1]) == ["b", "b-stale"]
    finally:
        presence.close()
