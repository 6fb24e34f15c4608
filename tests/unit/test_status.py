"""``swarm-node status``: the table fits 80 columns, the "swarms seen" hint, the validation of a peer's reply,
the GetStatus(swarm=True) fast path on a real in-process server, and the command ``local`` prints."""

from __future__ import annotations

import asyncio
import json
import pathlib
from types import SimpleNamespace

import pytest
from rich.console import Console

from node.status import (
    MAX_VIEW_RECORDS,
    StatusError,
    SwarmView,
    parse_view,
    read_dht,
    read_peer,
    records_table,
    render,
    split_address,
    swarms_hint,
)
from node.wire.records import RecoveryRecord, StageRecord, StageState, stages_key
from tests.unit.test_service import serving


def record(stage: int | None, **kw) -> StageRecord:
    base = dict(
        stage=stage, num_stages=8, peer_id=f"QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbd{stage or 0}",
        grpc_address="10.200.100.123:50051", state=StageState.ONLINE, committed_step=1_234_567,
        config_fingerprint="f" * 16, version="0.1.0", pid=4_194_304, metrics_port=65535, epoch=1_796_226_141_850,
    )  # fmt: skip
    return StageRecord(**{**base, **kw})


REALISTIC = [
    record(None, state=StageState.SPARE),
    record(0, last_recovery=RecoveryRecord(method="checkfree+", step=1_234_000, seconds=12.5), swap_partner=7),
    record(1, state=StageState.HANDING_OVER, replica_step=1_234_566),
    record(2, state=StageState.RECOVERING, grpc_address="[2001:db8::1234:5678]:50051"),
    record(3, state=StageState.WAITING, grpc_address="worker-17.cluster.example.org:31338"),
    record(4, state=StageState.OFFLINE, last_recovery=RecoveryRecord(method="checkpoint", step=99_000, seconds=3)),
]


