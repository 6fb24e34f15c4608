"""Transport: activation-sized tensors through the real Stage service, over mutual TLS and in cleartext, vs bare
gRPC byte streaming.

All three run in the same server process on loopback, in the same run, interleaved round by round. The Stage
path is the production one: ``encode_stream`` on the client, the ``Forward`` handler with ``decode_stream`` and
every validation check (route, dtype, shape, finiteness) on the server; only the stage's compute is left out
(the handler returns as soon as the tensor is accepted). The mTLS path is the same service behind the
production server (``StageServer``: mutual TLS with certificates from a throw-away swarm authority, the
membership interceptor and the call limits); the cleartext path is what ``--insecure`` serves. The bare path
streams pre-cut 1 MiB ``bytes`` with no (de)serialization at all, the best gRPC can do.
Goals: Stage (cleartext) ≥ 0.8 × bare; mTLS ≥ 0.9 × cleartext.

    python benchmarks/transport.py [--sizes-mib 1,4,16,64] [--repeats 5] [--out benchmarks/results/transport.json]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import pathlib
import statistics
import tempfile
import time
from types import SimpleNamespace

import grpc
import torch
from _common import RESULTS, write_results

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


async def _serve(port_q: mp.Queue, shapes: list[tuple[int, int, int]], keys: pathlib.Path) -> None:
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
        ports[shape] = s.add_insecure_port("127.0.0.1:0")
        await s.start()
        participants[shape] = (s, p)
    tls_ports = {}
    for shape in shapes:
        service = StageService(_AcceptingParticipant(shape), None, None, _status, StageMetrics())  # type: ignore[arg-type]
        interceptor = MemberInterceptor(_allow, lambda code, rpc: None)
        tls = StageServer(service, server_credentials(NodeCredentials.load(keys / "server")), (interceptor,))
        address = await tls.start("127.0.0.1", 0)
        tls_ports[shape] = int(address.rsplit(":", 1)[1])
        participants[("tls", shape)] = (tls, None)
    bare_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_q.put((bare_port, ports, tls_ports))
    await asyncio.Event().wait()


def _server_main(port_q: mp.Queue, shapes: list[tuple[int, int, int]], keys: pathlib.Path) -> None:
    torch.set_num_threads(1)
    asyncio.run(_serve(port_q, shapes, keys))


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


async def _measure(
    bare_port: int, ports: dict, tls_ports: dict, keys: pathlib.Path, sizes: list[int], repeats: int
) -> list[dict]:
    rows = []
    bare_channel = grpc.aio.insecure_channel(f"127.0.0.1:{bare_port}", options=GRPC_OPTIONS)
    push = bare_channel.stream_unary(BARE_METHOD)
    for mib in sizes:
        shape = _shape_for(mib)
        tensor = torch.randn(shape)
        nbytes = tensor.numel() * 4
        raw = tensor.view(-1).view(torch.uint8).numpy().tobytes()
        chunks = [raw[i : i + CHUNK_BYTES] for i in range(0, len(raw), CHUNK_BYTES)]
        stage_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports[shape]}", options=GRPC_OPTIONS)
        stub = StageClient(stage_channel)
        tls_channel = grpc.aio.secure_channel(
            f"127.0.0.1:{tls_ports[shape]}",
            channel_credentials(NodeCredentials.load(keys / "client")),
            options=GRPC_OPTIONS + target_name_options("server"),
        )
        tls_stub = StageClient(tls_channel)
        meta = pb.MicrobatchMeta(step=0, microbatch=0, route=[0, 1, 2, 3, 0], hop=1, sender_stage=0, attempt=1)
        bare_s, stage_s, tls_s = [], [], []
        for i in range(repeats + 1):  # the first round warms up every path (and makes the TLS handshake)
            t0 = time.perf_counter()
            await push(iter(chunks))
            t1 = time.perf_counter()
            await stub.Forward(encode_stream(meta, [("", tensor)]))
            t2 = time.perf_counter()
            await tls_stub.Forward(encode_stream(meta, [("", tensor)]))
            t3 = time.perf_counter()
            if i:
                bare_s.append(t1 - t0)
                stage_s.append(t2 - t1)
                tls_s.append(t3 - t2)
        await stage_channel.close()
        await tls_channel.close()
        bare, stage, tls = statistics.median(bare_s), statistics.median(stage_s), statistics.median(tls_s)
        rows.append(
            {
                "mib": mib,
                "bytes": nbytes,
                "bare_seconds": bare,
                "stage_seconds": stage,
                "mtls_seconds": tls,
                "bare_gib_per_s": nbytes / bare / 2**30,
                "stage_gib_per_s": nbytes / stage / 2**30,
                "mtls_gib_per_s": nbytes / tls / 2**30,
                "ratio": bare / stage,
                "mtls_ratio": stage / tls,
                # round by round (each round runs the paths back to back), so the spread is not the machine's drift
                "mtls_ratio_spread": _spread([s / t for s, t in zip(stage_s, tls_s, strict=True)]),
                "ratio_spread": _spread([b / s for b, s in zip(bare_s, stage_s, strict=True)]),
            }
        )
    await bare_channel.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,4,16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "transport.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mib.split(",")]
    shapes = [_shape_for(m) for m in sizes]
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        bundles = ephemeral_swarm(pathlib.Path(tmp), ["server", "client"])
        keys = bundles["server"].parent
        server = ctx.Process(target=_server_main, args=(q, shapes, keys), daemon=True)
        server.start()
        try:
            bare_port, ports, tls_ports = q.get(timeout=60)
            rows = asyncio.run(_measure(bare_port, ports, tls_ports, keys, sizes, args.repeats))
        finally:
            server.kill()
            server.join(5)
    header = (
        f"{'MiB':>5} {'bare GiB/s':>11} {'stage GiB/s':>12} {'mTLS GiB/s':>11} {'stage/bare':>11} {'mTLS/stage':>17}"
    )
    print(header)
    for r in rows:
        sp = r["mtls_ratio_spread"]
        print(
            f"{r['mib']:>5} {r['bare_gib_per_s']:>11.2f} {r['stage_gib_per_s']:>12.2f} {r['mtls_gib_per_s']:>11.2f}"
            f" {r['ratio']:>11.2f} {r['mtls_ratio']:>6.2f} [{sp['min']:.2f}-{sp['max']:.2f}]"
        )
    overall = min(r["ratio"] for r in rows)
    mtls = min(r["mtls_ratio"] for r in rows)
    print(f"worst stage/bare ratio: {overall:.2f} (goal >= 0.8); worst mTLS/cleartext ratio: {mtls:.2f} (goal >= 0.9)")
    write_results(
        args.out,
        {
            "benchmark": "transport",
            "rows": rows,
            "worst_ratio": overall,
            "goal": 0.8,
            "worst_mtls_ratio": mtls,
            "mtls_goal": 0.9,
            "torch": torch.__version__,
            "grpc": grpc.__version__,
        },
    )


if __name__ == "__main__":
    main()
