"""Presence against a fake directory and fake channels: suspicion, tombstones, vacancy, resolve, heartbeats."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import pytest

from node.events import EventLog, FailureDetectedEvent, read_events
from node.metrics import StageMetrics
from node.options import TimingOptions
from node.proto import stage_pb2 as pb
from node.recovery.planner import vacant_stages
from node.stage.compute import BlockingIO
from node.stage.presence import NodeIdentity, Presence
from node.stage.runtime import StepFailed
from node.stage.seat import Seat
from node.wire.records import StageRecord, StageState

FP, N = "fp", 4


def rec(stage, peer, state="online", step=5, fp=FP) -> StageRecord:
    return StageRecord(
        stage=stage, num_stages=N, peer_id=peer, grpc_address=f"127.0.0.1:{1000 + 100 * len(peer) + ord(peer[0])}",
        state=state, committed_step=step, config_fingerprint=fp, version="0",
    )  # fmt: skip


class FakeDirectory:
    """The swarm key of the DHT: one record per peer, last store wins."""

    def __init__(self, records: list[StageRecord]) -> None:
        self.by_peer = {r.peer_id: r for r in records}
        self.malformed_seen = 0
        self.stored: list[StageRecord] = []
        self.suspicions: dict[str, set[str]] = {}

    def announce(self, record: StageRecord, ttl: float) -> bool:
        self.stored.append(record)
        self.by_peer[record.peer_id] = record
        return True

    def report_dead(self, observer: StageRecord, dead_peer_id: str, ttl: float) -> bool:
        self.suspicions.setdefault(dead_peer_id, set()).add(observer.peer_id)
        return True

    def records_and_suspicions(self) -> tuple[list[StageRecord], dict[str, set[str]]]:
        return list(self.by_peer.values()), self.suspicions


class FakeStub:
    def __init__(self, peer: StageRecord, fail: bool, answered_by: str | None, sent: list) -> None:
        self.peer, self.fail, self.answered_by, self.sent = peer, fail, answered_by, sent

    async def Heartbeat(self, request, timeout):
        self.sent.append((self.peer.peer_id, request))
        if self.fail:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "connection refused")
        return pb.HeartbeatReply(stage=self.peer.stage, peer_id=self.answered_by or self.peer.peer_id, state="online")


class FakeChannels:
    def __init__(self) -> None:
        self.down: set[str] = set()
        self.impostors: dict[str, str] = {}  # address -> the peer id of another process now answering there
        self.dropped: list[str] = []
        self.sent: list[tuple[str, pb.HeartbeatRequest]] = []  # (peer id, heartbeat) in the order sent

    def stub(self, peer: StageRecord) -> FakeStub:
        return FakeStub(peer, peer.grpc_address in self.down, self.impostors.get(peer.grpc_address), self.sent)

    async def drop(self, peer: StageRecord) -> None:
        self.dropped.append(peer.grpc_address)


@pytest.fixture
def parts(tmp_path):
    directory = FakeDirectory([rec(0, "a"), rec(1, "b"), rec(2, "c"), rec(3, "d"), rec(2, "x", fp="other")])
    seat = Seat(stage=1)
    me = NodeIdentity(peer_id="b", fingerprint=FP, num_stages=N, out_of_order=False, grpc_address="127.0.0.1:9")
    channels = FakeChannels()
    presence = Presence(
        directory, BlockingIO(), seat, me, TimingOptions(refresh_seconds=0.05, heartbeat_interval=0.01), channels,
        StageMetrics(), EventLog(tmp_path / "events.jsonl"),
    )  # fmt: skip
    yield presence, directory, channels, tmp_path
    presence.close()


async def test_view_peer_choice_and_committed_step_ignore_other_swarms_and_self(parts) -> None:
    presence, directory, _, _ = parts
    directory.by_peer["c2"] = rec(2, "c2", step=6)
    await presence.refresh()
    assert presence.peer_of(2).peer_id == "c2"  # most committed steps wins
    assert presence.peer_of(1) is None  # this node does not talk to itself
    assert presence.swarm_committed() == 6


async def test_a_suspected_peer_is_left_out_reported_and_fails_the_step(parts) -> None:
    presence, directory, channels, tmp_path = parts
    await presence.refresh()
    lost: list[StepFailed] = []
    presence.on_peer_lost.append(lost.append)
    presence.suspect(presence.peer_of(2), "heartbeat: UNAVAILABLE")
    presence.suspect(presence.view[2], "again")  # reported once
    await asyncio.sleep(0.05)
    assert presence.peer_of(2) is None and len(lost) == 1 and "stage 2" in str(lost[0])
    assert channels.dropped == [rec(2, "c").grpc_address]
    assert directory.suspicions == {"c": {"b"}}
    [event] = [e for e in read_events(tmp_path / "events.jsonl") if isinstance(e, FailureDetectedEvent)]
    assert (event.stage, event.peer, event.by) == (2, "c", 1)
    # a live neighbour's report makes the stage vacant for everyone at once
    await presence.refresh()
    assert vacant_stages(presence.view, fingerprint=FP, num_stages=N) == [2]


async def test_suspicion_is_forgiven_after_three_refresh_periods(parts) -> None:
    presence, _, _, _ = parts
    await presence.refresh()
    presence.suspects["c"] = time.monotonic() - 3 * presence.timing.refresh_seconds - 0.01
    assert "c" not in presence.suspected() and presence.peer_of(2).peer_id == "c"


async def test_resolve_waits_for_a_serving_peer_and_gives_up_at_the_deadline(parts) -> None:
    presence, directory, _, _ = parts
    del directory.by_peer["d"]
    await presence.refresh()

    async def appear() -> None:
        await asyncio.sleep(0.1)
        directory.by_peer["d2"] = rec(3, "d2")

    task = asyncio.create_task(appear())
    assert (await presence.resolve(3, time.monotonic() + 5)).peer_id == "d2"
    await task
    del directory.by_peer["c"]
    await presence.refresh()
    with pytest.raises(StepFailed, match="no serving peer for stage 2"):
        await presence.resolve(2, time.monotonic() + 0.2)


async def test_a_failed_heartbeat_suspects_the_neighbour_and_the_stage_announces_waiting(parts) -> None:
    presence, directory, channels, _ = parts
    await presence.refresh()
    presence.seat.runtime = SimpleNamespace(committed_step=5)  # heartbeats only run for a node holding a stage
    presence.state = StageState.ONLINE
    channels.down.add(rec(2, "c").grpc_address)
    stopping = asyncio.Event()
    task = asyncio.create_task(presence.run_heartbeats(stopping))
    await asyncio.sleep(0.1)
    stopping.set()
    await task
    assert "c" in presence.suspected() and "a" not in presence.suspected()
    assert presence.state == StageState.WAITING
    assert directory.by_peer["b"].state == StageState.WAITING


async def test_a_heartbeat_answered_by_another_process_is_a_missed_beat(parts) -> None:
    presence, _, channels, _ = parts
    await presence.refresh()
    presence.seat.runtime = SimpleNamespace(committed_step=5)
    channels.impostors[rec(2, "c").grpc_address] = "someone-else"  # "c" restarted: a new peer on its address
    for beat in range(1, presence.timing.suspect_after + 1):
        assert not await presence.ping(2)
        assert ("c" in presence.suspected()) == (beat == presence.timing.suspect_after)
    assert await presence.ping(0)  # a neighbour answering as itself is alive


async def test_heartbeats_reach_every_replica_and_a_dead_one_fails_the_step_in_flight(parts) -> None:
    """A replica that dies while microbatches are routed to it is found by heartbeat, not by the expiry of its
    record (which a step in flight would wait out): the stage stays alive through the other replica."""
    presence, directory, channels, _ = parts
    directory.by_peer["c2"] = rec(2, "c2")
    await presence.refresh()
    presence.seat.runtime = SimpleNamespace(committed_step=5)
    lost: list[StepFailed] = []
    presence.on_peer_lost.append(lost.append)
    channels.down.add(rec(2, "c2").grpc_address)
    for _ in range(presence.timing.suspect_after):
        assert await presence.ping(2)  # "c" answers for the stage
    assert "c2" in presence.suspected() and "c" not in presence.suspected()
    missed = presence.timing.suspect_after
    assert [str(e) for e in lost] == [f"stage 2 (c2) lost: heartbeat: UNAVAILABLE ({missed} missed)"]
    assert [r.peer_id for r in presence.replicas_of(2)] == ["c"]


async def test_a_swarm_whose_peers_all_went_is_not_taken_for_a_new_one(parts) -> None:
    """Once every record is gone (a teardown), the live committed step is 0, but the node remembers the swarm
    had trained: a spare must not plan a fresh start from the seed's initial weights."""
    presence, directory, _, _ = parts
    await presence.refresh()
    assert presence.swarm_committed() == presence.committed_known() == 5
    directory.by_peer = {"x": rec(2, "x", fp="other", step=50)}  # only another swarm's peer is left
    await presence.refresh()
    assert presence.swarm_committed() == 0 and presence.committed_known() == 5


