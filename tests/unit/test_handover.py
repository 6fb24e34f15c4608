"""The leaving side of a handover with replicas: another replica of the stage carries it on (no state moves),
decided from its heartbeat reply, against fake peers."""

from __future__ import annotations

from types import SimpleNamespace

import grpc

from node.events import EventLog
from node.metrics import StageMetrics
from node.options import TimingOptions
from node.proto import stage_pb2 as pb
from node.stage.handover import Handover
from node.stage.seat import Seat
from node.wire.records import StageRecord

N = 4


def rec(stage: int, peer: str, step: int = 7) -> StageRecord:
    return StageRecord(
        stage=stage, num_stages=N, peer_id=peer, grpc_address=f"127.0.0.1:{2000 + ord(peer[0])}", state="online",
        committed_step=step, config_fingerprint="fp", version="0",
    )  # fmt: skip


class Replicas:
    """Each peer's heartbeat answer: (its committed step, who answers), or None for no answer."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, str] | None] = {}

    def stub(self, peer: StageRecord) -> SimpleNamespace:
        async def heartbeat(request: pb.HeartbeatRequest, timeout: float) -> pb.HeartbeatReply:
            answer = self.answers.get(peer.peer_id)
            if answer is None:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "connection refused")
            step, who = answer
            return pb.HeartbeatReply(stage=peer.stage, peer_id=who, state="online", committed_step=step)

        return SimpleNamespace(Heartbeat=heartbeat)


def handover(tmp_path, peers: list[StageRecord], sealed: list[bool]) -> tuple[Handover, Replicas]:
    seat = Seat(stage=1)
    seat.runtime = SimpleNamespace(committed_step=7, prepared=None)
    presence = SimpleNamespace(
        me=SimpleNamespace(peer_id="me"), timing=TimingOptions(),
        replicas_of=lambda stage: sorted([rec(stage, "me"), *peers], key=lambda r: r.peer_id),
    )  # fmt: skip
    channels = Replicas()

    def seal() -> bool:
        sealed.append(True)
        return True

    participant = SimpleNamespace(config=None)
    return Handover(seat, presence, participant, channels, StageMetrics(), EventLog(tmp_path / "e.jsonl"),
                    seal=seal), channels  # fmt: skip


async def test_a_replica_that_committed_past_this_node_carries_the_stage_on_without_a_seal(tmp_path) -> None:
    sealed: list[bool] = []
    h, replicas = handover(tmp_path, [rec(1, "r")], sealed)
    replicas.answers["r"] = (7, "r")  # in step with this node: stage 0 may still route the step in flight here
    assert await h._replica_carries_on() is None
    replicas.answers["r"] = (8, "r")  # stage 0 committed a step without this node: it carries the stage on
    carrier = await h._replica_carries_on()
    assert carrier is not None and carrier.peer_id == "r"
    assert sealed == []  # no state moves, so nothing is sealed


async def test_at_the_last_chance_an_in_step_replica_will_do_once_this_node_is_sealed(tmp_path) -> None:
    sealed: list[bool] = []
    h, replicas = handover(tmp_path, [rec(1, "r")], sealed)
    replicas.answers["r"] = (7, "r")
    carrier = await h._replica_carries_on(last_chance=True)
    assert carrier is not None and carrier.peer_id == "r" and sealed == [True]
    replicas.answers["r"] = (6, "r")  # behind this node (still catching up): it would lose a committed step
    assert await h._replica_carries_on(last_chance=True) is None


async def test_a_replica_that_does_not_answer_or_is_another_process_carries_nothing(tmp_path) -> None:
    h, replicas = handover(tmp_path, [rec(1, "r"), rec(1, "s")], [])
    replicas.answers["r"] = None  # gone
    replicas.answers["s"] = (9, "impostor")  # another process answers on its address
    assert await h._replica_carries_on() is None
    replicas.answers["r"] = (9, "r")
    assert (await h._replica_carries_on()).peer_id == "r"
    alone, _ = handover(tmp_path, [], [])
    assert await alone._replica_carries_on(last_chance=True) is None  # no other replica: a successor or parking
