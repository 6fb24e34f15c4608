"""Several peers per stage: the routing decision (pure), the fixed summation order of partial gradients, and
that replicas summing their shares reproduce the single-process reference given the same assignment."""

from __future__ import annotations

import pytest
import torch

from node.config import build_config
from node.data import training_batch
from node.proto import stage_pb2 as pb
from node.recovery.planner import Method, plan_recovery
from node.recovery.replica import behind
from node.stage.routing import Replica, assign_microbatches, canonical_shares, plan_step, previous_in_share
from node.stage.runtime import StageRuntime
from node.stage.service import replica_route_problem, shares_problem
from node.train.partials import combine_partials
from node.train.reference import train_reference

CFG = build_config(overrides={"num_stages": 3, "train": {"microbatches_per_step": 4, "microbatch_size": 2}})


def test_equal_replicas_get_interleaved_equal_shares() -> None:
    shares = assign_microbatches(4, [Replica("a", 2.0), Replica("b", 2.0)])
    assert shares == {"a": [0, 2], "b": [1, 3]}
    assert previous_in_share(shares) == {0: -1, 2: 0, 1: -1, 3: 1}
    assert canonical_shares(shares) == [("a", [0, 2]), ("b", [1, 3])]


def test_a_replica_twice_as_slow_gets_a_third() -> None:
    shares = assign_microbatches(12, [Replica("fast", 10.0), Replica("slow", 5.0)])
    assert (len(shares["fast"]), len(shares["slow"])) == (8, 4)
    # an unmeasured newcomer counts as the stage's average; an only replica takes everything
    new = assign_microbatches(6, [Replica("old", 3.0), Replica("new", None)])
    assert (len(new["old"]), len(new["new"])) == (3, 3)
    assert assign_microbatches(3, [Replica("x", None)]) == {"x": [0, 1, 2]}
    with pytest.raises(ValueError):
        assign_microbatches(3, [])


def test_the_step_plan_is_deterministic_and_names_a_peer_per_hop() -> None:
    replicas = {1: [Replica("b", 1.0), Replica("a", 1.0)], 2: [Replica("c", None)]}
    plan = plan_step(4, "s0", replicas)
    assert plan == plan_step(4, "s0", {1: list(reversed(replicas[1])), 2: replicas[2]})
    assert plan.route_peers([0, 1, 2, 0], 1) == ["s0", "b", "c", "s0"]
    assert plan.prev_microbatches([0, 1, 2, 0], 3) == [2, 1, 2, 2]
    assert plan.assignment() == {"1": [[0, 2], [1, 3]]}


def test_partials_are_summed_in_the_order_of_their_first_microbatch() -> None:
    a, b, c = (torch.tensor([1.0]), torch.tensor([1e8]), torch.tensor([-1e8]))
    # (a + b) + c != a + (b + c) in float32: the order is fixed by first microbatch, not by arrival
    total = combine_partials([(2, {"w": c}), (0, {"w": a}), (1, {"w": b})])["w"]
    assert torch.equal(total, (a + b) + c) and not torch.equal(total, a + (b + c))
    with pytest.raises(ValueError):
        combine_partials([(0, {"w": a}), (1, {"v": b})])


