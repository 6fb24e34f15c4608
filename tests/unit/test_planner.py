"""Recovery planning over hand-made swarm states, the CheckFree formula, and fault specs."""

import pytest
import torch

from node.options import RecoveryStrategy
from node.recovery.faults import parse_fault
from node.recovery.planner import Method, claim_winner, live_stages, plan_recovery, vacant_stages
from node.recovery.rebuild import checkfree_average
from node.topology import heartbeat_side, nearest_live_block_stages, neighbour_stages, route_for, swap_partner
from node.wire.records import StageRecord


def rec(stage, peer, state="online", step=10, fp="f", n=6) -> StageRecord:
    return StageRecord(
        stage=stage,
        num_stages=n,
        peer_id=peer,
        grpc_address="127.0.0.1:1",
        state=state,
        committed_step=step,
        config_fingerprint=fp,
        version="0",
    )


SWARM = [rec(0, "a"), rec(1, "b"), rec(2, "c"), rec(4, "e"), rec(5, "f")]  # stage 3 lost


def test_vacancy_and_liveness() -> None:
    assert vacant_stages(SWARM, fingerprint="f", num_stages=6) == [3]
    assert vacant_stages(SWARM, fingerprint="f", num_stages=6, suspects=frozenset({"b"})) == [1, 3]
    rebuilding = [*SWARM, rec(3, "x", state="recovering")]
    assert vacant_stages(rebuilding, fingerprint="f", num_stages=6) == []
    assert live_stages(rebuilding, fingerprint="f", num_stages=6) == frozenset({0, 1, 2, 4, 5})
    other_config = [*SWARM, rec(3, "y", fp="other")]
    assert vacant_stages(other_config, fingerprint="f", num_stages=6) == [3]
    spare = StageRecord(
        stage=None,
        num_stages=6,
        peer_id="s",
        grpc_address="h:1",
        state="spare",
        committed_step=0,
        config_fingerprint="f",
        version="0",
    )
    assert vacant_stages([*SWARM, spare], fingerprint="f", num_stages=6) == [3]


def test_claim_goes_to_live_peer_then_lowest_rebuilder() -> None:
    claims = [rec(3, "p9", state="recovering"), rec(3, "p1", state="recovering")]
    assert claim_winner(claims, 3, fingerprint="f", num_stages=6) == "p1"
    assert claim_winner([*claims, rec(3, "z", state="online")], 3, fingerprint="f", num_stages=6) == "z"
    assert claim_winner(claims, 2, fingerprint="f", num_stages=6) is None


@pytest.mark.parametrize(
    ("stage", "live", "method", "sources"),
    [
        (3, {0, 1, 2, 4, 5}, Method.CHECKFREE, (2, 4)),
        (3, {0, 1, 5}, Method.CHECKFREE, (1, 5)),  # two adjacent lost: nearest live on each side
        (1, {0, 2, 3, 4, 5}, Method.COPY, (2,)),  # first block stage: one block neighbour
        (5, {0, 1, 2, 3, 4}, Method.COPY, (4,)),  # last block stage
        (2, {0, 3}, Method.COPY, (3,)),
        (2, {0}, Method.RANDOM, ()),  # no block stage left
        (0, {1, 2, 3, 4, 5}, Method.UNRECOVERABLE, ()),
    ],
)
def test_plan(stage: int, live: set[int], method: Method, sources: tuple[int, ...]) -> None:
    plan = plan_recovery(stage, 6, frozenset(live), committed_step=10)
    assert (plan.method, plan.sources) == (method, sources)
    assert plan.reason


def test_plan_before_any_step_and_with_recovery_none() -> None:
    assert plan_recovery(0, 6, frozenset(), committed_step=0).method == Method.FRESH
    assert plan_recovery(3, 6, frozenset({2, 4}), committed_step=0).method == Method.FRESH
    assert plan_recovery(3, 6, frozenset({2, 4}), committed_step=5, strategy="none").method == Method.RANDOM


def test_neighbours() -> None:
    assert nearest_live_block_stages(3, 6, frozenset({0, 1, 5})) == (1, 5)
    assert neighbour_stages(0, 4) == (1, 2, 3)
    assert neighbour_stages(1, 4) == (0, 2)
    assert neighbour_stages(3, 4) == (0, 2)


