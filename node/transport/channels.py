"""Channels to neighbour stages, with explicit message-size limits and keepalives (never unlimited)."""

from __future__ import annotations

import grpc

from node.security.tls import target_name_options
from node.transport.stage_rpc import StageClient
from node.wire.records import StageRecord
from node.wire.tensors import MAX_MESSAGE_BYTES

GRPC_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Fail fast and let the caller re-resolve the neighbour in the DHT, instead of gRPC's long backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # gRPC sets SO_REUSEPORT by default: a second daemon given the same --port would share it silently, and
    # the kernel would split its callers between the two; without it, the second bind fails with a clear error
    ("grpc.so_reuseport", 0),
]


class ChannelPool:
    """One ``grpc.aio`` channel per peer, reused across calls. With ``credentials`` (mutual TLS) each channel
    verifies that the server's certificate names the node its record says it is."""

    def __init__(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.credentials = credentials
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def _key(self, peer: StageRecord) -> tuple[str, str]:
        return peer.grpc_address, peer.node if self.credentials is not None else ""

    def stub(self, peer: StageRecord) -> StageClient:
        """A client of ``peer``'s Stage service."""
        key = self._key(peer)
        channel = self._channels.get(key)
        if channel is None:
            if self.credentials is None:
                channel = grpc.aio.insecure_channel(peer.grpc_address, options=GRPC_OPTIONS)
            else:
                options = GRPC_OPTIONS + target_name_options(peer.node)
                channel = grpc.aio.secure_channel(peer.grpc_address, self.credentials, options=options)
            self._channels[key] = channel
        return StageClient(channel)

    async def drop(self, peer: StageRecord) -> None:
        """Closes the channel to a peer that failed, so the next call reconnects (or goes elsewhere)."""
        channel = self._channels.pop(self._key(peer), None)
        if channel is not None:
            await channel.close(grace=None)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()
