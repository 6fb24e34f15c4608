"""Recovery as plug-ins: the pure rebuild spec, the builder's dispatch and re-planning, the stage-0 copy store
and the checkpoint keeper (no network; real runtimes on the CPU)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from node.checkpoint.keeper import CheckpointKeeper
from node.config import build_config
from node.events import EventLog, RecoveryEvent, RollbackEvent, read_events
from node.metrics import StageMetrics
from node.options import RecoveryStrategy, TimingOptions
from node.proto import stage_pb2 as pb
from node.recovery.handoff import check_handoff
from node.recovery.methods import Recovered, RecoveryContext, SourceLost
from node.recovery.planner import Method, RecoveryPlan
from node.recovery.rebuild import (
    BadSource,
    Fetched,
    SourcesDisagree,
    build_runtime,
    check_source,
    checkfree_average,
    expected_state,
    rebuild_spec,
    state_bytes,
)
from node.recovery.replacement import StageBuilder, Unrecoverable
from node.recovery.stage0_copies import Stage0Copies
from node.stage.compute import Compute
from node.stage.runtime import StageRuntime
from node.stage.seat import Seat
from node.wire.records import StageRecord

CFG = build_config(overrides={"num_stages": 4, "train": {"microbatches_per_step": 2, "microbatch_size": 2,
                                                         "seq_len": 16}})  # fmt: skip
DEV = torch.device("cpu")


def weights(stage: int, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in StageRuntime(CFG, stage, DEV).committed_state().items()}


# ---- the pure rebuild spec ------------------------------------------------------------------------
def test_checkfree_spec_is_the_norm_weighted_average_with_a_fresh_optimizer() -> None:
    plan = RecoveryPlan(2, Method.CHECKFREE, (1, 3), "")
    lo, hi = Fetched(1, 7, 1.0, weights(1, 0.0)), Fetched(3, 7, 3.0, weights(3, 4.0))
    spec = rebuild_spec(plan, [lo, hi], committed=7, lr_scale=1.1, random_seed=5)
    assert (spec.committed_step, spec.grad_norm, spec.lr_scale, spec.random_seed) == (7, 2.0, 1.1, None)
    expected = checkfree_average(lo.weights, 1.0, hi.weights, 3.0)
    assert all(torch.equal(spec.weights[k], v) for k, v in expected.items())
    rt = build_runtime(CFG, 2, DEV, spec)
    assert rt.committed_step == 7 and rt.optimizer.param_groups[0]["lr"] == pytest.approx(CFG.train.lr * 1.1)


def test_copy_random_and_disagreeing_sources() -> None:
    src = Fetched(1, 4, 0.5, weights(1, 1.5))
    copy = rebuild_spec(RecoveryPlan(2, Method.COPY, (1,), ""), [src], 4, 1.1, 0)
    assert copy.weights is src.weights and copy.grad_norm == 0.5
    rnd = rebuild_spec(RecoveryPlan(2, Method.RANDOM, (), ""), [], 9, 1.1, 123)
    assert (rnd.weights, rnd.committed_step, rnd.random_seed) == (None, 9, 123)
    with pytest.raises(SourcesDisagree):
        rebuild_spec(RecoveryPlan(2, Method.CHECKFREE, (1, 3), ""), [src, Fetched(3, 5, 1.0, weights(3, 0))], 5, 1, 0)


# ---- the builder ----------------------------------------------------------------------------------
def record(stage: int, peer: str, step: int, replica_step: int | None = None) -> StageRecord:
    return StageRecord(
        stage=stage, num_stages=4, peer_id=peer, grpc_address="127.0.0.1:1", state="online", committed_step=step,
        config_fingerprint="fp", version="0", replica_step=replica_step,
    )  # fmt: skip


class FakePresence:
    def __init__(self, records: list[StageRecord]) -> None:
        self.records = records
        self.me = SimpleNamespace(fingerprint="fp", num_stages=4, peer_id="me")
        self.timing = TimingOptions(refresh_seconds=0.02)

    async def try_refresh(self, max_age: float = 0.0) -> None:
        return None

    def members(self, states=None) -> list[StageRecord]:
        return self.records

    def swarm_committed(self) -> int:
        return max((r.committed_step for r in self.records), default=0)

    def committed_known(self) -> int:
        return self.swarm_committed()


class ScriptedMethod:
    """A plug-in that fails ``failures`` times with SourceLost, then builds a runtime."""

    methods = frozenset({Method.CHECKFREE, Method.COPY})

    def __init__(self, failures: int) -> None:
        self.failures, self.plans = failures, []

    async def recover(self, plan, ctx, committed) -> Recovered:
        self.plans.append(plan)
        if len(self.plans) <= self.failures:
            raise SourceLost("source died mid-fetch")
        return Recovered(StageRuntime(CFG, ctx.stage, DEV, committed_step=committed), committed, 1.1, [1.0, 2.0], 99)


def builder(stage: int, records, methods, tmp_path, strategy=RecoveryStrategy.CHECKFREE):
    seat = Seat(stage)
    ctx = RecoveryContext(stage, CFG, DEV, Compute(), FakePresence(records), None, TimingOptions(), None)
    events = EventLog(tmp_path / "events.jsonl")
    return StageBuilder(ctx, seat, strategy, methods, StageMetrics(), events, asyncio.Event()), seat


async def test_a_fresh_swarm_builds_the_seed_weights_without_a_recovery(tmp_path) -> None:
    b, seat = builder(2, [record(1, "p1", 0), record(3, "p3", 0)], [ScriptedMethod(0)], tmp_path)
    assert await b.build() is None
    assert seat.runtime.committed_step == 0 and seat.last_recovery is None


async def test_the_plan_goes_to_its_plug_in_and_a_lost_source_makes_it_plan_again(tmp_path) -> None:
    method = ScriptedMethod(failures=1)
    b, seat = builder(2, [record(0, "p0", 8), record(1, "p1", 8), record(3, "p3", 8)], [method], tmp_path)
    recovered = await b.build()
    assert [p.method for p in method.plans] == [Method.CHECKFREE, Method.CHECKFREE]
    assert recovered.step == 8 and seat.runtime is recovered.runtime
    assert (seat.last_recovery.method, seat.last_recovery.sources) == ("checkfree", ["1", "3"])
    [event] = [e for e in read_events(tmp_path / "events.jsonl") if isinstance(e, RecoveryEvent)]
    assert (event.stage, event.method, event.sources, event.bytes_fetched) == (2, "checkfree", [1, 3], 99)


async def test_a_lossy_rebuild_is_dropped_when_an_exact_state_shows_up_before_it_is_installed(tmp_path) -> None:
    class LateView(FakePresence):  # the parked state's record arrives after the first plan (a slow DHT)
        reads = 0

        async def try_refresh(self, max_age: float = 0.0) -> None:
            self.reads += 1
            if self.reads == 2:
                self.records[1] = self.records[1].model_copy(update={"parked_stage": 2, "parked_step": 8})

    method = ScriptedMethod(failures=0)
    method.methods = frozenset({Method.CHECKFREE, Method.HANDOFF})
    b, seat = builder(2, [record(0, "p0", 8), record(1, "p1", 8), record(3, "p3", 8)], [method], tmp_path)
    b.ctx.presence = LateView(b.ctx.presence.records)
    recovered = await b.build()
    assert [p.method for p in method.plans] == [Method.CHECKFREE, Method.HANDOFF]  # the average is never installed
    assert seat.runtime is recovered.runtime and seat.last_recovery.method == "handoff"


async def test_stage0_under_plain_checkfree_is_unrecoverable(tmp_path, monkeypatch) -> None:
    # the verdict waits this long for the stage to show up served after all (15 s in production)
    monkeypatch.setattr("node.recovery.replacement.UNRECOVERABLE_PATIENCE_SECONDS", 0.5)
    b, _ = builder(0, [record(1, "p1", 8), record(2, "p2", 8), record(3, "p3", 8)], [ScriptedMethod(0)], tmp_path)
    with pytest.raises(Unrecoverable, match="stage 0 cannot be rebuilt"):
        await b.build()


async def test_a_plan_without_a_plug_in_is_refused(tmp_path) -> None:
    b, _ = builder(2, [record(0, "p0", 3), record(1, "p1", 3)], [], tmp_path, RecoveryStrategy.RANDOM)
    with pytest.raises(Unrecoverable, match="no recovery method"):
        await b.build()


# ---- stage-0 copies -------------------------------------------------------------------------------
def test_holders_keep_three_decisions_and_the_two_newest_full_copies() -> None:
    cfg = build_config(overrides={"num_stages": 7, "out_of_order": True})
    copies = Stage0Copies(cfg, None, None, None, TimingOptions(), StageMetrics(), None)
    assert copies.holds_copies(1) and copies.holds_copies(6) and not copies.holds_copies(2)
    full = {"w.x": torch.ones(2)}
    for step in range(10):
        copies.store(pb.MicrobatchMeta(step=step, attempt=100 + step, grad_norm=step), full if step % 4 == 0 else {})
    assert copies.full_steps() == [5, 9] and copies.replica_step == 9
    assert sorted(copies.held) == [5, 8, 9, 10]
    meta, tensors = copies.copy_for(10)  # the newest full copy, with the decision of step 10
    assert (meta.step, meta.attempt, meta.grad_norm) == (9, 109, 9.0) and tensors is full
    assert copies.copy_for(4) is None


# ---- the checkpoint keeper ------------------------------------------------------------------------
async def _train_and_checkpoint(keeper: CheckpointKeeper, rt: StageRuntime, steps: int) -> dict[int, dict]:
    """Commits ``steps`` steps (each adds 1 to every weight), each followed by the keeper's after-commit and
    its write; returns the committed state of every step."""
    saved = {}
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in rt.module.parameters():
                p.add_(1.0)
        rt.committed_step = step
        saved[step] = {k: v.clone() for k, v in rt.committed_state().items()}
        keeper.after_commit(step)
        await keeper._settle()
    return saved


async def test_checkpoints_after_every_k_commits_then_rollback_and_restore(tmp_path) -> None:
    seat, compute, installed = Seat(1), Compute(), []
    seat.runtime = StageRuntime(CFG, 1, DEV)

    async def install(rt: StageRuntime) -> None:
        installed.append(rt.committed_step)
        seat.runtime = rt

    events = EventLog(tmp_path / "events.jsonl")
    keeper = CheckpointKeeper(tmp_path / "ckpt", 2, seat, CFG, DEV, compute, install, StageMetrics(), events)
    keeper.open(1)
    saved = await _train_and_checkpoint(keeper, seat.runtime, 5)
    assert sorted(keeper.durable_steps) == [2, 4]
    assert await keeper.rollback(2, attempt=50) == 2
    assert installed == [2] and seat.runtime.attempt == 50 and sorted(keeper.durable_steps) == [2]
    assert all(torch.equal(seat.runtime.committed_state()[k], v) for k, v in saved[2].items())
    assert [(e.step, e.from_step) for e in read_events(tmp_path / "events.jsonl") if isinstance(e, RollbackEvent)] == [
        (2, 5)
    ]
    ctx = RecoveryContext(1, CFG, DEV, compute, None, None, TimingOptions(), None)
    recovered = await keeper.recover(RecoveryPlan(1, Method.CHECKPOINT, (), ""), ctx, committed=2)
    assert recovered.step == 2 and recovered.report and not recovered.audit
    await keeper.close()
    compute.close()


async def test_a_stage_taken_over_by_handoff_rolls_back_before_its_first_checkpoint(tmp_path) -> None:
    """The successor of a handoff has written no checkpoint yet and never restored one: a rollback (here to the
    seed's weights, as no stage had a checkpoint yet) still finds its stage's store instead of refusing with
    no_checkpoint, which left a live bench's swarm split between rolled-back stages and stage 0."""
    seat, compute = Seat(1), Compute()
    seat.runtime = StageRuntime(CFG, 1, DEV)
    installed: list[int] = []

    async def install(rt: StageRuntime) -> None:
        installed.append(rt.committed_step)
        seat.runtime = rt

    keeper = CheckpointKeeper(tmp_path / "ckpt", 10, seat, CFG, DEV, compute, install, StageMetrics(),
                              EventLog(tmp_path / "events.jsonl"))  # fmt: skip
    seat.runtime.committed_step = 5  # handed over at step 3, two commits since, no checkpoint of its own
    assert keeper.store is None
    assert await keeper.rollback(0, attempt=9) == 0 and installed == [0]
    assert keeper.store is not None and keeper.store.stage == 1
    await keeper.close()
    compute.close()


async def test_a_successor_reports_its_predecessors_checkpoints_once_it_holds_the_stage(tmp_path) -> None:
    """A node that took stage 1 over by a handoff reports the checkpoints its predecessor wrote as soon as it
    holds the stage, so that a rollback before its own first checkpoint goes to their common step, not to
    the seed's weights, and restores the predecessor's state of that step."""
    compute, events = Compute(), EventLog(tmp_path / "events.jsonl")
    old = Seat(1)
    old.runtime = StageRuntime(CFG, 1, DEV)

    async def no_install(rt: StageRuntime) -> None:
        raise AssertionError("the predecessor never rolls back here")

    predecessor = CheckpointKeeper(tmp_path / "ckpt", 2, old, CFG, DEV, compute, no_install, StageMetrics(), events)
    saved = await _train_and_checkpoint(predecessor, old.runtime, 4)
    await predecessor.close()

    seat = Seat(1)
    seat.runtime = StageRuntime(CFG, 1, DEV, committed_step=5)  # the handed-over state, one commit since

    async def install(rt: StageRuntime) -> None:
        seat.runtime = rt

    successor = CheckpointKeeper(tmp_path / "ckpt", 10, seat, CFG, DEV, compute, install, StageMetrics(), events)
    assert successor.durable_steps == frozenset()
    await successor.attach(1)
    assert successor.durable_steps == {2, 4}
    assert await successor.rollback(4, attempt=3) == 4
    assert all(torch.equal(seat.runtime.committed_state()[k], v) for k, v in saved[4].items())
    await successor.close()
    compute.close()


# ---- bad sources ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spoil",
    [
        lambda w: w.pop(next(iter(w))),  # a tensor missing
        lambda w: w.update({"extra.weight": torch.zeros(1)}),  # a tensor too many
        lambda w: w.update({k: torch.zeros(3) for k in list(w)[:1]}),  # wrong shape
        lambda w: w.update({k: v.double() for k, v in list(w.items())[:1]}),  # wrong dtype
        lambda w: w.update({k: torch.full_like(v, float("nan")) for k, v in list(w.items())[:1]}),  # NaN
    ],
)
def test_a_source_with_state_that_cannot_be_this_stage_is_refused(spoil) -> None:
    shapes = expected_state(CFG, 2)
    good = Fetched(1, 3, 0.5, weights(1, 0.1))
    check_source(good, shapes)
    bad = Fetched(1, 3, 0.5, dict(good.weights))
    spoil(bad.weights)
    with pytest.raises(BadSource):
        check_source(bad, shapes)


