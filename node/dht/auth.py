"""DHT security with a node's credentials: who may talk to the DHT, and which records it keeps.

- **Access tokens.** :class:`SwarmTokenAuthorizer` is hivemind's ``TokenAuthorizerBase`` with tokens that the
  swarm authority signed (:func:`node.security.keys.token_payload`). Every DHT request and response is signed
  with the node key its token names; a peer without a valid token gets no answer and its requests are refused.
- **Signed records.** hivemind's ``RSASignatureValidator`` makes a record whose subkey holds
  ``[owner:<key>]`` writable by that key only. :class:`SwarmRecordValidator` then requires that every record
  is such a record, that it is a well-formed stage or suspicion record, and that it carries a certificate of
  the swarm CA for that very key, whose CN is the record's ``node`` and whose key gives the record's peer id
  (the DHT's libp2p identity is the node key, see :mod:`node.dht.factory`). So a member writes its own records
  only, under its own name and peer id.

Both run in the DHT's child process (hivemind forks it); rejections are counted in shared memory
(:class:`DHTRejections`) so that the parent can export them.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import multiprocessing as mp
from dataclasses import dataclass
from typing import Any

import base58
import multihash
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.proto import crypto_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPublicKey

from node.security.keys import NODE_NAME, CredentialsError, NodeCredentials, token_payload
from node.wire.records import RecordError, StageRecord, SuspicionRecord, split_owner_subkey

logger = logging.getLogger(__name__)

MAX_RECORD_TTL = 3600.0  # seconds: a record stored to live longer is refused (a dead node's record must expire)
_CACHE_SIZE = 1024


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def openssh(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def peer_id_of(key: rsa.RSAPublicKey) -> str:
    """The libp2p peer id (base58) of a DHT whose identity is RSA key ``key`` (as ``PeerID.from_identity``)."""
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=spki).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


# ---- rejection counters ---------------------------------------------------------------------------------
class DHTRejections:
    """Counts of refused DHT requests/responses (no or bad token, bad request signature, replays) and refused
    records, shared with the DHT's child process: make it before the DHT starts (forks)."""

    def __init__(self) -> None:
        ctx = mp.get_context("fork")
        self._requests = ctx.Value("Q", 0)
        self._records = ctx.Value("Q", 0)

    @property
    def requests(self) -> int:
        return int(self._requests.value)

    @property
    def records(self) -> int:
        return int(self._records.value)

    def count_request(self) -> None:
        with self._requests.get_lock():
            self._requests.value += 1

    def count_record(self) -> None:
        with self._records.get_lock():
            self._records.value += 1


# ---- access tokens ----------------------------------------------------------------------------------------
def token_expiry(token: AccessToken) -> datetime.datetime | None:
    """The token's expiry (timezone-aware), or None if it has none that parses."""
    try:
        expires = datetime.datetime.fromisoformat(token.expiration_time)
    except (TypeError, ValueError):
        return None
    return expires if expires.tzinfo is not None else None


def token_valid(token: AccessToken, authority: RSAPublicKey, now: datetime.datetime | None = None) -> bool:
    """Whether ``token`` was signed by the swarm authority, names a node and an RSA key, and has not expired.
    Never raises."""
    try:
        if not NODE_NAME.match(token.username):
            return False
        payload = token_payload(token.username, token.public_key, token.expiration_time)
        if not authority.verify(payload, token.signature):
            return False
        RSAPublicKey.from_bytes(token.public_key)
    except Exception:
        return False
    expires = token_expiry(token)
    return expires is not None and (now or _now()) < expires


class SwarmTokenAuthorizer(TokenAuthorizerBase):
    """hivemind's token protocol with the swarm authority's tokens; refusals are counted in ``rejections``."""

    def __init__(self, credentials: NodeCredentials, rejections: DHTRejections | None = None) -> None:
        key = credentials.hivemind_key()
        super().__init__(key)
        self._token = AccessToken.FromString(credentials.token)
        self._authority = RSAPublicKey.from_bytes(credentials.authority_public)
        self._rejections = rejections
        self._valid: dict[bytes, datetime.datetime] = {}  # serialized token -> expiry, for tokens found valid
        if not token_valid(self._token, self._authority):
            raise CredentialsError(f"node {credentials.name}: its DHT token is expired or not signed by the authority")
        if self._token.public_key != key.get_public_key().to_bytes():
            raise CredentialsError(f"node {credentials.name}: its DHT token names another key than node.key")

    async def get_token(self) -> AccessToken:
        return self._token

    def is_token_valid(self, access_token: AccessToken) -> bool:
        blob = access_token.SerializeToString()
        expires = self._valid.get(blob)
        if expires is not None:
            return _now() < expires
        if not token_valid(access_token, self._authority):
            return False
        if len(self._valid) >= _CACHE_SIZE:
            self._valid.clear()
        self._valid[blob] = token_expiry(access_token)  # type: ignore[assignment]  # valid: it has one
        return True

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        # Our token lives as long as the certificate and cannot be renewed from here: once it expires, the
        # node is out of the swarm (hivemind then fails every request it signs).
        return not self.is_token_valid(access_token)

    async def validate_request(self, request: Any) -> bool:
        ok = await super().validate_request(request)
        if not ok and self._rejections is not None:
            self._rejections.count_request()
        return ok

    async def validate_response(self, response: Any, request: Any) -> bool:
        ok = await super().validate_response(response, request)
        if not ok and self._rejections is not None:
            self._rejections.count_request()
        return ok