async def test_the_record_says_what_the_seat_holds(parts) -> None:
    presence, _, _, _ = parts
    record = presence.record(StageState.ONLINE)
    assert (record.stage, record.peer_id, record.committed_step, record.state) == (1, "b", 0, StageState.ONLINE)
    presence.seat.stage = None
    await presence.announce(StageState.JOINING)  # a --stage auto node has no record before it is a spare
    assert presence.directory.stored == []


async def test_a_node_back_from_a_stall_yields_to_a_claim_of_its_stage(parts) -> None:
    presence, directory, _, _ = parts
    presence.seat.runtime, presence.seat.epoch = SimpleNamespace(committed_step=5), 100
    fenced: list[StageRecord] = []
    presence.on_fenced.append(fenced.append)
    claimant = rec(1, "z", state="recovering").model_copy(update={"epoch": 101})
    directory.by_peer["z"] = claimant
    assert presence.newer_claim() is None  # as a successor: only a serving one counts (a handover waits for it)
    await presence.refresh()
    assert fenced == []  # a live node resists a claim: the claimant sees it serving and backs off
    presence.stalls.stalled_at = time.monotonic()  # back from a stall (see the next test)
    await presence.refresh()
    assert [r.peer_id for r in fenced] == ["z"]  # back from the stall, the claim is enough
    # an older claim, or one of another stage, fences nothing
    fenced.clear()
    directory.by_peer["z"] = claimant.model_copy(update={"epoch": 99})
    directory.by_peer["y"] = rec(2, "y", state="recovering").model_copy(update={"epoch": 200})
    await presence.refresh()
    assert fenced == []
    # stage 0 yields to a claim only where a claimant can rebuild it (checkfree+, checkpoint)
    presence.seat.stage = 0
    directory.by_peer["z"] = rec(0, "z", state="recovering").model_copy(update={"epoch": 101})
    await presence.refresh()
    assert fenced == []
    presence.stage0_rebuildable = True
    await presence.refresh()
    assert [r.peer_id for r in fenced] == ["z"]