def test_replicas_summing_their_shares_match_the_reference_bit_for_bit() -> None:
    """Two replicas of stage 1 (shares 0,2,3 and 1) and the rest single, as the daemons compute it."""
    torch.manual_seed(0)
    tokens = torch.randint(0, CFG.model.vocab_size, (4096,))
    assignment = {"1": [[0, 2, 3], [1]]}
    ref = train_reference(CFG, tokens, 1, assignments={1: assignment})
    # the same step by hand: per-stage runtimes, stage 1 split over two replicas that exchange partials
    stages = [StageRuntime(CFG, s, torch.device("cpu")) for s in range(3)]
    replica = StageRuntime(CFG, 1, torch.device("cpu"))
    for rt in [*stages, replica]:
        rt.check_step(0, 1)
    batch = training_batch(tokens, CFG.train, 0)
    for mb, (x, y) in enumerate(batch):
        one = replica if mb == 1 else stages[1]
        h = stages[2].forward(mb, one.forward(mb, stages[0].embed(mb, x)))
        _, g = stages[0].head(mb, h, y)
        stages[0].embed_backward(mb, one.backward(mb, stages[2].backward(mb, g)))
    mine, theirs = stages[1].partial_grads(), replica.partial_grads()
    norms = (stages[1].prepare(0, 1, [0, 2, 3], [(1, theirs)]), replica.prepare(0, 1, [1], [(0, mine)]))
    assert norms[0] == norms[1]
    for rt in (stages[0], stages[2]):
        rt.prepare(0, 1)
    from node.train.commit import decide_commit

    decision = decide_commit({0: stages[0].prepare(0, 1), 1: norms[0], 2: stages[2].prepare(0, 1)}, 3, 1.0)
    for rt in [*stages, replica]:
        rt.commit(0, 1, decision.clip_coef)
    for s, rt in enumerate(stages):
        for name, t in ref.stage_state(s).items():
            assert torch.equal(rt.module.state_dict()[name], t), (s, name)
    for name, t in replica.module.state_dict().items():
        assert torch.equal(t, stages[1].module.state_dict()[name])
    # and it differs from summing all four in order: the assignment matters, so it is recorded
    plain = train_reference(CFG, tokens, 1)
    assert any(not torch.equal(plain.stage_state(1)[n], t) for n, t in ref.stage_state(1).items())


def test_malformed_replica_routing_and_shares_are_refused() -> None:
    meta = pb.MicrobatchMeta(route=[0, 1, 2, 0], hop=1, microbatch=2, route_peers=["s", "me", "x", "s"])
    assert replica_route_problem(meta, "me") is None
    assert "routed to replica" in replica_route_problem(meta, "other")
    meta.prev_microbatch.extend([1, 2, 1, 1])  # 2 is not below microbatch 2
    assert "not below" in replica_route_problem(meta, "me")
    assert shares_problem([("a", [0, 2]), ("b", [1, 3])], 4) is None
    assert shares_problem([("a", [0, 2]), ("b", [1])], 4) is not None  # microbatch 3 missing
    assert shares_problem([("a", [0, 1]), ("a", [2, 3])], 4) is not None  # a peer twice
    assert shares_problem([("a", [2, 0]), ("b", [1, 3])], 4) is not None  # not ascending


def test_a_served_block_stage_is_joined_as_a_replica_and_lagging_replicas_catch_up() -> None:
    plan = plan_recovery(2, 4, frozenset({0, 1, 2, 3}), 50, served=True)
    assert plan.method == Method.REPLICA and plan.sources == (2,)
    assert plan_recovery(0, 4, frozenset({1, 2, 3}), 50, served=True).method != Method.REPLICA

    class R:
        def __init__(self, stage: int, step: int) -> None:
            self.stage, self.committed_step = stage, step

    assert behind(2, 9, [R(2, 10), R(1, 12)])
    assert not behind(2, 10, [R(2, 10), R(1, 12)])
    assert not behind(0, 1, [R(0, 5)])


# ---- placement by throughput (--placement throughput) ----------------------------------------------------
def _peer(stage, peer, throughput=None, state="online", n=4):
    from node.wire.records import StageRecord

    return StageRecord(
        stage=stage, num_stages=n, peer_id=peer, grpc_address="127.0.0.1:1", state=state, committed_step=5,
        config_fingerprint="f", version="0", throughput=throughput,
    )  # fmt: skip


