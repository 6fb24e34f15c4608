"""Transport: activation-sized tensors through the real Stage service, over mutual TLS and in cleartext, vs bare
gRPC byte streaming.

All three run in the same server process, in the same run, interleaved round by round: on loopback (client
and server share this machine's cores, so TLS's encryption competes with both), and with ``--links-gbit``
also across a veth pair between two network namespaces shaped with ``tbf`` to each rate, as two VMs on a
link of that speed (root needed). The Stage
path is the production one: ``encode_stream`` on the client, the ``Forward`` handler with ``decode_stream`` and
every validation check (route, dtype, shape, finiteness) on the server; only the stage's compute is left out
(the handler returns as soon as the tensor is accepted). The mTLS path is the same service behind the
production server (``StageServer``: mutual TLS with certificates from a throw-away swarm authority, the
membership interceptor and the call limits); the cleartext path is what ``--insecure`` serves. The bare path
streams pre-cut 1 MiB ``bytes`` with no (de)serialization at all, the best gRPC can do. Raw TCP (one asyncio
stream, the payload written whole) is the ceiling of the machine itself. ``--tuned-malloc`` runs client and
server with glibc's mmap and trim thresholds raised (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), so
large buffers are reused instead of mapped and unmapped per message.
Goals: Stage (cleartext) ≥ 0.9 × bare; ≥ 0.5 × raw TCP at 16 and 64 MiB; mTLS ≥ 0.9 × cleartext.

    python benchmarks/transport.py [--sizes-mib 1,4,16,64] [--repeats 5] [--links-gbit 1,5] [--tuned-malloc]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import torch
from _common import REPO, RESULTS, write_results

from node.metrics import StageMetrics
from node.proto import stage_pb2 as pb
from node.security.authz import MemberInterceptor
from node.security.keys import NodeCredentials, ephemeral_swarm
from node.security.tls import channel_credentials, server_credentials, target_name_options
from node.stage.service import NodeStatus, StageService
from node.transport.channels import GRPC_OPTIONS, SERVER_OPTIONS
from node.transport.server import StageServer
from node.transport.stage_rpc import StageClient, add_stage_service
from node.wire.tensors import CHUNK_BYTES, encode_stream

D_MODEL = 1024
BARE_METHOD = "/bench.Bytes/Push"
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


class _AcceptingParticipant:
    """What StageService reads of the pipeline participant; accepts every validated tensor without computing."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.seat = SimpleNamespace(stage=1, ready=True, committed_step=0)
        self.config = SimpleNamespace(out_of_order=False, num_stages=4, train=SimpleNamespace(microbatches_per_step=4))
        self.activation_shape = shape
        self.max_activation_bytes = 4 * shape[1] * D_MODEL
        self.received = 0
        self.after_commit: list = []

    async def on_forward(self, meta: pb.MicrobatchMeta, x: torch.Tensor) -> None:
        self.received += x.numel()


def _status() -> NodeStatus:
    return NodeStatus(stage=1, peer_id="bench", state="serving", pid=os.getpid())


def _shape_for(mib: int) -> tuple[int, int, int]:
    tokens = mib * (1 << 20) // (4 * D_MODEL)
    return (1, tokens, D_MODEL)


async def _allow(rpc: str, caller: str) -> str | None:
    return None  # the membership check's cost is the interceptor and the certificate lookup, not the rules


