"""The gRPC server of a stage daemon: the Stage service, standard health checking and reflection."""

from __future__ import annotations

import asyncio
import socket

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from node.proto import stage_pb2 as pb
from node.proto import stage_pb2_grpc
from node.transport.channels import SERVER_OPTIONS
from node.transport.stage_rpc import add_stage_service


class StageServer:
    """Serves ``servicer`` on ``host:port``; ``address`` is what other stages dial. The gRPC server is made
    in :meth:`start`, inside the running event loop (an aio server belongs to the loop it was made in)."""

    def __init__(self, servicer: stage_pb2_grpc.StageServicer) -> None:
        self.servicer = servicer
        self.address = ""

    async def start(self, host: str, port: int, announce_host: str | None = None) -> str:
        """Binds and starts serving; returns the address to announce."""
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        add_stage_service(self.servicer, self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (pb.DESCRIPTOR.services_by_name["Stage"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        bound = self.server.add_insecure_port(f"{host}:{port}")
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