def test_spares_join_the_slowest_stages_and_spread_out_when_they_arrive_together() -> None:
    from node.stage.placement import join_stage, stage_throughputs

    swarm = [_peer(0, "s0", 9.0), _peer(1, "a", 4.0), _peer(2, "b", 4.0), _peer(3, "c", 4.0)]
    spares = [_peer(None, p, state="spare") for p in ("x", "y", "z")]
    picks = {p: join_stage(swarm + spares, p, 4) for p in ("x", "y", "z")}
    assert picks == {"x": 1, "y": 2, "z": 3}  # three extra nodes on a 4-stage swarm: one per block stage
    slow = [_peer(0, "s0", 9.0), _peer(1, "a", 4.0), _peer(2, "b", 1.0), _peer(3, "c", 4.0)]
    assert join_stage(slow, "x", 4) == 2  # the stage that limits the swarm
    joining = [*slow, _peer(2, "w", state="joining")]  # a replica joining counts at once (as an average peer)
    assert stage_throughputs(joining, 4)[2] == 1.0 + (9.0 + 4.0 + 1.0 + 4.0) / 4
    assert join_stage([_peer(None, "x", state="spare")], "x", 4) is None  # nothing served yet


def test_a_spare_joins_only_once_its_spare_record_has_been_out_for_a_refresh_period() -> None:
    """Spares started at the same moment cannot see each other before their records are out: none joins on
    its first look, so each then spreads out by the same greedy fill (two used to pick the same stage)."""
    from node.recovery.replacement import joinable

    assert not joinable(None, 1.0, now=100.0)  # not announced yet
    assert not joinable(99.5, 1.0, now=100.0)
    assert joinable(99.0, 1.0, now=100.0)


def test_a_replica_moves_only_to_refill_a_vacancy_or_for_a_clear_gain_and_never_leaves_its_stage_empty() -> None:
    from node.stage.placement import move_stage

    base = [_peer(0, "s0", 9.0), _peer(1, "a", 4.0), _peer(1, "a2", 4.0), _peer(2, "b", 4.0), _peer(3, "c", 4.0)]
    me = base[1]
    assert move_stage(base, base[3], 4) is None  # the only peer of stage 2 never leaves it
    assert move_stage(base, me, 4) is None  # 8/4/4 -> 4/8/4: the slowest stage is no faster
    assert move_stage(base, base[2], 4) is None
    # stage 3 lost its peer and no spare waits: one replica of the richest stage (lowest peer id) refills it
    lost = [r for r in base if r.peer_id != "c"]
    assert move_stage(lost, me, 4) == 3 and move_stage(lost, base[2], 4) is None
    assert move_stage([*lost, _peer(None, "sp", state="spare")], me, 4) is None  # the spare claims it
    # two stages with two peers each: whatever their measured throughputs, both name the same donor (stage 1)
    pair = [_peer(0, "s0", 9.0), _peer(1, "a", 4.0), _peer(1, "a2", 4.1), _peer(2, "b", 4.2), _peer(2, "b2", 4.3)]
    assert [move_stage(pair, r, 4) for r in pair] == [None, 3, None, None, None]
    # a very slow stage: moving a replica there lifts the minimum by more than the margin
    skewed = [_peer(0, "s0", 9.0), _peer(1, "a", 4.0), _peer(1, "a2", 4.0), _peer(2, "b", 4.0), _peer(3, "c", 1.0)]
    assert move_stage(skewed, skewed[1], 4) == 3 and move_stage(skewed, skewed[2], 4) is None
    assert move_stage(skewed, skewed[1], 4, margin=10.0) is None  # hysteresis
    # a mate that lags (it is catching up) cannot carry the stage: nobody leaves it to that mate alone
    lagging = [r if r.peer_id != "a2" else r.model_copy(update={"committed_step": 2}) for r in skewed]
    assert move_stage(lagging, lagging[1], 4) is None
    assert move_stage([r for r in lagging if r.peer_id != "c"], lagging[1], 4) is None  # not even to refill
    # two stages with a peer to spare: only the richer one's lowest peer moves (both moving would overshoot)
    two = [*skewed, _peer(2, "b2", 5.0)]  # stage 1: 8, stage 2: 9, stage 3: 1
    assert [move_stage(two, r, 4) for r in two] == [None, None, None, 3, None, None]
    # a peer joining (or rebuilding) a stage, which this view may not count right yet: nobody moves until it is done
    for state in ("joining", "recovering"):
        assert move_stage([*skewed, _peer(1, "j", state=state)], skewed[1], 4) is None
        assert move_stage([*lost, _peer(2, "j", state=state)], me, 4) is None
    assert move_stage(base, base[0], 4) is None  # stage 0 has one peer and never moves