async def _serve(shapes: list[tuple[int, int, int]], keys: pathlib.Path, host: str) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    participants = {}

    async def push(request_iterator, context) -> bytes:
        total = 0
        async for chunk in request_iterator:
            total += len(chunk)
        return total.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler("bench.Bytes", {"Push": grpc.stream_unary_rpc_method_handler(push)})
    server.add_generic_rpc_handlers((handler,))
    # one Stage service per tensor size, each on its own port, so the expected shape matches
    ports = {}
    for shape in shapes:
        s = grpc.aio.server(options=SERVER_OPTIONS)
        p = _AcceptingParticipant(shape)
        add_stage_service(StageService(p, None, None, _status, StageMetrics()), s)  # type: ignore[arg-type]
        ports[shape] = s.add_insecure_port(f"{host}:0")
        await s.start()
        participants[shape] = (s, p)
    tls_ports = {}
    for shape in shapes:
        service = StageService(_AcceptingParticipant(shape), None, None, _status, StageMetrics())  # type: ignore[arg-type]
        interceptor = MemberInterceptor(_allow, lambda code, rpc: None)
        tls = StageServer(service, server_credentials(NodeCredentials.load(keys / "server")), (interceptor,))
        address = await tls.start(host, 0)
        tls_ports[shape] = int(address.rsplit(":", 1)[1])
        participants[("tls", shape)] = (tls, None)
    bare_port = server.add_insecure_port(f"{host}:0")
    await server.start()
    tcp = socket.create_server((host, 0))
    threading.Thread(target=_tcp_sink, args=(tcp,), daemon=True).start()
    tcp_port = tcp.getsockname()[1]
    ordered = [ports[shape] for shape in shapes], [tls_ports[shape] for shape in shapes]
    print(json.dumps({"bare": bare_port, "stage": ordered[0], "mtls": ordered[1], "tcp": tcp_port}), flush=True)
    await asyncio.Event().wait()


def _recv_into(conn: socket.socket, view: memoryview, size: int) -> bool:
    """Reads ``size`` bytes through ``view`` (reused); False once the peer has closed."""
    while size:
        n = conn.recv_into(view[: min(size, len(view))])
        if not n:
            return False
        size -= n
    return True


def _tcp_sink(server: socket.socket) -> None:
    """Raw TCP, the machine's ceiling: a length, then that many bytes into one reused buffer, answered with the
    count (as Push does)."""
    conn, _ = server.accept()
    view = memoryview(bytearray(1 << 20))
    with conn:
        while _recv_into(conn, view, 8):
            size = int.from_bytes(view[:8], "little")
            if not _recv_into(conn, view, size):
                return
            conn.sendall(size.to_bytes(8, "little"))


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def _measure(
    host: str, bare_port: int, ports: dict, tls_ports: dict, keys: pathlib.Path, sizes: list[int], repeats: int,
    tcp_port: int,
) -> list[dict]:  # fmt: skip
    rows = []
    bare_channel = grpc.aio.insecure_channel(f"{host}:{bare_port}", options=GRPC_OPTIONS)
    push = bare_channel.stream_unary(BARE_METHOD)
    tcp_sock = socket.create_connection((host, tcp_port))
    answer = memoryview(bytearray(8))

    def send_tcp(payload: bytes) -> None:  # blocking, as nothing else runs meanwhile
        tcp_sock.sendall(len(payload).to_bytes(8, "little"))
        tcp_sock.sendall(payload)
        _recv_into(tcp_sock, answer, 8)

    for mib in sizes:
        shape = _shape_for(mib)
        tensor = torch.randn(shape)
        nbytes = tensor.numel() * 4
        raw = tensor.view(-1).view(torch.uint8).numpy().tobytes()
        chunks = [raw[i : i + CHUNK_BYTES] for i in range(0, len(raw), CHUNK_BYTES)]
        stage_channel = grpc.aio.insecure_channel(f"{host}:{ports[shape]}", options=GRPC_OPTIONS)
        stub = StageClient(stage_channel)
        tls_channel = grpc.aio.secure_channel(
            f"{host}:{tls_ports[shape]}",
            channel_credentials(NodeCredentials.load(keys / "client")),
            options=GRPC_OPTIONS + target_name_options("server"),
        )
        tls_stub = StageClient(tls_channel)
        meta = pb.MicrobatchMeta(step=0, microbatch=0, route=[0, 1, 2, 3, 0], hop=1, sender_stage=0, attempt=1)
        bare_s, stage_s, tls_s, tcp_s = [], [], [], []
        for i in range(repeats + 1):  # the first round warms up every path (and makes the TLS handshake)
            tcp_started = time.perf_counter()
            send_tcp(raw)
            t0 = time.perf_counter()
            await push(iter(chunks))
            t1 = time.perf_counter()
            await stub.Forward(encode_stream(meta, [("", tensor)]))
            t2 = time.perf_counter()
            await tls_stub.Forward(encode_stream(meta, [("", tensor)]))
            t3 = time.perf_counter()
            if i:
                tcp_s.append(t0 - tcp_started)
                bare_s.append(t1 - t0)
                stage_s.append(t2 - t1)
                tls_s.append(t3 - t2)
        await stage_channel.close()
        await tls_channel.close()
        bare, stage, tls = statistics.median(bare_s), statistics.median(stage_s), statistics.median(tls_s)
        tcp = statistics.median(tcp_s)
        rows.append(
            {
                "mib": mib,
                "bytes": nbytes,
                "bare_seconds": bare,
                "stage_seconds": stage,
                "mtls_seconds": tls,
                "tcp_seconds": tcp,
                "tcp_gib_per_s": nbytes / tcp / 2**30,
                "bare_gib_per_s": nbytes / bare / 2**30,
                "stage_gib_per_s": nbytes / stage / 2**30,
                "mtls_gib_per_s": nbytes / tls / 2**30,
                "ratio": bare / stage,
                "over_tcp": tcp / stage,
                "mtls_ratio": stage / tls,
                # round by round (each round runs the paths back to back), so the spread is not the machine's drift
                "mtls_ratio_spread": _spread([s / t for s, t in zip(stage_s, tls_s, strict=True)]),
                "ratio_spread": _spread([b / s for b, s in zip(bare_s, stage_s, strict=True)]),
            }
        )
    await bare_channel.close()
    tcp_sock.close()
    return rows


