"""DHT security without a DHT: access tokens, record signatures and their binding to swarm certificates."""

from __future__ import annotations

import dataclasses
import datetime
import pickle
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2, dht_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from node.dht.auth import (
    CertBinding,
    DHTRejections,
    SwarmRecordValidator,
    SwarmTokenAuthorizer,
    peer_id_of,
    record_validators,
    token_valid,
)
from node.security.keys import (
    CredentialsError,
    NodeCredentials,
    _sign_token,
    init_authority,
    issue_node,
    openssh_public,
    token_payload,
)
from node.wire.records import (
    RecordError,
    StageRecord,
    SuspicionRecord,
    owner_subkey,
    parse_stage_records,
    parse_suspicions,
)

KEY = DHTID.generate(source="swarm-node:t:stages").to_bytes()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> SimpleNamespace:
    """Bundles a, b, m of one authority; m and x of another (m: the same name, another CA)."""
    root = tmp_path_factory.mktemp("authority")
    rogue = tmp_path_factory.mktemp("rogue")
    init_authority(root)
    init_authority(rogue)
    nodes = {n: NodeCredentials.load(issue_node(root, n)) for n in ("a", "b", "m")}
    others = {n: NodeCredentials.load(issue_node(rogue, n)) for n in ("m", "x")}
    return SimpleNamespace(root=root, rogue=rogue, **nodes, rogue_m=others["m"], x=others["x"])


def der(creds: NodeCredentials) -> bytes:
    return creds.certificate.public_bytes(serialization.Encoding.DER)


def pid(creds: NodeCredentials) -> str:
    return peer_id_of(creds.certificate.public_key())


def owner(creds: NodeCredentials, dead: str | None = None) -> bytes:
    return owner_subkey(openssh_public(creds.certificate.public_key()), dead)


def stage_wire(creds: NodeCredentials, **kw) -> dict:
    base = dict(
        stage=1, num_stages=4, peer_id=pid(creds), grpc_address="127.0.0.1:5000", state="online", committed_step=3,
        config_fingerprint="fp", version="0", node=creds.name, cert=der(creds),
    )  # fmt: skip
    return StageRecord(**base).to_wire() | kw


def signed(signer: NodeCredentials, subkey, value, ttl: float = 10.0) -> DHTRecord:
    """A record as the signer's DHT would send it: msgpacked and signed by its validators."""
    record = DHTRecord(KEY, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), get_dht_time() + ttl)
    return dataclasses.replace(record, value=CompositeValidator(record_validators(signer)).sign_value(record))


def accepts(reader: NodeCredentials, record: DHTRecord) -> bool:
    return CompositeValidator(record_validators(reader)).validate(record)


# ---- tokens ---------------------------------------------------------------------------------------------
def make_token(authority_dir, name: str, public: bytes, expires: datetime.datetime | str) -> AccessToken:
    signing = serialization.load_pem_private_key((authority_dir / "signing.key").read_bytes(), None)
    exp = expires if isinstance(expires, str) else expires.isoformat()
    token = AccessToken(username=name, public_key=public, expiration_time=exp)
    token.signature = _sign_token(signing, token_payload(name, public, exp))
    return token


def authority(creds: NodeCredentials) -> RSAPublicKey:
    return RSAPublicKey.from_bytes(creds.authority_public)