@pytest.mark.parametrize("norm", [float("nan"), float("inf"), -1.0])
def test_a_source_with_a_bad_gradient_norm_is_refused(norm: float) -> None:
    with pytest.raises(BadSource, match="gradient norm"):
        check_source(Fetched(1, 3, norm, weights(1, 0.1)), expected_state(CFG, 2))
    assert state_bytes(expected_state(CFG, 2)) == sum(t.numel() * 4 for t in weights(2, 0).values())


async def test_a_peer_that_sent_bad_state_is_never_asked_again(tmp_path) -> None:
    class Poisoned(ScriptedMethod):
        async def recover(self, plan, ctx, committed) -> Recovered:
            self.plans.append(plan)
            if 3 in plan.sources:
                raise SourceLost("stage 3 sent NaN", bad_peer="p3")
            return Recovered(StageRuntime(CFG, ctx.stage, DEV, committed_step=committed), committed, 1.1)

    method = Poisoned(0)
    b, _ = builder(2, [record(0, "p0", 8), record(1, "p1", 8), record(3, "p3", 8)], [method], tmp_path)
    await b.build()
    assert [(p.method, p.sources) for p in method.plans] == [(Method.CHECKFREE, (1, 3)), (Method.COPY, (1,))]
    assert b.ctx.distrusted == {"p3"}