def measure(sizes: list[int], repeats: int, host: str = "127.0.0.1", netns: str | None = None) -> list[dict]:
    """Starts the server (in network namespace ``netns``, listening on ``host``) and measures from here."""
    shapes = [_shape_for(m) for m in sizes]
    with tempfile.TemporaryDirectory() as tmp:
        bundles = ephemeral_swarm(pathlib.Path(tmp), ["server", "client"])
        keys = bundles["server"].parent
        cmd = [sys.executable, __file__, "--serve", "--host", host, "--keys", str(keys),
               "--sizes-mib", ",".join(map(str, sizes))]  # fmt: skip
        server = subprocess.Popen([*(["ip", "netns", "exec", netns] if netns else []), *cmd], stdout=subprocess.PIPE,
                                  text=True, cwd=REPO, env=os.environ)  # fmt: skip
        try:
            assert server.stdout is not None
            got = json.loads(server.stdout.readline())
            ports = dict(zip(shapes, got["stage"], strict=True))
            tls_ports = dict(zip(shapes, got["mtls"], strict=True))
            return asyncio.run(_measure(host, got["bare"], ports, tls_ports, keys, sizes, repeats, got["tcp"]))
        finally:
            server.kill()
            server.wait(10)


@contextlib.contextmanager
def shaped_link(gbit: float) -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair, each end shaped to ``gbit`` Gbit/s (``tbf``), as two VMs
    on a link of that speed; yields (server namespace, server address). Needs root."""
    server_ns, client_ns, address = "swarm-bench-srv", "swarm-bench-cli", "10.77.0.1"
    script = f"""
    ip netns add {server_ns}; ip netns add {client_ns}
    ip link add swb-a type veth peer name swb-b
    ip link set swb-a netns {server_ns}; ip link set swb-b netns {client_ns}
    ip -n {server_ns} addr add {address}/24 dev swb-a; ip -n {client_ns} addr add 10.77.0.2/24 dev swb-b
    for ns in {server_ns} {client_ns}; do ip -n $ns link set lo up; done
    ip -n {server_ns} link set swb-a up; ip -n {client_ns} link set swb-b up
    tc -n {server_ns} qdisc add dev swb-a root tbf rate {gbit}gbit burst 4mb latency 100ms
    tc -n {client_ns} qdisc add dev swb-b root tbf rate {gbit}gbit burst 4mb latency 100ms
    """
    subprocess.run(["sh", "-ec", script], check=True)
    try:
        yield server_ns, address
    finally:
        subprocess.run(["sh", "-c", f"ip netns del {server_ns}; ip netns del {client_ns}"], check=False)


def over_link(gbit: float, sizes: list[int], repeats: int) -> list[dict]:
    """The same measurement with server and client in two namespaces on a link shaped to ``gbit``."""
    with shaped_link(gbit) as (server_ns, address), tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "rows.json"
        cmd = ["ip", "netns", "exec", "swarm-bench-cli", sys.executable, __file__, "--client-of", server_ns,
               "--host", address, "--sizes-mib", ",".join(map(str, sizes)), "--repeats", str(repeats),
               "--rows-out", str(out)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO)
        return json.loads(out.read_text())


def _print_rows(rows: list[dict], title: str) -> None:
    print(title)
    print(f"{'MiB':>5} {'TCP GiB/s':>10} {'bare GiB/s':>11} {'stage GiB/s':>12} {'mTLS GiB/s':>11} {'stage/bare':>11}"
          f" {'stage/TCP':>10} {'mTLS/stage':>17}")  # fmt: skip
    for r in rows:
        sp = r["mtls_ratio_spread"]
        print(
            f"{r['mib']:>5} {r['tcp_gib_per_s']:>10.2f} {r['bare_gib_per_s']:>11.2f} {r['stage_gib_per_s']:>12.2f}"
            f" {r['mtls_gib_per_s']:>11.2f} {r['ratio']:>11.2f} {r['over_tcp']:>10.2f} {r['mtls_ratio']:>6.2f}"
            f" [{sp['min']:.2f}-{sp['max']:.2f}]"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--links-gbit", default="", help="also measure over veth links shaped to these rates, e.g. 1,10 (root)"
    )
    parser.add_argument("--tuned-malloc", action="store_true", help="glibc mmap/trim thresholds raised (see above)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "transport.json")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--keys", type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--client-of", help=argparse.SUPPRESS)  # measuring inside a namespace: the server's
    parser.add_argument("--rows-out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tuned_malloc and any(os.environ.get(k) != v for k, v in TUNED_MALLOC.items()):
        # glibc reads the thresholds at start-up: run again with them (the server inherits them)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TUNED_MALLOC})
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    if args.serve:
        torch.set_num_threads(1)
        asyncio.run(_serve([_shape_for(m) for m in sizes], args.keys, args.host))
        return
    if args.client_of:
        args.rows_out.write_text(json.dumps(measure(sizes, args.repeats, args.host, args.client_of)))
        return
    rows = measure(sizes, args.repeats)
    _print_rows(rows, "loopback (client and server on this machine's cores)")
    links = {}
    for gbit in (float(g) for g in args.links_gbit.split(",") if g):
        links[str(gbit)] = over_link(gbit, sizes, args.repeats)
        _print_rows(links[str(gbit)], f"a {gbit:g} Gbit/s link (two network namespaces, tbf)")
    overall = min(r["ratio"] for r in rows)
    mtls = min(r["mtls_ratio"] for r in rows)
    over_tcp = min(r["over_tcp"] for r in rows if r["mib"] >= 16) if any(r["mib"] >= 16 for r in rows) else None
    print(f"loopback: worst stage/bare ratio: {overall:.2f} (goal >= 0.9); worst mTLS/cleartext ratio: {mtls:.2f} "
          f"(goal >= 0.9); worst stage/TCP at >= 16 MiB: {over_tcp} (goal >= 0.5)")  # fmt: skip
    for gbit, link_rows in links.items():
        print(f"{gbit} Gbit/s: worst mTLS/cleartext ratio: {min(r['mtls_ratio'] for r in link_rows):.2f}")
    write_results(
        args.out,
        {
            "benchmark": "transport",
            "rows": rows,
            "worst_ratio": overall,
            "goal": 0.9,
            "worst_over_tcp_16mib_up": over_tcp,
            "over_tcp_goal": 0.5,
            "tuned_malloc": args.tuned_malloc,
            "worst_mtls_ratio": mtls,
            "mtls_goal": 0.9,
            "links_gbit": {
                g: {"rows": r, "worst_mtls_ratio": min(x["mtls_ratio"] for x in r)} for g, r in links.items()
            },
            "torch": torch.__version__,
            "grpc": grpc.__version__,
        },
    )


if __name__ == "__main__":
    main()
