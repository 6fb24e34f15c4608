"""Who may call what: the per-RPC rules of the Stage service, and the server interceptor that applies them.

A caller is the node named by its client certificate (mutual TLS has already proved it holds a key the
swarm CA certified). What it may call depends on what the DHT says it is:

A node handing its stage over after a notice keeps its rights until its successor serves the stage: it
finishes the step in flight.

- control RPCs (Prepare, Commit, Abort, Rollback, PushReplica): only the current stage 0;
- Forward and Backward: only a stage that some microbatch route makes this stage's neighbour;
- FetchWeights and FetchReplica: only a node that is rebuilding or taking over a stage;
- ParkState: only a node handing over a route neighbour's stage, or one serving a stage whose neighbour
  snapshots this stage holds (``--recovery ladder``);
- PushGradients: only another replica of this node's stage;
- Heartbeat, GetStatus (also with the swarm view, for ``swarm-node status --peer``), ExportWeights (the
  committed weights, for ``swarm-node export`` from a live swarm: members are trusted with the model) and the
  health service: any member.

The rules are a pure function (:func:`decide`) over plain records; the interceptor only maps the
certificate to a name, asks, and turns a refusal into ``UNAUTHENTICATED`` or ``PERMISSION_DENIED``.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc

from node.topology import route_for, snapshot_holder
from node.wire.records import CLAIMING_STATES, SPEAKING_STATES, StageRecord, StageState, current_epochs

SERVICE_PREFIX = "/swarm_node.v1.Stage/"


class Role(enum.StrEnum):
    CONTROL = "control"
    PIPELINE = "pipeline"
    FETCH = "fetch"
    MEMBER = "member"
    PARK = "park"
    REPLICA = "replica"


RPC_ROLES: dict[str, Role] = {
    "Prepare": Role.CONTROL,
    "Commit": Role.CONTROL,
    "Abort": Role.CONTROL,
    "Rollback": Role.CONTROL,
    "PushReplica": Role.CONTROL,
    "ParkState": Role.PARK,
    "PushGradients": Role.REPLICA,
    "Forward": Role.PIPELINE,
    "Backward": Role.PIPELINE,
    "FetchWeights": Role.FETCH,
    "FetchReplica": Role.FETCH,
    "ExportWeights": Role.MEMBER,
    "Heartbeat": Role.MEMBER,
    "GetStatus": Role.MEMBER,
}


def route_neighbours(stage: int, num_stages: int, out_of_order: bool) -> frozenset[int]:
    """Stages that send ``stage`` activations or gradients on some microbatch's route."""
    out: set[int] = set()
    for mb in (0, 1) if out_of_order else (0,):
        route = route_for(mb, num_stages, out_of_order)
        for hop, s in enumerate(route):
            if s == stage:
                out.update(route[h] for h in (hop - 1, hop + 1) if 0 <= h < len(route))
    out.discard(stage)
    return frozenset(out)


def decide(
    rpc: str,
    caller: str,
    my_stage: int | None,
    records: Iterable[StageRecord],
    num_stages: int,
    out_of_order: bool,
) -> str | None:
    """Why ``caller`` may not call ``rpc`` on a node serving ``my_stage`` (None: it may). ``records`` is
    this node's view of its swarm (one configuration)."""
    role = RPC_ROLES.get(rpc, Role.MEMBER)
    if role is Role.MEMBER:
        return None
    records = list(records)
    current = current_epochs(records)  # a fenced-off former owner of a stage speaks for it no more
    mine = [r for r in records if r.node == caller and r.state in SPEAKING_STATES]
    owning = [r for r in mine if r.state not in CLAIMING_STATES and r.epoch >= current.get(r.stage, 0)]
    if role is Role.CONTROL:
        if any(r.stage == 0 for r in mine if r.state in CLAIMING_STATES or r in owning):
            return None
        return f"{caller} is not stage 0"
    if role is Role.PARK:
        leaving = [r.stage for r in records if r.node == caller and r.state == StageState.HANDING_OVER]
        if my_stage is not None and any(s in route_neighbours(my_stage, num_stages, out_of_order) for s in leaving):
            return None
        if my_stage is not None and any(snapshot_holder(r.stage, num_stages) == my_stage for r in owning):
            return None  # a stage whose neighbour snapshots this one holds (--recovery ladder)
        return f"{caller} is not handing over a route neighbour of stage {my_stage}, nor sending it a snapshot"
    if role is Role.REPLICA:
        if my_stage is not None and any(r.stage == my_stage for r in owning):
            return None
        return f"{caller} is not a replica of stage {my_stage}"
    if role is Role.PIPELINE:
        if my_stage is None:
            return "this node serves no stage"
        allowed = route_neighbours(my_stage, num_stages, out_of_order)
        if any(r.stage in allowed for r in owning):
            return None
        return f"{caller} is not a route neighbour of stage {my_stage}"
    if any(r.state in CLAIMING_STATES for r in mine):
        return None
    return f"{caller} is not rebuilding or taking over a stage"


