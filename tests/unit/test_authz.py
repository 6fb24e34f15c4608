"""Who may call what: the pure per-RPC rules, the refresh-once check, and mutual TLS with the interceptor on a
real in-process server (certificates from a real swarm authority)."""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import pytest

from node.proto import stage_pb2 as pb
from node.recovery.planner import declared_dead
from node.security.authz import MemberInterceptor, ViewCheck, decide, route_neighbours
from node.security.keys import NodeCredentials, init_authority, issue_node
from node.security.tls import HandshakeLedger, channel_credentials, server_credentials, target_name_options
from node.transport.channels import GRPC_OPTIONS
from node.transport.stage_rpc import StageClient
from node.wire.records import StageRecord, current_epochs, next_epoch


def rec(stage, node, state="online", n=5, epoch=0) -> StageRecord:
    return StageRecord(
        stage=stage, num_stages=n, peer_id=f"peer-{node}", node=node, grpc_address="127.0.0.1:1", state=state,
        committed_step=3, config_fingerprint="fp", version="0", epoch=epoch,
    )  # fmt: skip


VIEW = [
    rec(0, "s0"), rec(1, "s1"), rec(2, "s2"), rec(3, "s3"), rec(4, "s4"), rec(2, "new", "recovering"),
    rec(3, "leaving", "handing_over"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rpc", "caller", "mine", "allowed"),
    [
        ("Prepare", "s0", 2, True),
        ("Commit", "s1", 2, False),  # only stage 0 decides commits
        ("Abort", "stranger", 2, False),  # a member without a record
        ("Rollback", "new", 2, False),
        ("PushReplica", "s0", 1, True),
        ("Forward", "s1", 2, True),  # route neighbours
        ("Backward", "s3", 2, True),
        ("Forward", "s4", 2, False),  # two hops away
        ("Forward", "s4", 0, True),  # the last stage feeds stage 0 its output
        ("Forward", "s1", None, False),  # a spare serves no stage
        ("FetchWeights", "new", 1, True),  # rebuilding: it may fetch
        ("FetchWeights", "s3", 2, False),  # serving: it has no reason to
        ("FetchReplica", "s2", 1, False),
        ("Heartbeat", "stranger", 2, True),  # any member
        ("GetStatus", "s4", 2, True),
        ("ParkState", "leaving", 2, True),  # a preempted route neighbour leaves its state here
        ("ParkState", "leaving", 0, False),  # stage 3 is no route neighbour of stage 0 (S = 5)
        ("ParkState", "s1", 3, False),  # a serving stage parks nothing on a stage that holds no snapshot of it
        ("ParkState", "s1", 2, True),  # ... but sends its neighbour snapshots to the next stage (ladder)
        ("ParkState", "s4", 3, True),  # the last stage's go to the stage before it
        ("ParkState", "new", 3, False),  # a stage still being rebuilt has no snapshot to send
        ("Forward", "leaving", 2, True),  # a leaving node finishes the step in flight
        ("Backward", "leaving", 4, True),
    ],
)
def test_roles(rpc: str, caller: str, mine: int | None, allowed: bool) -> None:
    assert (decide(rpc, caller, mine, VIEW, 5, False) is None) == allowed


def test_a_leaving_node_speaks_for_its_stage_until_its_successor_serves() -> None:
    view = [*VIEW, rec(3, "heir", "recovering", epoch=2)]
    assert decide("Forward", "leaving", 2, view, 5, False) is None  # the successor is still loading the state
    view = [*VIEW, rec(3, "heir", "online", epoch=2)]
    assert decide("Forward", "leaving", 2, view, 5, False) is not None
    assert decide("Forward", "heir", 2, view, 5, False) is None


def test_out_of_order_routes_widen_the_neighbours() -> None:
    assert route_neighbours(1, 5, False) == {0, 2}
    assert route_neighbours(1, 5, True) == {0, 2, 4}  # odd microbatches: 0 → 2 → 1 → 4 → 3 → 0
    assert route_neighbours(0, 5, True) == {1, 2, 3, 4}


def test_a_live_neighbours_report_declares_a_peer_dead_and_no_one_elses_does() -> None:
    records = [rec(0, "s0"), rec(1, "s1"), rec(2, "s2"), rec(3, "s3"), rec(4, "s4"), rec(None, "sp", "spare")]
    by = {r.node: r.peer_id for r in records}
    assert declared_dead(records, {by["s2"]: {by["s1"]}}, 5) == {by["s2"]}  # a route neighbour
    assert declared_dead(records, {by["s2"]: {by["s0"]}}, 5) == {by["s2"]}  # stage 0 watches every stage
    assert declared_dead(records, {by["s2"]: {by["s4"]}}, 5) == frozenset()  # not its neighbour
    assert declared_dead(records, {by["s2"]: {by["sp"]}}, 5) == frozenset()  # a spare serves nothing
    assert declared_dead(records, {by["s2"]: {by["s1"]}, by["s1"]: {by["s0"]}}, 5) == {by["s1"]}  # itself suspect


async def test_a_refusal_rereads_the_view_once_before_it_is_final() -> None:
    view: list[StageRecord] = []
    refreshed = 0

    async def refresh() -> None:
        nonlocal refreshed
        refreshed += 1
        view.append(rec(0, "s0"))  # the new stage 0's record arrives with the re-read

    check = ViewCheck(lambda: view, refresh, lambda: 2, 5, False, min_refresh=10.0)
    assert await check("Prepare", "s0") is None and refreshed == 1
    assert await check("Prepare", "s9") is not None and refreshed == 1  # no second re-read within min_refresh


async def test_refusals_during_a_reread_wait_for_it() -> None:
    """Five neighbours' first pushes arrive together before this node has seen their records: all wait for the
    one re-read that brings the records, none is refused."""
    view: list[StageRecord] = []
    gate = asyncio.Event()
    refreshed = 0

    async def refresh() -> None:
        nonlocal refreshed
        refreshed += 1
        await gate.wait()
        view.extend([rec(1, "s1"), rec(3, "s3")])

    check = ViewCheck(lambda: view, refresh, lambda: 2, 5, False, min_refresh=10.0)
    calls = [asyncio.ensure_future(check("Forward", caller)) for caller in ("s1", "s3", "s1", "s3", "s1")]
    await asyncio.sleep(0.05)
    assert not any(c.done() for c in calls)
    gate.set()
    assert await asyncio.gather(*calls) == [None] * 5 and refreshed == 1


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, NodeCredentials]:
    root = tmp_path_factory.mktemp("authority")
    init_authority(root)
    other = tmp_path_factory.mktemp("other")
    init_authority(other)
    out = {name: NodeCredentials.load(issue_node(root, name)) for name in ("server", "s0", "s1")}
    out["foreign"] = NodeCredentials.load(issue_node(other, "s0"))  # the same name from another CA
    return out