def test_token_validity(swarm) -> None:
    a = swarm.a
    pub, now = openssh_public(a.certificate.public_key()), datetime.datetime.now(datetime.UTC)
    assert token_valid(AccessToken.FromString(a.token), authority(a))
    assert token_valid(make_token(swarm.root, "a", pub, now + datetime.timedelta(hours=1)), authority(a))
    expired = make_token(swarm.root, "a", pub, now - datetime.timedelta(seconds=1))
    assert not token_valid(expired, authority(a))
    naive = make_token(swarm.root, "a", pub, (now + datetime.timedelta(hours=1)).replace(tzinfo=None))
    assert not token_valid(naive, authority(a))
    assert not token_valid(make_token(swarm.root, "a", pub, "tomorrow"), authority(a))
    assert not token_valid(AccessToken.FromString(swarm.x.token), authority(a))  # another authority
    tampered = AccessToken.FromString(a.token)
    tampered.username = "b"
    assert not token_valid(tampered, authority(a))
    tampered = AccessToken.FromString(a.token)
    tampered.public_key = openssh_public(swarm.m.certificate.public_key())
    assert not token_valid(tampered, authority(a))
    assert not token_valid(AccessToken(), authority(a))
    assert not token_valid(AccessToken(username="a", public_key=b"junk", signature=b"x"), authority(a))


def test_authorizer_refuses_unusable_credentials(swarm) -> None:
    SwarmTokenAuthorizer(swarm.a)
    with pytest.raises(CredentialsError, match="token"):
        SwarmTokenAuthorizer(dataclasses.replace(swarm.a, token=swarm.x.token))  # another authority's token
    with pytest.raises(CredentialsError, match="another key"):
        SwarmTokenAuthorizer(dataclasses.replace(swarm.a, token=swarm.b.token))  # b's token, a's key
    pub = openssh_public(swarm.a.certificate.public_key())
    expired = make_token(swarm.root, "a", pub, datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    with pytest.raises(CredentialsError):
        SwarmTokenAuthorizer(dataclasses.replace(swarm.a, token=expired.SerializeToString()))


class Thief(TokenAuthorizerBase):
    """Signs requests with any key and any token (a stolen one, or one of another authority)."""

    def __init__(self, key: RSAPrivateKey, token: AccessToken) -> None:
        super().__init__(key)
        self.token = token

    async def get_token(self) -> AccessToken:
        return self.token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return True

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False


async def test_requests_need_a_token_of_the_authority_and_its_key(swarm) -> None:
    rejections = DHTRejections()
    server = SwarmTokenAuthorizer(swarm.a, rejections)

    async def accepted(client: TokenAuthorizerBase) -> bool:
        request = dht_pb2.PingRequest(validate=False)
        await client.sign_request(request, None)
        return await server.validate_request(request)

    assert await accepted(SwarmTokenAuthorizer(swarm.b))
    assert not await accepted(Thief(RSAPrivateKey(), AccessToken.FromString(swarm.b.token)))  # token without key
    assert not await accepted(Thief(swarm.x.hivemind_key(), AccessToken.FromString(swarm.x.token)))  # rogue CA
    assert not await accepted(Thief(RSAPrivateKey(), AccessToken()))  # no token
    assert rejections.requests == 3

    replayed = dht_pb2.PingRequest()
    await SwarmTokenAuthorizer(swarm.b).sign_request(replayed, None)
    assert await server.validate_request(dht_pb2.PingRequest.FromString(replayed.SerializeToString()))
    assert not await server.validate_request(replayed)
    assert rejections.requests == 4


def test_peer_id_of_matches_the_libp2p_identity(swarm) -> None:
    blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=swarm.a.hivemind_key().to_bytes()).SerializeToString()
    assert peer_id_of(swarm.a.certificate.public_key()) == PeerID.from_identity(blob).to_base58()


# ---- records --------------------------------------------------------------------------------------------
def test_own_records_are_accepted(swarm) -> None:
    b = swarm.b
    assert accepts(swarm.a, signed(b, owner(b), stage_wire(b)))
    spare = stage_wire(b, stage=None, state="spare")
    assert accepts(swarm.a, signed(b, owner(b), spare))
    claim = SuspicionRecord(observer=pid(b), dead="QmDead", node="b", cert=der(b)).to_wire()
    assert accepts(swarm.a, signed(b, owner(b, "QmDead"), claim))