def test_heartbeat_side_labels_only_route_neighbours() -> None:
    # stage 0 watches every stage but only its route neighbours have a side: no "next" RTT from stage 2
    assert [heartbeat_side(0, s, 4) for s in neighbour_stages(0, 4)] == ["next", None, "prev"]
    assert [heartbeat_side(2, s, 4) for s in neighbour_stages(2, 4)] == ["prev", "next"]
    assert [heartbeat_side(3, s, 4) for s in neighbour_stages(3, 4)] == ["next", "prev"]  # stage 0 follows 3


def test_checkfree_average_is_the_weighted_formula() -> None:
    lo = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([0.0])}
    hi = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([4.0])}
    out = checkfree_average(lo, 1.0, hi, 3.0)
    g_lo, g_hi = 1.0 + 1e-4, 3.0 + 1e-4
    expected = (
        g_hi * torch.tensor([3.0, 6.0], dtype=torch.float64) + g_lo * torch.tensor([1.0, 2.0], dtype=torch.float64)
    ) / (g_lo + g_hi)
    assert torch.equal(out["w"], expected.float())
    # larger gradient norm = less converged = more weight
    assert out["w"][0] > 2.0
    with pytest.raises(ValueError):
        checkfree_average(lo, 1.0, {"w": hi["w"]}, 1.0)


@pytest.mark.parametrize(
    ("text", "stage", "step", "phase"),
    [
        ("2@5", 2, 5, "forward"),
        ("1@3:backward", 1, 3, "backward"),
        ("3@7:fetch", 3, 7, "fetch"),
        ("spare@2", None, 2, "idle"),
        ("1@4:start", 1, 4, "start"),
    ],
)
def test_fault_specs(text, stage, step, phase) -> None:
    spec = parse_fault(text, 4)
    assert (spec.stage, spec.step, spec.phase) == (stage, step, phase)
    assert parse_fault(str(spec), 4) == spec