async def test_mtls_and_roles_on_a_real_server(bundles: dict[str, NodeCredentials]) -> None:
    refused: list[tuple[grpc.StatusCode, str]] = []

    async def check(rpc: str, caller: str) -> str | None:
        return decide(rpc, caller, 2, [rec(0, "s0"), rec(1, "s1")], 5, False)

    async def prepare(request, context):
        return pb.PrepareReply(stage=2, grad_norm_sq=1.0)

    handler = grpc.method_handlers_generic_handler(
        "swarm_node.v1.Stage",
        {"Prepare": grpc.unary_unary_rpc_method_handler(
            prepare, request_deserializer=pb.PrepareRequest.FromString,
            response_serializer=pb.PrepareReply.SerializeToString,
        )},
    )  # fmt: skip
    handshakes_refused: list[int] = []
    ledger = HandshakeLedger(handshakes_refused.append, grace=0.5)
    interceptor = MemberInterceptor(check, lambda code, rpc: refused.append((code, rpc)), ledger.authenticated)
    server = grpc.aio.server(interceptors=(interceptor,))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(bundles["server"], ledger))
    await server.start()

    async def call(client: str | None) -> grpc.StatusCode:
        if client is None:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        else:
            options = GRPC_OPTIONS + target_name_options("server")
            creds = channel_credentials(bundles[client])
            channel = grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options)
        try:
            await StageClient(channel).Prepare(pb.PrepareRequest(step=1, attempt=1), timeout=5)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as err:
            return err.code()
        finally:
            await channel.close()

    try:
        assert await call("s0") == grpc.StatusCode.OK
        assert await call("s1") == grpc.StatusCode.PERMISSION_DENIED  # a member, but not stage 0
        assert refused == [(grpc.StatusCode.PERMISSION_DENIED, "Prepare")]
        # outsiders never get past the handshake: no certificate, or one from another CA
        assert await call(None) == grpc.StatusCode.UNAVAILABLE
        assert await call("foreign") == grpc.StatusCode.UNAVAILABLE
        # ... and those refused handshakes are counted once they are past the grace period (the members'
        # connections, authenticated, are not)
        await asyncio.sleep(0.6)
        assert await call("s0") == grpc.StatusCode.OK
        assert sum(handshakes_refused) == ledger.refused == 2, handshakes_refused
    finally:
        await server.stop(0)
    await asyncio.sleep(0)


