"""The DHT with credentials, on real hivemind DHTs (127.0.0.1): outsiders cannot join or store, forged records
are ignored, members' records and suspicions round-trip; and insecure mode works as before."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from types import SimpleNamespace

import hivemind
import pytest
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from node.dht.auth import SwarmTokenAuthorizer, peer_id_of
from node.dht.directory import SwarmDirectory
from node.dht.factory import dht_rejections, make_dht
from node.security.keys import NodeCredentials, init_authority, issue_node, openssh_public
from node.status import read_swarm
from node.wire.records import StageRecord, SuspicionRecord, owner_subkey, stages_key, suspicions_key
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

LOCAL = ["/ip4/127.0.0.1/tcp/0"]
SWARM = "sec"


def record(peer_id: str, stage: int | None = 1, step: int = 3, state: str = "online", **kw) -> StageRecord:
    return StageRecord(
        stage=stage, num_stages=4, peer_id=peer_id, grpc_address="127.0.0.1:5000", state=state, committed_step=step,
        config_fingerprint="fp", version="0", **kw,
    )  # fmt: skip


def der(creds: NodeCredentials) -> bytes:
    return creds.certificate.public_bytes(serialization.Encoding.DER)


def pid(creds: NodeCredentials) -> str:
    return peer_id_of(creds.certificate.public_key())


def owner(creds: NodeCredentials, dead: str | None = None) -> bytes:
    return owner_subkey(openssh_public(creds.certificate.public_key()), dead)


def signed_by(creds: NodeCredentials, key: str, subkey, value: dict, expiration: float) -> bytes:
    """``value`` as ``creds``' DHT would send it under ``subkey``: msgpacked and signed with its key."""
    key_id, dumps = DHTID.generate(source=key).to_bytes(), MSGPackSerializer.dumps
    rec = DHTRecord(key_id, dumps(subkey), dumps(value), expiration)
    return RSASignatureValidator(creds.hivemind_key()).sign_value(rec)


async def raw_store(_dht, node, peer: str, key: str, subkey, value: bytes, expiration: float):
    """Runs in a DHT's child: asks ``peer`` directly to store crafted bytes (no local checks on the way)."""
    ok = await node.protocol.call_store(PeerID.from_base58(peer), [DHTID.generate(source=key)], [value], expiration,
                                        subkeys=[subkey])  # fmt: skip
    return None if ok is None else list(ok)


@contextlib.contextmanager
def started(*dhts: hivemind.DHT) -> Iterator[None]:
    try:
        yield
    finally:
        for dht in dhts:
            dht.shutdown()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> SimpleNamespace:
    root, rogue = tmp_path_factory.mktemp("authority"), tmp_path_factory.mktemp("rogue")
    init_authority(root)
    init_authority(rogue)
    nodes = {n: NodeCredentials.load(issue_node(root, n)) for n in ("a", "b", "m")}
    return SimpleNamespace(**nodes, x=NodeCredentials.load(issue_node(rogue, "x")))


@pytest.fixture(scope="module")
def swarm(bundles) -> Iterator[SimpleNamespace]:
    """Members a and b, and m: a member that runs hivemind without the swarm's record checks (it signs what it
    stores with its own key and checks nothing else), as a malicious member might."""
    a = make_dht(None, LOCAL, bundles.a)
    dhts = [a]
    with started(*dhts):
        maddrs = [str(m) for m in a.get_visible_maddrs()]
        dhts.append(b := make_dht(maddrs, LOCAL, bundles.b))
        m = hivemind.DHT(
            initial_peers=maddrs, host_maddrs=LOCAL, use_relay=False, start=True, await_ready=True,
            authorizer=SwarmTokenAuthorizer(bundles.m),
            record_validators=[RSASignatureValidator(bundles.m.hivemind_key())],
        )  # fmt: skip
        dhts.append(m)
        yield SimpleNamespace(
            a=a, b=b, m=m, maddrs=maddrs,
            da=SwarmDirectory(a, SWARM, bundles.a), db=SwarmDirectory(b, SWARM, bundles.b),
        )  # fmt: skip


def visible(swarm) -> dict[str, list[tuple[str, str, int]]]:
    """(node, peer id, step) of the stage records each member reads."""
    return {
        name: sorted((r.node, r.peer_id, r.committed_step) for r in d.records())
        for name, d in (("a", swarm.da), ("b", swarm.db))
    }


def test_member_records_round_trip(swarm, bundles) -> None:
    b_id = str(swarm.b.peer_id)
    assert b_id == pid(bundles.b)  # the DHT's identity is the node key, so its peer id is bound to its certificate
    assert swarm.db.own_peer_id == b_id
    assert swarm.db.announce(record(b_id, step=7), ttl=30)
    got = wait_for(lambda: [r for r in swarm.da.records() if r.peer_id == b_id], 10, "b's record at a")
    assert got[0].node == "b" and got[0].cert == der(bundles.b) and got[0].committed_step == 7
    # `status` joins as a client with a member's bundle (here a's, next to a's own DHT) and sees the same
    records, malformed = read_swarm(swarm.maddrs, SWARM, bundles.a)
    assert [r.node for r in records if r.peer_id == b_id] == ["b"] and malformed == 0
    # b cannot store a record for a, even through its own directory
    assert not swarm.db.announce(record(str(swarm.a.peer_id), stage=2), ttl=30)
    assert all(r.peer_id != str(swarm.a.peer_id) for r in swarm.da.records())