@pytest.mark.parametrize("bad", ["2", "x@3", "2@0", "9@3", "2@3:sideways", "spare@3:forward"])
def test_bad_fault_specs(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_fault(bad, 4)


def test_out_of_order_routes_are_derived_from_s() -> None:
    assert route_for(0, 7, True) == [0, 1, 2, 3, 4, 5, 6, 0]
    assert route_for(1, 7, True) == [0, 2, 1, 3, 4, 6, 5, 0]
    assert route_for(1, 5, True) == [0, 2, 1, 4, 3, 0]
    assert route_for(1, 5, False) == [0, 1, 2, 3, 4, 0]
    assert [swap_partner(s, 7, True) for s in range(7)] == [None, 2, 1, None, None, 6, 5]
    with pytest.raises(ValueError):
        route_for(1, 4, True)


@pytest.mark.parametrize(
    ("stage", "live", "method", "sources"),
    [
        (1, {0, 2, 3, 4, 5}, Method.PARTNER_COPY, (2,)),
        (5, {0, 1, 2, 3, 4}, Method.PARTNER_COPY, (4,)),
        (4, {0, 1, 2, 3, 5}, Method.PARTNER_COPY, (5,)),
        (3, {0, 1, 2, 4, 5}, Method.CHECKFREE, (2, 4)),  # a middle stage keeps the weighted average
        (1, {0, 3, 4, 5}, Method.COPY, (3,)),  # partner lost too: nearest live block stage
    ],
)
def test_checkfree_plus_plan(stage, live, method, sources) -> None:
    plan = plan_recovery(stage, 6, frozenset(live), committed_step=10, strategy="checkfree+")
    assert (plan.method, plan.sources) == (method, sources)


def test_stage0_from_the_freshest_live_copy() -> None:
    plan = plan_recovery(0, 6, frozenset({1, 2, 3, 4, 5}), 10, "checkfree+", replicas={1: 9, 5: 10})
    assert (plan.method, plan.sources) == (Method.EMBEDDING_REPLICA, (5,))
    plan = plan_recovery(0, 6, frozenset({2, 3, 4}), 10, "checkfree+", replicas={1: 10, 5: 10})
    assert plan.method == Method.UNRECOVERABLE and "no live stage holds a copy" in plan.reason


def test_copy_and_random_strategies() -> None:
    live = frozenset({0, 1, 3, 4, 5})
    plan = plan_recovery(2, 6, live, 10, "copy")
    assert (plan.method, plan.sources) == (Method.COPY, (1,))
    plan = plan_recovery(1, 6, frozenset({0, 3}), 10, "copy")  # nothing below: the nearest live above
    assert (plan.method, plan.sources) == (Method.COPY, (3,))
    for strategy in ("random", "none"):
        assert plan_recovery(2, 6, live, 10, strategy).method == Method.RANDOM


@pytest.mark.parametrize("strategy", list(RecoveryStrategy))
@pytest.mark.parametrize("stage", [0, 1, 3, 5])
def test_a_stage_being_handed_over_is_vacant_and_planned_as_a_handoff(strategy: RecoveryStrategy, stage: int) -> None:
    swarm = [rec(s, f"p{s}", state="handing_over" if s == stage else "online") for s in range(6)]
    # spares see it vacant (and claim it as any vacant stage); it is not live for the other stages' plans
    assert vacant_stages(swarm, fingerprint="f", num_stages=6) == [stage]
    assert stage not in live_stages(swarm, fingerprint="f", num_stages=6)
    live = frozenset(range(6)) - {stage}
    plan = plan_recovery(stage, 6, live, 10, strategy, handing_over=frozenset({stage}))
    assert (plan.method, plan.sources) == (Method.HANDOFF, (stage,))
    # another stage's plan is unchanged by it
    other = (stage + 2) % 6
    assert plan_recovery(other, 6, live - {other}, 10, strategy, handing_over=frozenset({stage})).method is not (
        Method.HANDOFF
    )


def test_a_state_parked_on_a_live_neighbour_is_restored_with_its_staleness() -> None:
    live = frozenset({0, 1, 3, 4, 5})
    plan = plan_recovery(2, 6, live, 12, parked={2: (3, 10)})
    assert (plan.method, plan.sources) == (Method.HANDOFF, (3,)) and "2 stale" in plan.reason
    # the holder is gone: the usual rebuild
    assert plan_recovery(2, 6, live - {3}, 12, parked={2: (3, 10)}).method == Method.CHECKFREE  # from 1 and 4
    # an owner still handing over wins over a parked copy
    assert plan_recovery(2, 6, live, 12, handing_over=frozenset({2}), parked={2: (3, 10)}).sources == (2,)


# ---- the recovery ladder (--recovery ladder) ---------------------------------------------------------------
LADDER = RecoveryStrategy.LADDER


def test_snapshots_are_held_by_the_next_stage_and_the_last_stage_by_the_one_before() -> None:
    from node.topology import snapshot_holder

    assert [snapshot_holder(s, 6) for s in range(6)] == [1, 2, 3, 4, 5, 4]
    assert [snapshot_holder(s, 2) for s in range(2)] == [1, 0]


@pytest.mark.parametrize(
    "snapshot,committed,method",
    [
        ((3, 10), 12, Method.SNAPSHOT),  # 2 steps stale, K = 5
        ((3, 7), 12, Method.SNAPSHOT),  # exactly K stale
        ((3, 6), 12, Method.CHECKFREE),  # staler than K
        ((3, 13), 12, Method.CHECKFREE),  # from a step the swarm has not committed
        ((3, 12), 12, Method.SNAPSHOT),  # taken at the swarm's step: exact
        ((4, 10), 12, Method.CHECKFREE),  # its holder is dead
        ((2, 10), 12, Method.CHECKFREE),  # "held" by the lost stage itself
    ],
)
def test_the_ladder_takes_a_neighbour_snapshot_only_if_committed_live_and_at_most_k_stale(
    snapshot: tuple[int, int], committed: int, method: Method
) -> None:
    live = frozenset({0, 1, 3, 5})
    plan = plan_recovery(2, 6, live, committed, LADDER, snapshots={2: snapshot}, max_stale=5)
    assert plan.method == method
    if method == Method.SNAPSHOT:
        assert plan.sources == (snapshot[0],) and f"{committed - snapshot[1]} stale" in plan.reason
    else:
        assert plan.sources == (1, 3)  # the next rung: CheckFree from the nearest live block stages


def test_every_rung_of_the_ladder_in_order() -> None:
    live, snap = frozenset({0, 1, 3, 4, 5}), {2: (3, 10)}

    def plan(**kw):
        kw = {"snapshots": snap, "max_stale": 5, **kw}
        return plan_recovery(2, 6, kw.pop("live", live), 12, LADDER, **kw).method

    assert plan(served=True, live=live | {2}) == Method.REPLICA  # 1. a live replica: nothing to rebuild
    assert plan(handing_over=frozenset({2})) == Method.HANDOFF  # 2. a handoff, exact
    assert plan(parked={2: (3, 11)}) == Method.HANDOFF  # ... or the state its owner parked
    assert plan() == Method.SNAPSHOT  # 3. a neighbour snapshot
    assert plan(snapshots={}) == Method.CHECKFREE  # 4. CheckFree
    assert plan(snapshots={}, live=frozenset({0, 1})) == Method.COPY  # ... a copy at an edge
    assert plan(snapshots={}, live=frozenset({0})) == Method.RANDOM  # 5. the last resort
    assert plan_recovery(2, 6, live, 0, LADDER, snapshots=snap, max_stale=5).method == Method.FRESH


def test_stage_0_climbs_the_ladder_too_and_other_strategies_ignore_snapshots() -> None:
    live = frozenset({1, 2, 3})
    plan = plan_recovery(0, 4, live, 20, LADDER, snapshots={0: (1, 18)}, max_stale=10)
    assert (plan.method, plan.sources) == (Method.SNAPSHOT, (1,))
    lost = plan_recovery(0, 4, live, 20, LADDER, snapshots={0: (1, 5)}, max_stale=10)
    assert lost.method == Method.UNRECOVERABLE and "snapshot" in lost.reason
    # the last stage's snapshot is on the stage before it
    assert plan_recovery(3, 4, frozenset({0, 1, 2}), 20, LADDER, snapshots={3: (2, 20)}, max_stale=10).sources == (2,)
    for strategy in (RecoveryStrategy.CHECKFREE, RecoveryStrategy.COPY, RecoveryStrategy.RANDOM):
        assert plan_recovery(2, 4, live - {2}, 20, strategy, snapshots={2: (3, 20)}, max_stale=10).method != (
            Method.SNAPSHOT
        )


def test_before_its_first_snapshot_a_stage_restores_the_seeds_initial_state_if_at_most_k_steps_back() -> None:
    """The snapshot of step 0 is the seed's initial state, which every node can build (no source): stage 0
    lost before stage 1 holds a snapshot of it is not lost for good, and a block stage gets its own weights."""
    live = frozenset({1, 2, 3})
    for stage, alive in ((0, live), (2, frozenset({0, 1, 3}))):
        early = plan_recovery(stage, 4, alive, 4, LADDER, snapshots={}, max_stale=10)
        assert (early.method, early.sources) == (Method.SNAPSHOT, ()) and "4 stale" in early.reason
        assert plan_recovery(stage, 4, alive, 10, LADDER, max_stale=10).sources == ()  # exactly K back
    assert plan_recovery(0, 4, live, 11, LADDER, max_stale=10).method == Method.UNRECOVERABLE  # staler than K
    assert plan_recovery(2, 4, frozenset({0, 1, 3}), 11, LADDER, max_stale=10).method == Method.CHECKFREE
    # a snapshot that did arrive comes first, and other strategies never take the initial state
    assert plan_recovery(2, 4, frozenset({0, 1, 3}), 4, LADDER, snapshots={2: (3, 3)}, max_stale=10).sources == (3,)
    assert plan_recovery(2, 4, frozenset({0, 1, 3}), 4, RecoveryStrategy.CHECKFREE).method == Method.CHECKFREE


def test_a_lone_spare_settles_its_claim_briefly_and_one_with_rivals_waits_a_refresh_period() -> None:
    from node.recovery.planner import LONE_CLAIM_SETTLE_SECONDS, claim_settle_seconds

    swarm = [rec(0, "a"), rec(1, "b"), rec(3, "d"), rec(2, "me", state="recovering")]
    assert claim_settle_seconds(swarm, "me", 1.0) == LONE_CLAIM_SETTLE_SECONDS < 1.0
    assert claim_settle_seconds(swarm, "me", 0.1) == 0.1  # never longer than a period
    assert claim_settle_seconds([*swarm, rec(None, "s", state="spare")], "me", 1.0) == 1.0  # another spare
    assert claim_settle_seconds([*swarm, rec(2, "r", state="recovering")], "me", 1.0) == 1.0  # a rival claim
    assert claim_settle_seconds([*swarm, rec(4, "j", state="joining")], "me", 1.0) == 1.0  # any claimant
    assert claim_settle_seconds([*swarm, rec(4, "h", state="handing_over")], "me", 1.0) == LONE_CLAIM_SETTLE_SECONDS
