"""Mutual TLS for the Stage service: every server requires a client certificate from the swarm CA, and every
client checks that the server's certificate names the node its DHT record says it is.

A caller without a swarm certificate never gets as far as a call: its TLS handshake fails inside gRPC's core,
which has no hook for that. :class:`HandshakeLedger` counts those refusals anyway: gRPC asks the server's
certificate fetcher once per incoming connection (before the handshake), and the membership interceptor sees
each connection that completed its handshake (its first call); a handshake that no authenticated connection
matches within ``HANDSHAKE_GRACE_SECONDS`` was refused. Each authenticated connection cancels the oldest
pending handshake, so the count is right in total though not tied to one address; a member that connects
but makes no call within the grace period is counted as refused too (gRPC clients connect to call).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import grpc

from node.security.keys import NodeCredentials

TARGET_NAME_OPTION = "grpc.ssl_target_name_override"


HANDSHAKE_GRACE_SECONDS = 10.0  # a handshake with no authenticated call on its connection by then was refused
MAX_TRACKED = 4096  # connections and pending handshakes remembered (older ones are forgotten)


def server_credentials(creds: NodeCredentials, ledger: HandshakeLedger | None = None) -> grpc.ServerCredentials:
    """Server side: this node's certificate, and client certificates required and checked against the CA;
    with ``ledger``, every incoming connection is counted as a handshake."""
    if ledger is None:
        return grpc.ssl_server_credentials(
            [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem, require_client_auth=True
        )
    config = grpc.ssl_server_certificate_configuration([(creds.key_pem, creds.cert_pem)], creds.ca_pem)

    def fetch() -> None:  # once per incoming connection; None keeps the configuration
        ledger.handshake()

    return grpc.dynamic_ssl_server_credentials(config, fetch, require_client_authentication=True)


class HandshakeLedger:
    """Counts TLS handshakes that never became an authenticated connection (see the module docstring);
    ``on_refused(n)`` is told of every ``n`` newly found refused."""

    def __init__(
        self,
        on_refused: Callable[[int], None],
        grace: float = HANDSHAKE_GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_refused, self.grace, self.clock = on_refused, grace, clock
        self._pending: collections.deque[float] = collections.deque(maxlen=MAX_TRACKED)  # handshake times
        self._connections: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()  # the fetcher runs on one of gRPC's threads, the interceptor on the loop
        self.refused = 0

    def handshake(self) -> None:
        """An incoming connection is about to handshake (gRPC's certificate fetcher; any thread)."""
        with self._lock:
            self._pending.append(self.clock())
        self.sweep()

    def authenticated(self, peer: str) -> None:
        """A call on connection ``peer`` (``context.peer()``) passed the handshake with a swarm certificate."""
        with self._lock:
            if peer in self._connections:
                self._connections.move_to_end(peer)
            else:
                self._connections[peer] = None
                if len(self._connections) > MAX_TRACKED:
                    self._connections.popitem(last=False)
                if self._pending:
                    self._pending.popleft()
        self.sweep()

    def sweep(self) -> None:
        """Counts the pending handshakes older than the grace period as refused."""
        cutoff, n = self.clock() - self.grace, 0
        with self._lock:
            while self._pending and self._pending[0] < cutoff:
                self._pending.popleft()
                n += 1
            self.refused += n
        if n:
            self.on_refused(n)


def channel_credentials(creds: NodeCredentials) -> grpc.ChannelCredentials:
    """Client side: trust only the swarm CA, and present this node's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem, private_key=creds.key_pem, certificate_chain=creds.cert_pem
    )


def target_name_options(node: str) -> list[tuple[str, str]]:
    """Dial an address but verify the server as ``node`` (certificates name nodes, not addresses)."""
    return [(TARGET_NAME_OPTION, node)]