async def test_a_frozen_node_keeps_its_record_unannounced_and_yields_to_the_claim(parts) -> None:
    presence, directory, _, _ = parts  # refresh 0.05 s: a record lives 0.1 s
    presence.seat.runtime, presence.seat.epoch = SimpleNamespace(committed_step=5), 100
    presence.state = StageState.ONLINE
    fenced: list[StageRecord] = []
    presence.on_fenced.append(fenced.append)
    stopping = asyncio.Event()
    watch = asyncio.create_task(presence.stalls.run(stopping))
    await asyncio.sleep(0.05)
    assert not presence.stalls.yielding()
    time.sleep(0.3)  # the whole process freezes (as under SIGSTOP): the event loop does not run
    await asyncio.sleep(0.01)  # the watch wakes up late
    assert presence.stalls.yielding()
    stored = len(directory.stored)
    await presence.announce()
    assert len(directory.stored) == stored  # silent: its stage looks vacant to the spares
    directory.by_peer["z"] = rec(1, "z", state="recovering").model_copy(update={"epoch": 101})
    await presence.refresh()
    assert [r.peer_id for r in fenced] == ["z"]  # the claim fences it
    stopping.set()
    await watch


async def test_a_nudge_cuts_a_pause_short_and_a_flood_of_them_is_dropped(parts) -> None:
    presence, _, _, _ = parts
    started = time.monotonic()
    pausing = asyncio.ensure_future(presence.nudges.pause(5.0))
    await asyncio.sleep(0.01)
    assert presence.nudges.nudged() and not presence.nudges.nudged()  # the second one, too soon after, is dropped
    await asyncio.wait_for(pausing, 1.0)
    assert time.monotonic() - started < 1.0
    nudges = presence.metrics.nudges
    assert nudges.labels(result="woke")._value.get() == 1 and nudges.labels(result="dropped")._value.get() == 1
    stopping = asyncio.Event()
    stopping.set()
    await asyncio.wait_for(presence.nudges.pause(5.0, stopping), 1.0)  # stopping ends it too