def test_outsiders_cannot_join_or_store(swarm, bundles) -> None:
    a_id = str(swarm.a.peer_id)
    for label, creds in (("no token", None), ("token of another authority", bundles.x)):
        with pytest.raises(RuntimeError, match="bootstrap"):
            make_dht(swarm.maddrs, LOCAL, creds)
        outsider = make_dht(swarm.maddrs, LOCAL, creds, ensure_bootstrap_success=False)
        with started(outsider):
            forged = record(f"QmOutsider{label[:2]}", stage=2, step=2**30)
            SwarmDirectory(outsider, SWARM).announce(forged, ttl=30)  # stored in its own storage only
            value = MSGPackSerializer.dumps(forged.to_wire())
            for key in (stages_key(SWARM), "anything"):
                call = functools.partial(raw_store, peer=a_id, key=key, subkey=forged.peer_id, value=value,
                                         expiration=get_dht_time() + 30)  # fmt: skip
                assert outsider.run_coroutine(call) is None, label  # a answers no request of an outsider
            assert swarm.a.get("anything") is None
    assert all("Outsider" not in r.peer_id for r in swarm.da.records())
    rejections = dht_rejections(swarm.a)
    assert rejections is not None and rejections.requests >= 4


def test_forged_records_are_ignored(swarm, bundles) -> None:
    b, m = bundles.b, bundles.m
    b_id, m_id = pid(b), pid(m)
    assert swarm.db.announce(record(b_id, stage=1, step=5), ttl=30)
    key, expiration = stages_key(SWARM), get_dht_time() + 30

    def wire(creds: NodeCredentials, **kw) -> dict:
        return record(pid(creds), stage=1, node=creds.name, cert=der(creds)).to_wire() | kw

    forgeries = [
        (owner(b), wire(b, committed_step=10**6)),  # b's subkey: m cannot sign for it
        (owner(m), wire(b, committed_step=10**6)),  # b's certificate under m's key
        (owner(m), wire(m, node="b", committed_step=10**6)),  # b's name, m's certificate
        (owner(m), wire(m, peer_id=b_id, committed_step=10**6)),  # b's peer id, m's certificate
        (owner(m), wire(m, committed_step=2**62)),  # a huge step
        (b_id, wire(m, peer_id=b_id, committed_step=10**6)),  # an unsigned record keyed by peer id
    ]
    for subkey, value in forgeries:
        if isinstance(subkey, bytes):  # (m's own storage cannot mix str and bytes subkeys under one key)
            swarm.m.store(key, value, expiration, subkey=subkey)
        # and straight to a, past anything m's own DHT might check
        call = functools.partial(raw_store, peer=str(swarm.a.peer_id), key=key, subkey=subkey,
                                 value=signed_by(m, key, subkey, value, expiration), expiration=expiration)  # fmt: skip
        assert swarm.m.run_coroutine(call) == [False], value
    claim = SuspicionRecord(observer=b_id, dead=str(swarm.a.peer_id), node="m", cert=der(m))
    swarm.m.store(suspicions_key(SWARM), claim.to_wire(), expiration, subkey=owner(m, claim.dead))
    # m's honest record is kept: the refusals above are about forgery, not about m
    assert swarm.m.store(key, wire(m, stage=2, committed_step=4), expiration, subkey=owner(m))
    expected = sorted([("b", b_id, 5), ("m", m_id, 4)])

    def settled() -> bool:
        seen = visible(swarm)
        return seen["a"] == seen["b"] == expected

    wait_for(settled, 15, "b's and m's records, and nothing else, at a and b")
    time.sleep(1.0)
    assert settled()
    assert swarm.da.suspicions().get(str(swarm.a.peer_id), set()) == set()
    rejections = dht_rejections(swarm.a)
    assert rejections is not None and rejections.records >= len(forgeries)


def test_suspicions_round_trip_and_expire(swarm) -> None:
    b_id, dead = str(swarm.b.peer_id), "QmDeadPeer"
    assert swarm.db.report_dead(record(b_id), dead, ttl=3)
    assert not swarm.db.report_dead(record(str(swarm.a.peer_id)), dead, ttl=3)  # only in its own name
    claims = wait_for(lambda: swarm.da.suspicions().get(dead), 5, "b's suspicion at a")
    assert claims == {b_id}
    records, suspicions = swarm.da.records_and_suspicions()
    assert suspicions[dead] == {b_id} and any(r.peer_id == b_id for r in records)
    wait_for(lambda: dead not in swarm.da.suspicions(), 10, "the suspicion to expire")


def test_insecure_mode_as_before() -> None:
    a = make_dht(None, LOCAL, None)
    with started(a):
        b = make_dht([str(x) for x in a.get_visible_maddrs()], LOCAL, None)
        with started(b):
            assert dht_rejections(a) is None
            da, db = SwarmDirectory(a, SWARM), SwarmDirectory(b, SWARM)
            b_id = str(b.peer_id)
            assert db.announce(record(b_id, step=9), ttl=30)
            # without credentials anyone may store any record, as before (a tombstone of another peer, too)
            assert db.announce(record("QmSomeoneElse", stage=2, state="offline"), ttl=30)
            wait_for(lambda: len(da.records()) == 2, 10, "both records at a")
            got = da.records()
            mine = next(r for r in got if r.peer_id == b_id)
            assert mine.node == b_id and mine.cert is None and mine.committed_step == 9
            a.store(stages_key(SWARM), {"junk": True}, get_dht_time() + 30, subkey="QmJunk")
            wait_for(lambda: len(da.records()) == 2 and da.malformed_seen > 0, 10, "the junk record counted")
            assert db.report_dead(record(b_id), "QmGone", ttl=2)
            records, suspicions = da.records_and_suspicions()
            assert suspicions == {"QmGone": {b_id}} and len(records) == 2
            time.sleep(2.5)
            assert da.suspicions() == {}
