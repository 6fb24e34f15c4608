"""The gRPC server of a stage daemon: the Stage service, standard health checking, and reflection when asked.

With credentials it listens with mutual TLS only (:mod:`node.security.tls`) and authorizes every Stage call
(:class:`node.security.authz.MemberInterceptor`); without, it listens in cleartext (``--insecure``). Either
way the server bounds what a caller can hold: concurrent calls, connection idle time and age, and how long
one call may run, so that stalled streams cannot pile up.
"""

from __future__ import annotations

import asyncio
import socket
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
    """What one caller can hold on a server."""

    max_concurrent_rpcs: int = 256  # beyond this a call is refused at once (RESOURCE_EXHAUSTED)
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


class DeadlineInterceptor(grpc.aio.ServerInterceptor):
    """Cuts off any call that runs longer than ``seconds`` (a client that opens a stream and never finishes
    it would otherwise hold a handler forever)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        seconds = self.seconds
        if handler.stream_unary:
            inner = handler.stream_unary

            async def stream_unary(requests, context):
                try:
                    async with asyncio.timeout(seconds):
                        return await inner(requests, context)
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"call ran past {seconds:.0f} s")

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
    ) -> None:
        self.servicer, self.credentials, self.limits = servicer, credentials, limits
        self.interceptors = (*interceptors, DeadlineInterceptor(limits.call_seconds))
        self.with_reflection = with_reflection
        self.address = ""

    async def start(self, host: str, port: int, announce_host: str | None = None) -> str:
        """Binds and starts serving; returns the address to announce."""
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
        if self.credentials is None:
            bound = self.server.add_insecure_port(where)
        else:
            bound = self.server.add_secure_port(where, self.credentials)
        if bound == 0:
            raise OSError(f"cannot bind gRPC server to {host}:{port}")
        public = announce_host or (host if host not in ("0.0.0.0", "::") else socket.gethostname())
        self.address = f"{public}:{bound}"
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