async def test_a_nudge_that_lands_while_nobody_waits_is_not_lost(parts) -> None:
    presence, directory, _, _ = parts
    await presence.refresh()
    assert not presence.nudges.pending
    presence.nudges.nudged()  # e.g. stage 0 is in the middle of a step
    assert presence.nudges.pending
    await asyncio.wait_for(presence.nudges.pause(5.0), 0.5)  # the next pause returns at once (once)
    # a view read within max_age is kept, unless a nudge came since
    directory.by_peer["c"] = rec(2, "c", state="handing_over")
    await presence.try_refresh(max_age=60)
    assert presence.peer_of(2) is None and not presence.nudges.pending
    directory.by_peer["c"] = rec(2, "c")
    await presence.try_refresh(max_age=60)
    assert presence.peer_of(2) is None  # fresh enough: not read again
    presence.nudges._last = -1e9
    presence.nudges.nudged()
    await presence.try_refresh(max_age=60)
    assert presence.peer_of(2).peer_id == "c"


async def test_a_nudge_during_a_read_keeps_the_view_marked_out_of_date(parts) -> None:
    presence, directory, _, _ = parts
    read = directory.records_and_suspicions

    def slow_read():
        time.sleep(0.1)  # the DHT read is under way (a worker thread) when the nudge comes
        return read()

    directory.records_and_suspicions = slow_read
    reading = asyncio.ensure_future(presence.refresh())
    await asyncio.sleep(0.03)
    presence.nudges.nudged()
    await reading
    assert presence.nudges.pending  # the read may have missed what the nudge announced


async def test_nudges_go_to_the_named_peers_once_each_and_a_dead_one_costs_nothing(parts) -> None:
    presence, _, channels, _ = parts
    await presence.refresh()
    channels.down.add(presence.peer_of(3).grpc_address)
    peers = [presence.peer_of(0), presence.peer_of(3), presence.peer_of(0), presence.record()]  # and itself
    await presence.nudge(peers)
    assert sorted(peer for peer, _ in channels.sent) == ["a", "d"]
    assert all(request.refresh and request.sender_peer == "b" for _, request in channels.sent)
    assert presence.suspected() == frozenset()  # a nudge is no heartbeat: a failed one suspects nobody


async def test_a_reported_death_nudges_the_spares(parts) -> None:
    presence, directory, channels, _ = parts
    directory.by_peer["s"] = rec(None, "s", state="spare")
    await presence.refresh()
    presence.suspect(presence.peer_of(2), "heartbeat: UNAVAILABLE")
    await asyncio.sleep(0.05)
    assert directory.suspicions == {"c": {"b"}}
    assert [(peer, request.refresh) for peer, request in channels.sent] == [("s", True)]


async def test_who_waits_for_a_stage_and_who_takes_its_traffic_while_it_is_handed_over(parts) -> None:
    presence, directory, _, _ = parts
    directory.by_peer["c"] = rec(2, "c", state="handing_over")
    directory.by_peer["n"] = rec(2, "n", state="recovering").model_copy(update={"epoch": 7})
    directory.by_peer["s"] = rec(None, "s", state="spare")
    directory.by_peer["off"] = rec(3, "off", state="offline")
    await presence.refresh()
    assert sorted(r.peer_id for r in presence.waiting_on(2)) == ["a", "c", "d", "n"]  # not b (itself), not s
    assert [r.peer_id for r in presence.spares()] == ["s"]
    # the leaving owner finishes the step in flight: it takes its stage's traffic and answers heartbeats
    assert presence.route_peer("c", 2) == (directory.by_peer["c"], False)
    assert presence.route_peer("unseen", 2) == (None, False)  # not in the view yet: wait for it
    assert presence.route_peer("off", 3) == (None, True)  # left
    assert presence.route_peer("c", 3) == (None, True)  # it holds another stage (a replica that moved away)
    assert presence.route_peer("s", 2) == (None, False)  # a spare a moment ago, perhaps its successor now
    directory.by_peer["n"] = directory.by_peer["n"].model_copy(update={"state": StageState.ONLINE})
    await presence.refresh()
    assert presence.route_peer("c", 2) == (None, True)  # its successor serves by a newer epoch: fenced off
    assert presence.route_peer("n", 2)[0].peer_id == "n"


