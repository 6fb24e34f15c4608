"""DHT records: (de)serialization and refusal of malformed records; peer choice."""

import pytest

from node.dht.directory import pick_peer
from node.wire.records import RecordError, StageRecord, StageState, parse_stage_records


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