def test_the_local_table_shows_how_many_replicas_serve_each_stage() -> None:
    from rich.console import Console

    from node.local.view import progress_table

    records = [_peer(0, "s0"), _peer(1, "a"), _peer(2, "b"), _peer(2, "b2"), _peer(2, "b3", state="joining")]
    console = Console(width=200, record=True, color_system=None)
    console.print(progress_table([], records, num_stages=4, steps=9, bootstrap="/ip4/x"))
    row = next(line for line in console.export_text().splitlines() if "0/9" in line)
    assert "online×2+joining" in row and row.count("starting") == 1  # stage 3 has no record yet


async def test_partial_gradients_are_taken_by_attempt_and_a_replica_expecting_none_does_not_wait() -> None:
    import asyncio

    import torch

    from node.stage.inflight import PartialGradients
    from node.stage.runtime import StepError

    store = PartialGradients()
    # the only replica that computed (the others joined with empty shares): nobody sends it a partial, and it
    # must not wait for one (it used to wait out the whole RPC deadline, and the step's Prepare failed)
    assert await asyncio.wait_for(store.take(5, 1, {}, timeout=30.0), 1.0) == []
    grads = {"w": torch.ones(2)}
    assert await store.put(5, 2, "b", 1, grads)
    assert not await store.put(5, 1, "c", 0, grads)  # an older attempt than the one kept
    [(first, got)] = await store.take(5, 2, {"b": 1}, timeout=1.0)
    assert first == 1 and got is grads
    with pytest.raises(StepError, match="no partial gradient from"):
        await store.take(5, 2, {"c": 0}, timeout=0.05)


def test_a_mid_step_kill_fires_on_a_replica_that_was_not_routed_the_middle_microbatch(monkeypatch) -> None:
    """``--kill 2@5:forward``: the middle microbatch of step 5 (2 of 4); a replica whose share of step 5 lacks
    it dies at its first microbatch of step 6 instead of never."""
    from node.events import EventLog
    from node.recovery import faults

    died: list[tuple[int, int]] = []
    injector = faults.FaultInjector([faults.parse_fault("2@5:forward")], EventLog(None), 4)
    for step, mb in [(4, 2), (5, 1), (5, 3), (6, 0)]:
        monkeypatch.setattr(faults, "die_now", lambda step=step, mb=mb: died.append((step, mb)))
        injector.check("backward", stage=2, step=step, microbatch=mb)  # another phase
        injector.check("forward", stage=1, step=step, microbatch=mb)  # another stage
        injector.check("forward", stage=2, step=step, microbatch=mb)
    assert died == [(6, 0)]
    single = faults.FaultInjector([faults.parse_fault("2@5:forward")], EventLog(None), 4)
    for step, mb in [(5, 0), (5, 1), (5, 2)]:
        monkeypatch.setattr(faults, "die_now", lambda step=step, mb=mb: died.append((step, mb)))
        single.check("forward", stage=2, step=step, microbatch=mb)
    assert died[1:] == [(5, 2)]  # one peer per stage: the middle microbatch, as before
    # a spare that took the stage after step 5 (it never computed step 5) does not carry the kill out
    spare = faults.FaultInjector([faults.parse_fault("2@5:forward")], EventLog(None), 4)
    for step, mb in [(7, 0), (7, 2), (8, 1)]:
        monkeypatch.setattr(faults, "die_now", lambda step=step, mb=mb: died.append((step, mb)))
        spare.check("forward", stage=2, step=step, microbatch=mb)
    assert died[1:] == [(5, 2)]