class MemberInterceptor(grpc.aio.ServerInterceptor):
    """Applies :func:`decide` to every Stage RPC before its handler runs. ``check(rpc, caller)`` returns a
    refusal reason or None; ``on_refused(code, rpc)`` counts refusals."""

    def __init__(
        self,
        check: Callable[[str, str], Awaitable[str | None]],
        on_refused: Callable[[grpc.StatusCode, str], None],
        on_authenticated: Callable[[str], None] = lambda peer: None,
    ) -> None:
        """``on_authenticated(peer)``: a call from connection ``peer`` carried a node certificate (the TLS
        handshake's refusals are counted from it: :class:`node.security.tls.HandshakeLedger`)."""
        self.check, self.on_refused, self.on_authenticated = check, on_refused, on_authenticated

    async def _authorize(self, method: str, context: grpc.aio.ServicerContext) -> None:
        rpc = method.removeprefix(SERVICE_PREFIX) if method.startswith(SERVICE_PREFIX) else method
        names = context.auth_context().get("x509_common_name") or []
        if not names:
            self.on_refused(grpc.StatusCode.UNAUTHENTICATED, rpc)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        caller = names[0].decode(errors="replace")
        self.on_authenticated(context.peer())
        reason = await self.check(rpc, caller)
        if reason is not None:
            self.on_refused(grpc.StatusCode.PERMISSION_DENIED, rpc)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{rpc}: {reason}")

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        if not details.method.startswith(SERVICE_PREFIX):  # health and reflection: any member (TLS checked it)
            return wrap_handler(handler, self._connected)
        return wrap_handler(handler, lambda context: self._authorize(details.method, context))

    async def _connected(self, context: grpc.aio.ServicerContext) -> None:
        if context.auth_context().get("x509_common_name"):
            self.on_authenticated(context.peer())


def wrap_handler(handler, before: Callable[[grpc.aio.ServicerContext], Awaitable[None]]):
    """The same handler with ``before(context)`` awaited first (it may abort the call)."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            await before(context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.stream_unary:
        inner = handler.stream_unary

        async def stream_unary(requests, context):
            await before(context)
            return await inner(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    if handler.unary_stream and inspect.isasyncgenfunction(handler.unary_stream):
        inner = handler.unary_stream

        async def unary_stream(request, context):
            await before(context)
            async for item in inner(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    return handler


class ViewCheck:
    """:func:`decide` over a node's current view; a refusal re-reads the DHT (at most once every
    ``min_refresh`` seconds) before it is final, so a peer that has just taken a stage is not refused for
    a record this node has not seen yet. Refusals that arrive while a re-read is under way wait for it."""

    def __init__(
        self,
        records: Callable[[], list[StageRecord]],
        refresh: Callable[[], Awaitable[None]],
        my_stage: Callable[[], int | None],
        num_stages: int,
        out_of_order: bool,
        min_refresh: float = 0.25,
    ) -> None:
        self.records, self.refresh, self.my_stage = records, refresh, my_stage
        self.num_stages, self.out_of_order, self.min_refresh = num_stages, out_of_order, min_refresh
        self._refreshed_at = -math.inf
        self._refreshing: asyncio.Future[None] | None = None

    def _decide(self, rpc: str, caller: str) -> str | None:
        return decide(rpc, caller, self.my_stage(), self.records(), self.num_stages, self.out_of_order)

    async def _reread(self) -> None:
        try:
            await self.refresh()
        finally:
            self._refreshed_at, self._refreshing = time.monotonic(), None

    async def __call__(self, rpc: str, caller: str) -> str | None:
        reason = self._decide(rpc, caller)
        if reason is None:
            return None
        if self._refreshing is None and time.monotonic() - self._refreshed_at >= self.min_refresh:
            self._refreshing = asyncio.ensure_future(self._reread())
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            reason = self._decide(rpc, caller)
        return reason