def rendered(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def test_status_shows_each_replicas_throughput_and_share_of_its_stage() -> None:
    replicas = [
        record(0, throughput=30.0),
        record(2, peer_id="fast", throughput=10.0),
        record(2, peer_id="slow", throughput=5.0),
        record(2, peer_id="joining", state=StageState.JOINING),
        record(3, peer_id="lone", throughput=7.0),
    ]
    lines = rendered(records_table(replicas, "swarm local", wide=False), 80)
    assert all(len(line) <= 80 for line in lines)
    assert sorted(x for line in lines for x in line.split() if x.endswith("%")) == ["33%", "67%"]
    stages = SwarmView("local", replicas).to_json()["stages"]
    assert {s["peer_id"]: s["share"] for s in stages if s["share"] is not None} == {"fast": 2 / 3, "slow": 1 / 3}
    wide = "\n".join(rendered(records_table(replicas, "swarm local", wide=True), 200))
    assert "mb/s" in wide and "10.0" in wide and "7.0" in wide


def test_the_default_table_fits_80_columns_without_cutting_a_cell() -> None:
    lines = rendered(records_table(REALISTIC, "swarm local: 6 records via peer 10.200.100.123:50051"), 80)
    assert all(len(line) <= 80 for line in lines)
    text = "\n".join(lines)
    assert "…" not in text
    for word in ("handing_over", "recovering", "1234567", "4194304", "checkfree+@1234000", "spare", "committed"):
        assert word in text
    assert "10.200.100.123:50051" in text


def test_wide_shows_every_column_when_the_console_is_wide_enough() -> None:
    table = records_table(REALISTIC, wide=True)
    text = "\n".join(rendered(table, 250))
    assert "…" not in text
    for word in ("node", "peer", "epoch", "metrics", ":65535", "swap partner", "stage-0 copy", "step 1234566"):
        assert word in text
    assert "checkfree+ @ step 1234000 (12.5s)" in text


def test_the_hint_names_the_swarms_seen_and_the_flag_to_pass() -> None:
    hint = swarms_hint("default", {"local": 4})
    assert "'default'" in hint and "'local' (4 records)" in hint and hint.endswith("pass --swarm local")
    assert "'local' (1 record)" in swarms_hint("default", {"local": 1})
    nothing = swarms_hint("mine", {})
    assert "'mine'" in nothing and "'default'" in nothing and "'local'" in nothing
    # the hint is what status shows, in full, on an 80-column terminal
    lines = rendered(render(SwarmView("default", [], 0, "dht", {"local": 4})), 80)
    assert "…" not in "".join(lines) and "pass --swarm local" in " ".join(" ".join(lines).split())


def test_a_reply_is_validated_record_by_record() -> None:
    good = [json.dumps(r.to_json()) for r in REALISTIC[:3]]
    bad = [
        "not json",
        json.dumps({**REALISTIC[1].to_json(), "committed_step": -1}),
        json.dumps({**REALISTIC[1].to_json(), "grpc_address": "nowhere"}),
        json.dumps([1, 2]),
        json.dumps({**REALISTIC[1].to_json(), "extra": 1}),
        "x" * 20_000,
    ]
    records, malformed = parse_view("local", [*bad, *reversed(good)])
    assert malformed == len(bad)
    assert [r.stage for r in records] == [None, 0, 1]  # sorted as the DHT path sorts
    with pytest.raises(StatusError, match="names no swarm"):
        parse_view("", good)
    with pytest.raises(StatusError, match="names no swarm"):
        parse_view("a b", good)
    with pytest.raises(StatusError, match="records"):
        parse_view("local", ["{}"] * (MAX_VIEW_RECORDS + 1))


def test_addresses() -> None:
    assert split_address("127.0.0.1:5") == ("127.0.0.1", 5)
    assert split_address("[::1]:50051") == ("::1", 50051)
    for bad in ("127.0.0.1", ":5", "host:0", "host:70000", "host:x"):
        with pytest.raises(StatusError):
            split_address(bad)


class FakeDHT:
    """``get`` of the swarm keys, as ``DHT.get(latest=True)`` returns them (insecure subkeys: peer ids)."""

    def __init__(self, swarms: dict[str, list[StageRecord]]) -> None:
        self.swarms = swarms
        self.asked: list[str] = []

    def get(self, key: str, latest: bool = True):
        self.asked.append(key)
        for name, records in self.swarms.items():
            if key == stages_key(name):
                return {r.peer_id: r.to_wire() for r in records}
        return None


def test_the_dht_path_looks_at_the_well_known_swarms_only_when_the_asked_one_is_empty() -> None:
    dht = FakeDHT({"local": REALISTIC[1:4]})
    view = read_dht(dht, "default", None)  # type: ignore[arg-type]
    assert view.records == [] and view.seen == {"local": 3} and view.source == "dht"
    dht = FakeDHT({"local": REALISTIC[1:4]})
    view = read_dht(dht, "local", None)  # type: ignore[arg-type]
    assert len(view.records) == 3 and dht.asked == [stages_key("local")]


async def test_a_stage_daemon_answers_with_its_swarm_view() -> None:
    async with serving() as s:
        s.participant.presence = SimpleNamespace(
            directory=SimpleNamespace(key=stages_key("local")), view=REALISTIC[1:5]
        )
        view = await asyncio.to_thread(read_peer, s.address, None, None)
        assert view.swarm == "local" and view.source == f"peer {s.address}"
        assert [r.stage for r in view.records] == [0, 1, 2, 3] and view.malformed == 0
        assert view.records == REALISTIC[1:5]
        # another swarm asked: nothing shown, the peer's swarm named
        other = await asyncio.to_thread(read_peer, s.address, "default", None)
        assert other.records == [] and other.seen == {"local": 4}
        # a plain GetStatus (a neighbour's) does not carry the view
        from node.proto import stage_pb2 as pb

        reply = await s.stub.GetStatus(pb.StatusRequest())
        assert reply.swarm == "local" and list(reply.records) == []


def test_local_prints_the_exact_status_command(tmp_path: pathlib.Path) -> None:
    from node.config import build_config
    from node.local.launcher import LocalOptions, LocalSwarm

    opts = LocalOptions(config=build_config(overrides={"num_stages": 2}), steps=1, workdir=tmp_path, quiet=True)
    swarm = LocalSwarm(opts)
    swarm.bootstrap_maddrs = ["/ip4/127.0.0.1/tcp/1/p2p/QmX"]
    command = swarm.status_command("127.0.0.1:5000")
    bundle = tmp_path / "keys" / "nodes" / "status"
    assert command == (
        f"swarm-node status --swarm local --keys {bundle} --peer 127.0.0.1:5000 "
        "--initial-peers /ip4/127.0.0.1/tcp/1/p2p/QmX"
    )
    assert (bundle / "node.pem").exists()
    opts.insecure = True
    assert "--insecure" in LocalSwarm(opts).status_command()