# ---- records bound to certificates ------------------------------------------------------------------------
@dataclass(frozen=True)
class CertInfo:
    """What a swarm certificate says about its node."""

    public_key: bytes  # OpenSSH
    name: str  # CN
    peer_id: str  # the libp2p peer id of a DHT with this key as its identity
    not_before: datetime.datetime
    not_after: datetime.datetime


class CertBinding:
    """Checks that a record belongs to the swarm certificate it carries and to its subkey: the certificate was
    issued by the swarm CA and is valid now, its key is the ``[owner:...]`` key of the subkey, its CN is the
    record's ``node`` and its key's peer id is the record's peer id (a suspicion: its observer)."""

    def __init__(self, ca_pem: bytes) -> None:
        self.ca_pem = ca_pem
        self._ca = x509.load_pem_x509_certificate(ca_pem)
        self._certs: dict[bytes, CertInfo] = {}  # DER -> info, for certificates the CA issued

    def __getstate__(self) -> dict[str, Any]:
        return {"ca_pem": self.ca_pem}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["ca_pem"])  # type: ignore[misc]

    def cert_info(self, der: bytes) -> CertInfo:
        """The certificate's identity if the swarm CA issued it (any time); :class:`RecordError` otherwise."""
        info = self._certs.get(der)
        if info is not None:
            return info
        try:
            cert = x509.load_der_x509_certificate(der)
            cert.verify_directly_issued_by(self._ca)
            key = cert.public_key()
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except Exception as err:
            raise RecordError(f"certificate not issued by the swarm CA ({type(err).__name__})") from None
        if not isinstance(key, rsa.RSAPublicKey) or len(names) != 1:
            raise RecordError("certificate has no RSA key or no single CN")
        info = CertInfo(openssh(key), str(names[0].value), peer_id_of(key), cert.not_valid_before_utc,
                        cert.not_valid_after_utc)  # fmt: skip
        if len(self._certs) >= _CACHE_SIZE:
            self._certs.clear()
        self._certs[der] = info
        return info

    def check(self, subkey: Any, record: StageRecord | SuspicionRecord) -> None:
        """Raises :class:`RecordError` unless ``record`` may live under ``subkey`` (see the class)."""
        owner, dead = split_owner_subkey(subkey)
        if isinstance(record, SuspicionRecord):
            if dead != record.dead:
                raise RecordError("a suspicion's subkey must be [owner:...]/<dead peer id>")
            peer_id = record.observer
        elif dead is not None:
            raise RecordError("a stage record's subkey must be [owner:...] alone")
        else:
            peer_id = record.peer_id
        if record.cert is None:
            raise RecordError("record carries no certificate")
        info = self.cert_info(record.cert)
        if not info.not_before <= _now() <= info.not_after:
            raise RecordError(f"certificate of {info.name} is not valid now")
        if info.public_key != owner:
            raise RecordError(f"certificate of {info.name} is not the subkey's owner")
        if info.name != record.node:
            raise RecordError(f"record names node {record.node!r}, its certificate {info.name!r}")
        if info.peer_id != peer_id:
            raise RecordError(f"record names peer {peer_id!r}, the key of {info.name} is peer {info.peer_id!r}")


def parse_record(value: Any) -> StageRecord | SuspicionRecord:
    """A DHT value as a stage or a suspicion record (a suspicion names a ``dead`` peer)."""
    if isinstance(value, dict) and "dead" in value:
        return SuspicionRecord.from_wire(value)
    return StageRecord.from_wire(value)


class SwarmRecordValidator(RecordValidatorBase):
    """Keeps only swarm records: signed (an ``[owner:...]`` subkey; hivemind's ``RSASignatureValidator``, which
    runs first, checks the signature), well formed, bound to their certificate (:class:`CertBinding`), and
    expiring within ``max_ttl`` seconds. It knows no swarm name, so a bootstrap node applies it too."""

    def __init__(self, ca_pem: bytes, rejections: DHTRejections | None = None, max_ttl: float = MAX_RECORD_TTL) -> None:
        self.binding = CertBinding(ca_pem)
        self.max_ttl = max_ttl
        self._rejections = rejections

    def __getstate__(self) -> dict[str, Any]:  # the shared counter travels by fork only, never by pickle
        return {"binding": self.binding, "max_ttl": self.max_ttl, "_rejections": None}

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator (10): sees the value after its signature was checked and stripped

    def validate(self, record: DHTRecord) -> bool:
        try:
            self.check(record)
        except RecordError as err:
            logger.debug("refused a DHT record: %s", err)
            if self._rejections is not None:
                self._rejections.count_record()
            return False
        return True

    def check(self, record: DHTRecord) -> StageRecord | SuspicionRecord:
        """The record's content if it may be kept; :class:`RecordError` otherwise."""
        if record.expiration_time > get_dht_time() + self.max_ttl:
            raise RecordError(f"record expires more than {self.max_ttl:.0f} s from now")
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception:
            raise RecordError("subkey or value is not msgpack") from None
        parsed = parse_record(value)
        self.binding.check(subkey, parsed)
        return parsed


def record_validators(credentials: NodeCredentials, rejections: DHTRejections | None = None) -> list:
    """The DHT's record validators for a node with ``credentials``: hivemind's signature check with the node
    key (which also signs this node's records) and :class:`SwarmRecordValidator`."""
    return [RSASignatureValidator(credentials.hivemind_key()), SwarmRecordValidator(credentials.ca_pem, rejections)]
