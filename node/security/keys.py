"""The swarm authority and each node's credentials, made with ``cryptography`` (no hand-written crypto).

``swarm-node keys init DIR`` creates the authority:

- ``ca.pem`` / ``ca.key``: the swarm CA (EC P-256) that signs every node certificate;
- ``signing.key`` / ``signing.pub``: an RSA key that signs DHT access tokens (hivemind's token
  authorizer and record signatures are RSA only);
- ``swarm.secret``: 32 random bytes, the key of checkpoint-manifest HMACs.

``swarm-node keys issue DIR NAME`` makes a node's bundle (by default ``DIR/nodes/NAME``), which is all a
node needs (``run --keys BUNDLE``) and nothing that could issue more:

- ``node.pem`` / ``node.key``: the node certificate (CN and DNS SAN = NAME, server and client use) and
  its RSA-2048 key, which is also its DHT key;
- ``ca.pem``, ``signing.pub``, ``swarm.secret``;
- ``token``: the node's DHT access token (hivemind ``AccessToken``), signed by the authority.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import functools
import os
import pathlib
import re
import secrets
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
CA_DAYS, NODE_DAYS = 3650, 365
TOKEN_PREFIX = b"swarm-node-token-v1\0"


class CredentialsError(ValueError):
    """A missing, unreadable or inconsistent key file; the message names it."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: pathlib.Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise CredentialsError(f"{path}: {err.strerror or err}") from None


def _private_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, fmt, serialization.NoEncryption())


def _load_private(path: pathlib.Path):
    try:
        return _parsed_private_key(_read(path))
    except ValueError as err:
        raise CredentialsError(f"{path}: not a PEM private key ({err})") from None


def _load_cert(path: pathlib.Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as err:
        raise CredentialsError(f"{path}: not a PEM certificate ({err})") from None


def token_payload(name: str, public_key: bytes, expires: str) -> bytes:
    """What the authority signs in a DHT access token: everything but the signature, unambiguously."""
    return TOKEN_PREFIX + name.encode() + b"\0" + public_key + b"\0" + expires.encode()


def openssh_public(key: rsa.RSAPublicKey) -> bytes:
    """An RSA public key as hivemind writes it (``RSAPublicKey.to_bytes``: OpenSSH format)."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def init_authority(directory: pathlib.Path, name: str = "swarm-node") -> None:
    """Creates a new swarm authority in ``directory``; refuses to overwrite one."""
    if (directory / "ca.key").exists():
        raise CredentialsError(f"{directory} already holds a swarm authority (ca.key)")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} swarm CA")])
    usage = x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ca = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write(directory / "ca.key", _private_pem(ca_key), private=True)
    _write(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    _write(directory / "signing.key", _private_pem(signing), private=True)
    _write(directory / "signing.pub", openssh_public(signing.public_key()))
    _write(directory / "swarm.secret", secrets.token_bytes(32), private=True)


def issue_node(directory: pathlib.Path, name: str, out: pathlib.Path | None = None) -> pathlib.Path:
    """Issues node ``name``'s certificate, key and DHT token from the authority in ``directory``; returns the
    bundle directory."""
    if not NODE_NAME.match(name):
        raise CredentialsError(f"node name {name!r}: use lowercase letters, digits, '.' and '-' (at most 63)")
    ca_key, ca = _load_private(directory / "ca.key"), _load_cert(directory / "ca.pem")
    signing = _load_private(directory / "signing.key")
    secret = _read(directory / "swarm.secret")
    out = out or directory / "nodes" / name
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=NODE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    from hivemind.proto.auth_pb2 import AccessToken  # hivemind's own token message

    expires = cert.not_valid_after_utc.isoformat()
    public = openssh_public(key.public_key())
    token = AccessToken(username=name, public_key=public, expiration_time=expires)
    token.signature = _sign_token(signing, token_payload(name, public, expires))
    _write(out / "node.key", _private_pem(key), private=True)
    _write(out / "node.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.pem", _read(directory / "ca.pem"))
    _write(out / "signing.pub", _read(directory / "signing.pub"))
    _write(out / "swarm.secret", secret, private=True)
    _write(out / "token", token.SerializeToString(), private=True)
    return out


def _sign_token(signing: rsa.RSAPrivateKey, payload: bytes) -> bytes:
    """RSA-PSS-SHA256 in base64, as hivemind's ``RSAPrivateKey.sign`` (so its ``RSAPublicKey.verify`` checks it)."""
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = signing
    return key.sign(payload)


@dataclass(frozen=True)
class NodeCredentials:
    """A node's bundle, loaded and checked: its certificate was issued by the bundle's CA, its key matches
    its certificate, and its token names its key."""

    name: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    token: bytes  # a serialized hivemind AccessToken
    authority_public: bytes  # OpenSSH RSA public key that signs tokens
    secret: bytes

    @classmethod
    def load(cls, bundle: pathlib.Path) -> NodeCredentials:
        ca, cert = _load_cert(bundle / "ca.pem"), _load_cert(bundle / "node.pem")
        key = _load_private(bundle / "node.key")
        try:
            cert.verify_directly_issued_by(ca)
        except Exception:
            raise CredentialsError(f"{bundle / 'node.pem'} was not issued by {bundle / 'ca.pem'}") from None
        if not isinstance(key, rsa.RSAPrivateKey) or openssh_public(key.public_key()) != openssh_public(
            cert.public_key()  # type: ignore[arg-type]
        ):
            raise CredentialsError(f"{bundle / 'node.key'} is not the key of {bundle / 'node.pem'}")
        if not cert.not_valid_before_utc <= _now() <= cert.not_valid_after_utc:
            raise CredentialsError(f"{bundle / 'node.pem'} is not valid now ({cert.not_valid_after_utc:%Y-%m-%d})")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        creds = cls(
            name=str(names[0].value) if names else "",
            ca_pem=_read(bundle / "ca.pem"),
            cert_pem=_read(bundle / "node.pem"),
            key_pem=_read(bundle / "node.key"),
            token=_read(bundle / "token"),
            authority_public=_read(bundle / "signing.pub").strip(),
            secret=_read(bundle / "swarm.secret"),
        )
        if not NODE_NAME.match(creds.name):
            raise CredentialsError(f"{bundle / 'node.pem'} has no usable node name (CN)")
        return creds

    @cached_property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the node certificate (hex): what the node's DHT record is bound to."""
        return self.certificate.fingerprint(hashes.SHA256()).hex()

    def hivemind_key(self):
        """The node key as hivemind's ``RSAPrivateKey`` (it signs DHT requests and records)."""
        from hivemind.utils.crypto import RSAPrivateKey

        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key._private_key = _parsed_private_key(self.key_pem)
        return key


@functools.lru_cache(maxsize=8)
def _parsed_private_key(pem: bytes):
    """``pem`` parsed once per process: checking an RSA key on load costs about 50 ms, and a node needs its key
    in several places as it starts."""
    return serialization.load_pem_private_key(pem, None)


def ephemeral_swarm(directory: pathlib.Path, names: list[str]) -> dict[str, pathlib.Path]:
    """A throw-away authority and one bundle per name (``swarm-node local``): name -> bundle."""
    init_authority(directory)
    return {name: issue_node(directory, name) for name in names}