def test_forged_records_are_refused(swarm) -> None:
    a, b, m = swarm.a, swarm.b, swarm.m
    refused = {
        "b's subkey (m cannot sign it)": signed(m, owner(b), stage_wire(b)),
        "b's certificate under m's key": signed(m, owner(m), stage_wire(b)),
        "b's name with m's certificate": signed(m, owner(m), stage_wire(m, node="b")),
        "b's peer id with m's certificate": signed(m, owner(m), stage_wire(m, peer_id=pid(b))),
        "a certificate of another CA": signed(swarm.rogue_m, owner(swarm.rogue_m), stage_wire(swarm.rogue_m)),
        "no certificate": signed(m, owner(m), stage_wire(m, cert=None)),
        "unsigned, keyed by peer id": signed(m, pid(m), stage_wire(m)),
        "huge step": signed(m, owner(m), stage_wire(m, committed_step=2**62)),
        "huge replica step": signed(m, owner(m), stage_wire(m, replica_step=2**41)),
        "float step": signed(m, owner(m), stage_wire(m, committed_step=5.0)),
        "unknown field": signed(m, owner(m), stage_wire(m, evil=1)),
        "not a mapping": signed(m, owner(m), [1, 2]),
        "lives two hours": signed(m, owner(m), stage_wire(m), ttl=7200),
        "a suspicion under a stage subkey": signed(
            m, owner(m), SuspicionRecord(observer=pid(m), dead="QmX", node="m", cert=der(m)).to_wire()
        ),
        "a stage record under a suspicion subkey": signed(m, owner(m, "QmX"), stage_wire(m)),
        "a suspicion for another peer than its subkey": signed(
            m, owner(m, "QmY"), SuspicionRecord(observer=pid(m), dead="QmX", node="m", cert=der(m)).to_wire()
        ),
        "a suspicion in b's name": signed(
            m, owner(m, "QmX"), SuspicionRecord(observer=pid(b), dead="QmX", node="m", cert=der(m)).to_wire()
        ),
    }
    assert [what for what, record in refused.items() if accepts(a, record)] == []
    tampered = signed(m, owner(m), stage_wire(m))
    value = tampered.value.replace(b"online", b"spare\x00\x00")
    assert value != tampered.value and not accepts(a, dataclasses.replace(tampered, value=value))
    assert accepts(a, signed(m, owner(m), stage_wire(m)))  # m's honest record


def test_validator_pickles_and_counts(swarm) -> None:
    rejections = DHTRejections()
    validator = SwarmRecordValidator(swarm.a.ca_pem, rejections)
    copy = pickle.loads(pickle.dumps(validator))
    dumps = MSGPackSerializer.dumps
    good = DHTRecord(KEY, dumps(owner(swarm.b)), dumps(stage_wire(swarm.b)), get_dht_time() + 5)
    bad = dataclasses.replace(good, subkey=dumps(owner(swarm.m)))
    assert validator.validate(good) and copy.validate(good)
    assert not validator.validate(bad) and not copy.validate(bad)
    assert rejections.records == 1  # the copy has no counter (it travels by fork only)


def test_parse_checks_the_binding(swarm) -> None:
    b, m = swarm.b, swarm.m
    check = CertBinding(b.ca_pem).check
    good = StageRecord.from_wire(stage_wire(b))
    raw = {owner(b): stage_wire(b), owner(m): stage_wire(b), pid(m): stage_wire(m), b"junk": {"x": 1}}
    records, bad = parse_stage_records(raw, check)
    assert records == [good] and bad == 3
    assert parse_stage_records({owner(b): stage_wire(b)}) == ([], 1)  # the insecure check wants peer-id subkeys
    claim = SuspicionRecord(observer=pid(b), dead="QmD", node="b", cert=der(b))
    claims, bad = parse_suspicions({owner(b, "QmD"): claim.to_wire(), owner(m, "QmD"): claim.to_wire()}, check)
    assert claims == {"QmD": {pid(b)}} and bad == 1
    with pytest.raises(RecordError):
        check(owner(b), StageRecord.from_wire(stage_wire(b, cert=der(m))))