def test_a_bundle_is_checked_when_it_is_loaded(bundles, tmp_path: pathlib.Path) -> None:
    from node.security.keys import CredentialsError

    root = tmp_path / "a"
    init_authority(root)
    bundle = issue_node(root, "n1")
    (bundle / "ca.pem").write_bytes(bundles["foreign"].ca_pem)  # a CA that did not issue node.pem
    with pytest.raises(CredentialsError, match="was not issued by"):
        NodeCredentials.load(bundle)
    with pytest.raises(CredentialsError, match="already holds a swarm authority"):
        init_authority(root)


def test_only_the_current_claim_of_a_stage_speaks_for_it() -> None:
    old0, new0 = rec(0, "old").model_copy(update={"epoch": 5}), rec(0, "new0").model_copy(update={"epoch": 9})
    old1, new1 = rec(1, "old1").model_copy(update={"epoch": 5}), rec(1, "new1").model_copy(update={"epoch": 9})
    view = [old0, new0, old1, new1, rec(2, "s2")]
    assert current_epochs(view) == {0: 9, 1: 9, 2: 0}
    assert decide("Commit", "new0", 2, view, 5, False) is None
    assert decide("Commit", "old", 2, view, 5, False) is not None  # fenced off: it came back after a takeover
    assert decide("Forward", "new1", 2, view, 5, False) is None
    assert decide("Forward", "old1", 2, view, 5, False) is not None
    # a claim still being rebuilt does not fence the owner: it may yet back off
    claim = rec(1, "claimer", "recovering").model_copy(update={"epoch": 20})
    assert decide("Forward", "new1", 2, [*view, claim], 5, False) is None
    assert next_epoch(view, 1, now_ms=3) == 10 and next_epoch(view, 3, now_ms=1_000) == 1_000


def test_the_handshake_ledger_counts_handshakes_no_authenticated_connection_matched() -> None:
    now = [0.0]
    seen: list[int] = []
    ledger = HandshakeLedger(seen.append, grace=10.0, clock=lambda: now[0])
    for _ in range(3):
        ledger.handshake()
    now[0] = 1.0
    ledger.authenticated("ipv4:127.0.0.1:5000")
    ledger.authenticated("ipv4:127.0.0.1:5000")  # the same connection's next call: no second handshake
    ledger.sweep()
    assert seen == [] and ledger.refused == 0  # still within the grace period
    now[0] = 10.5
    ledger.sweep()
    assert seen == [2] and ledger.refused == 2
    ledger.handshake()
    now[0] = 12.0
    ledger.authenticated("ipv4:127.0.0.1:5001")  # a new connection, authenticated: nothing refused
    now[0] = 30.0
    ledger.sweep()
    assert ledger.refused == 2
