"""The gRPC server of a stage daemon: the Stage service, standard health checking, and reflection when asked.

With credentials it listens with mutual TLS only (:mod:`node.security.tls`) and authorizes every Stage call
(:class:`node.security.authz.MemberInterceptor`); without, it listens in cleartext (``--insecure``). Either
way the server bounds what a caller can hold (:class:`ServerLimits`): concurrent streams per connection,
per caller and in all, the pace of a stream's messages, how long one call may run, and connection idle
time and age, so that stalled streams cannot pile up or starve heartbeats and the commit.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from node.proto import stage_pb2 as pb
from node.proto import stage_pb2_grpc
from node.transport.channels import SERVER_OPTIONS
from node.transport.stage_rpc import add_stage_service


@dataclass(frozen=True)
class ServerLimits:
    """What callers can hold on a server. Client streams (Forward, Backward, PushReplica) are the calls that can
    hold memory, so they have caps of their own, per connection, per caller (certificate name, or address
    without TLS) and in all; unary calls (heartbeats, the commit's control calls) are not counted against them,
    so stalled streams never starve the calls that keep the swarm alive."""

    max_concurrent_rpcs: int = 1024  # gRPC's own cap on all calls: beyond it a call is refused at once
    max_streams: int = 192  # client streams in flight, all callers together
    streams_per_caller: int = 64  # client streams in flight from one caller, over all its connections
    streams_per_connection: int = 32  # client streams in flight on one connection
    message_idle_seconds: float = 15.0  # a client stream that sends no message for this long is cut off
    call_seconds: float = 180.0  # a call (a tensor stream included) still running after this is cut off
    idle_seconds: float = 300.0  # a connection without calls is closed after this
    max_age_seconds: float = 3600.0  # connections are recycled after this (with a grace period)

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_connection_idle_ms", int(self.idle_seconds * 1000)),
            ("grpc.max_connection_age_ms", int(self.max_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", 30_000),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]


class StreamStalled(Exception):
    """A client stream sent nothing for longer than its idle limit."""


async def _paced(requests: AsyncIterator, seconds: float) -> AsyncIterator:
    """``requests``, cut off when the next message takes longer than ``seconds`` to arrive."""
    it = aiter(requests)
    while True:
        try:
            async with asyncio.timeout(seconds):
                item = await anext(it)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise StreamStalled(f"no message for {seconds:.0f} s") from None
        yield item


def caller_of(context: grpc.aio.ServicerContext) -> tuple[str, str]:
    """(caller, connection): the name in the client certificate (its address without TLS), and the connection."""
    peer = context.peer() or "unknown"
    names = context.auth_context().get("x509_common_name") or []
    caller = names[0].decode(errors="replace") if names else peer.rsplit(":", 1)[0]
    return caller, peer


class CallLimits(grpc.aio.ServerInterceptor):
    """Applies :class:`ServerLimits` to every call: client streams within their caps and paced, and every call
    within ``call_seconds``. A refusal or cut-off is reported as ``on_refused(reason, text)``, reason ``busy``
    (``RESOURCE_EXHAUSTED``) or ``stalled`` (``DEADLINE_EXCEEDED``)."""

    def __init__(self, limits: ServerLimits, on_refused: Callable[[str, str], None] = lambda reason, text: None):
        self.limits, self.on_refused = limits, on_refused
        self.streams: Counter[str] = Counter()  # "*", "caller:<name>", "connection:<peer>" -> streams in flight

    def _admit(self, context: grpc.aio.ServicerContext) -> tuple[list[str], str | None]:
        caller, connection = caller_of(context)
        lim = self.limits
        keys = [("*", lim.max_streams), (f"caller:{caller}", lim.streams_per_caller)]
        keys.append((f"connection:{connection}", lim.streams_per_connection))
        for key, cap in keys:
            if self.streams[key] >= cap:
                return [], f"{self.streams[key]} streams in flight ({key.split(':')[0]} limit {cap})"
        for key, _ in keys:
            self.streams[key] += 1
        return [key for key, _ in keys], None

    def _release(self, keys: list[str]) -> None:
        for key in keys:
            self.streams[key] -= 1
            if not self.streams[key]:
                del self.streams[key]

    async def _refuse(self, context, code: grpc.StatusCode, reason: str, text: str) -> None:
        self.on_refused(reason, text)
        await context.abort(code, f"{reason}: {text}")

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        seconds, idle = self.limits.call_seconds, self.limits.message_idle_seconds
        if handler.stream_unary:
            inner = handler.stream_unary

            async def stream_unary(requests, context):
                keys, refusal = self._admit(context)
                if refusal is not None:
                    await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", refusal)
                try:
                    async with asyncio.timeout(seconds):
                        return await inner(_paced(requests, idle), context)
                except TimeoutError:
                    await self._refuse(
                        context, grpc.StatusCode.DEADLINE_EXCEEDED, "stalled", f"ran past {seconds:.0f} s"
                    )
                except StreamStalled as err:
                    await self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED, "stalled", str(err))
                finally:
                    self._release(keys)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    async with asyncio.timeout(seconds):
                        return await inner_uu(request, context)
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"call ran past {seconds:.0f} s")

            return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
        return handler  # server streams end when the client stops reading: the idle limit and keepalive cover them


class StageServer:
    """Serves ``servicer`` on ``host:port``; ``address`` is what other stages dial. The gRPC server is made
    in :meth:`start`, inside the running event loop (an aio server belongs to the loop it was made in)."""

    def __init__(
        self,
        servicer: stage_pb2_grpc.StageServicer,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
        limits: ServerLimits = ServerLimits(),
        with_reflection: bool = False,
        on_refused: Callable[[str, str], None] = lambda reason, text: None,
    ) -> None:
        self.servicer, self.credentials, self.limits = servicer, credentials, limits
        self.limiter = CallLimits(limits, on_refused)
        self.interceptors = (*interceptors, self.limiter)
        self.with_reflection = with_reflection
        self.address = ""

    async def start(
        self, host: str, port: int, announce_host: str | None = None, announce_port: int | None = None
    ) -> str:
        """Binds and starts serving; returns the address to announce: ``announce_host`` (else ``host``, else
        this machine's name) and ``announce_port`` (else the bound port), as a NAT, a container's port mapping
        or a proxy in front of the node has it."""
        self.server = grpc.aio.server(
            options=SERVER_OPTIONS + self.limits.options(),
            interceptors=self.interceptors,
            maximum_concurrent_rpcs=self.limits.max_concurrent_rpcs,
        )
        add_stage_service(self.servicer, self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.with_reflection:
            names = (pb.DESCRIPTOR.services_by_name["Stage"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        where = f"{host}:{port}"
        try:
            if self.credentials is None:
                bound = self.server.add_insecure_port(where)
            else:
                bound = self.server.add_secure_port(where, self.credentials)
        except RuntimeError:  # grpcio raises where older versions returned 0
            bound = 0
        if bound == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")
        public = announce_host or (host if host not in ("0.0.0.0", "::") else socket.gethostname())
        self.address = f"{public}:{announce_port or bound}"
        await self.server.start()
        await self.set_serving(True)
        return self.address

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        result = self.health.set("", status)
        if asyncio.iscoroutine(result):
            await result

    async def stop(self, grace: float = 1.0) -> None:
        await self.server.stop(grace=grace)
