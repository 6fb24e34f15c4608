"""DHT records: (de)serialization and refusal of malformed records; suspicions; peer choice."""

from types import SimpleNamespace

import pytest

from node.dht.directory import pick_peer
from node.wire.records import (
    MAX_STEP,
    RecordError,
    StageRecord,
    StageState,
    SuspicionRecord,
    owner_subkey,
    parse_stage_records,
    parse_suspicions,
    split_owner_subkey,
)


def _record(**kw) -> StageRecord:
    base = dict(
        stage=1,
        num_stages=4,
        peer_id="peerA",
        grpc_address="127.0.0.1:5000",
        state="online",
        committed_step=3,
        config_fingerprint="abc",
        version="0.1.0",
        pid=1234,
    )
    return StageRecord(**{**base, **kw})


def test_round_trip() -> None:
    r = _record()
    assert StageRecord.from_wire(r.to_wire()) == r


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "text",
        {},
        {"stage": -1},
        "stage=9",  # stage >= num_stages
        "address",
        "state",
        "extra",
        {"committed_step": MAX_STEP + 1},
        {"committed_step": 5.0},
        {"committed_step": "5"},
        {"stage": True},
        {"replica_step": 2**62},
        {"cert": "text, not bytes"},
        {"cert": b"x" * 5000},
        {"node": "n" * 200},
        {"last_recovery": {"method": "copy", "step": 1, "seconds": float("nan"), "sources": []}},
    ],
)
def test_malformed_records_are_refused(bad) -> None:
    wire = _record().to_wire()
    if bad == "stage=9":
        wire["stage"] = 9
    elif bad == "address":
        wire["grpc_address"] = "no-port"
    elif bad == "state":
        wire["state"] = "sleeping"
    elif bad == "extra":
        wire["evil"] = 1
    elif isinstance(bad, dict):
        wire = {**wire, **bad} if bad else bad
    else:
        wire = bad
    with pytest.raises(RecordError):
        StageRecord.from_wire(wire)


def test_parse_counts_malformed_and_checks_subkey() -> None:
    good = _record()
    raw = {"peerA": good.to_wire(), "peerB": {"junk": True}, "peerC": _record(peer_id="peerX").to_wire()}
    records, bad = parse_stage_records(raw)
    assert records == [good] and bad == 2


def test_pick_peer_prefers_serving_same_config_most_steps() -> None:
    rs = [
        _record(peer_id="a", committed_step=5),
        _record(peer_id="b", committed_step=7),
        _record(peer_id="c", committed_step=9, state=StageState.OFFLINE),
        _record(peer_id="d", committed_step=9, config_fingerprint="other"),
        _record(peer_id="e", stage=2),
    ]
    assert pick_peer(rs, 1, fingerprint="abc", num_stages=4).peer_id == "b"
    assert pick_peer(rs, 1, fingerprint="abc", num_stages=4, exclude=frozenset({"b"})).peer_id == "a"
    assert pick_peer(rs, 3, fingerprint="abc", num_stages=4) is None


def test_records_without_a_stage() -> None:
    assert _record(stage=None, state="spare").stage is None
    assert _record(stage=None, state="offline").stage is None  # a spare leaving
    for state in ("online", "waiting", "recovering", "joining"):
        with pytest.raises(ValueError):
            _record(stage=None, state=state)
    with pytest.raises(ValueError):
        _record(stage=2, state="spare")


def test_node_and_certificate() -> None:
    r = _record()
    assert r.node == "peerA" and r.cert is None  # insecure: the node is named by its peer id
    assert r.to_wire()["node"] == "peerA"
    signed = _record(node="node-a", cert=bytes(range(256)))
    assert StageRecord.from_wire(signed.to_wire()) == signed
    assert signed.to_wire()["cert"] == bytes(range(256))  # bytes on the wire (msgpack), not text
    assert "cert" not in signed.to_json() and signed.to_json()["node"] == "node-a"


def test_suspicions_parse_check_subkeys_and_expire() -> None:
    claim = SuspicionRecord(observer="obs", dead="dead")
    assert claim.node == "obs" and SuspicionRecord.from_wire(claim.to_wire()) == claim

    def item(value, expires=100.0):
        return SimpleNamespace(value=value, expiration_time=expires)

    raw = SimpleNamespace(
        value={
            "obs/dead": item(claim.to_wire()),
            "obs2/dead": item(SuspicionRecord(observer="obs2", dead="dead").to_wire()),
            "old/dead": item(SuspicionRecord(observer="old", dead="dead").to_wire(), expires=5.0),
            "obs/other": item(claim.to_wire()),  # subkey names another peer
            "x/y": item({"observer": "x", "dead": "y", "extra": 1}),
        }
    )
    claims, bad = parse_suspicions(raw, now=10.0)
    assert claims == {"dead": {"obs", "obs2"}} and bad == 2
    assert parse_suspicions(None) == ({}, 0) and parse_suspicions(SimpleNamespace(value=3)) == ({}, 1)


def test_owner_subkeys() -> None:
    key = b"ssh-rsa AAAAB3NzaC1yc2E="
    assert split_owner_subkey(owner_subkey(key)) == (key, None)
    assert split_owner_subkey(owner_subkey(key, "QmDead")) == (key, "QmDead")
    for bad in ("peerA", b"[owner:ssh-rsa AAAA]x", b"[owner:ssh-ed25519 AAAA]", owner_subkey(key, "a/b"), None):
        with pytest.raises(RecordError):
            split_owner_subkey(bad)