def handed_over_state(stage: int) -> tuple[pb.MicrobatchMeta, dict[str, torch.Tensor], StageRuntime]:
    """What a leaving owner of ``stage`` sends, after two committed steps of its own."""
    rt = StageRuntime(CFG, stage, torch.device("cpu"), lr_scale=1.1, committed_step=7, last_grad_norm=0.5)
    for p in rt.module.parameters():
        p.grad = torch.full_like(p, 0.01)
    rt.optimizer.step()
    state = rt.full_state()
    state["meta.lr_scale"] = torch.tensor(rt.lr_scale, dtype=torch.float64)
    state["meta.last_grad_norm"] = torch.tensor(rt.last_grad_norm, dtype=torch.float64)
    return pb.MicrobatchMeta(step=7), state, rt


@pytest.mark.parametrize("stage", [0, 2])
def test_a_handed_over_state_rebuilds_the_stage_exactly(stage: int) -> None:
    meta, state, original = handed_over_state(stage)
    step, lr_scale, norm = check_handoff(meta, state, expected_state(CFG, stage), "owner")
    assert (step, lr_scale, norm) == (7, 1.1, 0.5)
    rebuilt = StageRuntime(CFG, stage, torch.device("cpu"), lr_scale=lr_scale, committed_step=step, last_grad_norm=norm)
    rebuilt.load_full_state({k: v for k, v in state.items() if not k.startswith("meta.")})
    for a, b in zip(original.module.parameters(), rebuilt.module.parameters(), strict=True):
        a.grad, b.grad = torch.full_like(a, 0.02), torch.full_like(b, 0.02)
    original.optimizer.step()
    rebuilt.optimizer.step()  # the next update is bit for bit the same: moments, step counts and lr carried over
    for a, b in zip(original.module.parameters(), rebuilt.module.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda m, s: (None, s),
        lambda m, s: (m, {k: v for k, v in s.items() if k != "meta.lr_scale"}),
        lambda m, s: (m, {**s, "meta.lr_scale": torch.tensor(-1.0, dtype=torch.float64)}),
        lambda m, s: (m, {**s, "meta.last_grad_norm": torch.tensor(float("nan"), dtype=torch.float64)}),
        lambda m, s: (m, {**s, "opt.0.exp_avg": torch.full_like(s["opt.0.exp_avg"], float("inf"))}),
        lambda m, s: (m, {**s, "extra": torch.zeros(1)}),
        lambda m, s: (m, {k: v for k, v in s.items() if not k.startswith("w.")}),
    ],
)
def test_a_handed_over_state_that_cannot_be_this_stage_is_refused(spoil) -> None:
    meta, state, _ = handed_over_state(2)
    meta, state = spoil(meta, state)
    with pytest.raises(BadSource):
        check_handoff(meta, state, expected_state(CFG, 2), "owner")
