"""The one way every swarm process joins the DHT (daemon, bootstrap node, ``status``, the local launcher)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import hivemind
from hivemind.proto import crypto_pb2

from node.dht.auth import DHTRejections, SwarmTokenAuthorizer, record_validators
from node.security.keys import NodeCredentials

logger = logging.getLogger(__name__)

_REJECTIONS: weakref.WeakKeyDictionary[hivemind.DHT, DHTRejections] = weakref.WeakKeyDictionary()


def make_dht(
    initial_peers: Sequence[str] | None,
    host_maddrs: Sequence[str] | None,
    credentials: NodeCredentials | None,
    client_mode: bool = False,
    relay: bool = False,
    **kw: Any,
) -> hivemind.DHT:
    """Starts a DHT node (waits until it is ready).

    Without ``credentials`` this is the plain, open DHT of insecure mode. With them, only token holders are
    answered (:class:`SwarmTokenAuthorizer`), only signed records bound to swarm certificates are kept
    (:func:`record_validators`), and a server's libp2p identity is the node key, so that its peer id is bound
    to its certificate (unless ``identity_path`` is given in ``kw``, as a bootstrap node does; a client-mode
    node keeps a random identity, so that ``status`` can run next to a node with the same bundle). The libp2p
    relay is off unless ``relay``. ``kw`` goes to ``hivemind.DHT`` (and on to ``P2P``). Raises what
    ``hivemind.DHT`` raises, e.g. ``RuntimeError`` when none of ``initial_peers`` answers.
    """
    args: dict[str, Any] = dict(start=True, await_ready=True, client_mode=client_mode, use_relay=relay)
    if host_maddrs is not None:
        args["host_maddrs"] = list(host_maddrs)
    args.update(kw)
    peers = list(initial_peers or [])
    if credentials is None:
        return hivemind.DHT(initial_peers=peers, **args)
    rejections = DHTRejections()
    args["authorizer"] = SwarmTokenAuthorizer(credentials, rejections)
    args["record_validators"] = [*record_validators(credentials, rejections), *args.get("record_validators", ())]
    with _identity(credentials, bind=not client_mode and "identity_path" not in args) as identity:
        if identity is not None:
            args.update(identity_path=str(identity), start=True, await_ready=True)  # p2pd reads it, then it goes
            # the same bundle restarted while its old p2pd lingers must not fail to start
            args.setdefault("check_if_identity_free", False)
        dht = hivemind.DHT(initial_peers=peers, **args)
    _REJECTIONS[dht] = rejections
    return dht


def dht_rejections(dht: hivemind.DHT) -> DHTRejections | None:
    """The rejection counters of a DHT made by :func:`make_dht` with credentials (None without)."""
    return _REJECTIONS.get(dht)


async def mirror_dht_rejections(dht: hivemind.DHT, counter: Any, stopping: asyncio.Event, period: float) -> None:
    """Mirrors the refusals the DHT's child process counts into ``counter`` (a labelled Prometheus counter:
    ``swarm_node_dht_rejected_total{kind}``) every ``period`` seconds, until ``stopping``."""
    counts = dht_rejections(dht)
    seen = {"request": 0, "record": 0}
    while counts is not None and not stopping.is_set():
        for kind, now in (("request", counts.requests), ("record", counts.records)):
            counter.labels(kind=kind).inc(now - seen[kind])
            seen[kind] = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), period)


@contextlib.contextmanager
def _identity(credentials: NodeCredentials, bind: bool) -> Iterator[pathlib.Path | None]:
    """A private temporary libp2p identity file holding the node key (removed once p2pd has read it)."""
    if not bind:
        yield None
        return
    key = credentials.hivemind_key()
    blob = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=key.to_bytes()).SerializeToString()
    with tempfile.TemporaryDirectory(prefix="swarm-node-id-") as tmp:
        path = pathlib.Path(tmp) / "identity.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        yield path