async def test_a_member_whose_record_lapsed_a_moment_ago_still_counts_for_authorization(parts) -> None:
    presence, directory, _, _ = parts
    await presence.refresh()
    stage0 = directory.by_peer.pop("a")  # stage 0 was too busy to announce in time: its record expired
    await presence.refresh()
    assert presence.peer_of(0) is None  # no traffic goes to it, but who may call what does not flip
    assert "a" in {r.peer_id for r in presence.members_lately()}
    assert "x" not in {r.peer_id for r in presence.members_lately()}  # another swarm's record never counts
    directory.by_peer["a"] = stage0.model_copy(update={"state": StageState.OFFLINE})
    await presence.refresh()
    assert [r.state for r in presence.members_lately() if r.peer_id == "a"] == [StageState.OFFLINE]  # newest wins
    directory.by_peer.pop("a")
    presence.lately._last["a"] = (stage0, time.monotonic() - presence.record_ttl)  # lapsed a record lifetime ago
    await presence.refresh()
    assert "a" not in {r.peer_id for r in presence.members_lately()}
    directory.suspicions = {"d": {"c"}}  # declared dead by a live neighbour: gone at once, lapsed or not
    await presence.refresh()
    assert "d" not in {r.peer_id for r in presence.members_lately()}


async def test_a_replica_whose_record_lapsed_a_moment_ago_is_still_a_member_for_the_step_in_flight(parts) -> None:
    """Stage 0 names a replica in a step's shares; its co-replica and stage 0 must reach it although its record
    lapsed from this node's last read (a loaded node missed its announce by a moment): ``member(lately=True)``."""
    presence, directory, _, _ = parts
    await presence.refresh()
    replica = directory.by_peer.pop("c")
    await presence.refresh()
    assert presence.member("c") is None and presence.member("c", lately=True) == replica
    directory.by_peer["c"] = replica.model_copy(update={"state": StageState.OFFLINE})
    await presence.refresh()
    assert presence.member("c", lately=True) is None  # it left: not serving any more
    directory.by_peer.pop("c")
    presence.lately._last["c"] = (replica, time.monotonic() - presence.record_ttl)  # lapsed a lifetime ago
    await presence.refresh()
    assert presence.member("c", lately=True) is None


async def test_an_explicit_stage_is_claimed_only_when_two_successful_reads_find_it_vacant(parts) -> None:
    from node.recovery.replacement import served_epoch

    presence, directory, _, _ = parts
    stopping = asyncio.Event()
    served = rec(2, "s").model_copy(update={"epoch": 7})
    reads = 0
    real_read = directory.records_and_suspicions

    def flaky_read():  # the first read fails (a DHT timeout), the second misses the record, the third has it
        nonlocal reads
        reads += 1
        if reads == 1:
            raise TimeoutError("DHT lookup timed out")
        records, suspicions = real_read()
        return ([r for r in records if r.peer_id != "s"] if reads == 2 else records), suspicions

    del directory.by_peer["c"]  # stage 2's peer is "s" here
    directory.by_peer["s"] = served
    directory.records_and_suspicions = flaky_read
    assert await served_epoch(presence, 2, stopping) == 7  # joined as a replica, never claimed
    assert reads == 3
    directory.records_and_suspicions = real_read
    del directory.by_peer["s"]
    started = time.monotonic()
    assert await served_epoch(presence, 2, stopping) is None  # vacant in two reads: a claim
    assert time.monotonic() - started >= 0.4  # the second read came a moment later


async def test_a_routed_peer_that_a_neighbour_reported_dead_is_gone_for_the_step(parts) -> None:
    presence, directory, _, _ = parts
    await presence.refresh()
    assert presence.route_peer("c", 2) == (directory.by_peer["c"], False)  # serving: the step waits for it
    directory.suspicions["c"] = {"d"}  # stage 3 found it dead: its record leaves every view
    await presence.refresh()
    # gone at once, before this node's own heartbeats miss it (a fast replacement may be what they reach)
    assert presence.route_peer("c", 2) == (None, True)
