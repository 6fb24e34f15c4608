"""Combining two replicas' gradients: hivemind's DecentralizedAverager against our direct exchange.

Two replicas of a stage each hold a partial gradient (one flat fp32 tensor of a stage's size) and must end
the step with the same combined gradient. Measured side by side, per size and round:

- ``hivemind``: two processes, each with its own hivemind DHT and a ``DecentralizedAverager`` over the
  tensor (target group size 2), calling ``step()`` at the same moment; time from the call to its return,
  at ``--min-matchmaking`` seconds of matchmaking (hivemind's default is 5 s; 0.5 s is its practical floor
  on one machine). Exactness: whether the averaged tensor times 2 equals the sum a + b bit for bit (what the
  single-process reference computes).
- ``direct``: what the daemon does (``PushGradients``): each replica streams its partial to the other over
  gRPC with the production encoder and decoder (``encode_stream``, ``TensorAssembler``), both directions at
  once on loopback, then sums in a fixed order (``combine_partials``): exact by construction.

    python benchmarks/averaging.py [--sizes-mib 1.5,13.5,54] [--rounds 5] [--min-matchmaking 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import pathlib
import statistics
import time

import grpc
import torch
from _common import RESULTS, write_results

from node.proto import stage_pb2 as pb
from node.train.partials import combine_partials
from node.transport.channels import GRPC_OPTIONS, SERVER_OPTIONS
from node.wire.tensors import TensorAssembler, encode_stream

METHOD = "/bench.Exchange/Push"


def _tensor(mib: float, seed: int) -> torch.Tensor:
    return torch.randn(int(mib * 2**20) // 4, generator=torch.Generator().manual_seed(seed))


# ---- hivemind ---------------------------------------------------------------------------------------------
def _hivemind_peer(rank: int, mib: float, rounds: int, matchmaking: float, maddrs, out) -> None:
    import hivemind
    from hivemind.averaging import DecentralizedAverager

    # a spawned child inherits "spawn" as its default start method, and hivemind's averager (a Process that
    # holds weak references) cannot be pickled to start that way: fork it, as hivemind expects
    mp.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    dht = hivemind.DHT(start=True, initial_peers=maddrs.get(timeout=60) if rank else None)
    if rank == 0:
        for addr in dht.get_visible_maddrs():
            maddrs.put([str(addr)])
    mine = _tensor(mib, rank)
    averager = DecentralizedAverager(
        [mine.clone()], dht, start=True, prefix="bench", target_group_size=2, min_matchmaking_time=matchmaking,
        request_timeout=max(1.0, matchmaking),
    )  # fmt: skip
    seconds, exact, diffs = [], [], []
    expected = _tensor(mib, 0) + _tensor(mib, 1)
    for _ in range(rounds + 1):  # the first round warms up (connections, matchmaking)
        with averager.get_tensors() as tensors:
            tensors[0].copy_(mine)
        started = time.perf_counter()
        group = averager.step(timeout=120)
        took = time.perf_counter() - started
        with averager.get_tensors() as tensors:
            summed = tensors[0] * 2
        if group is None:
            seconds.append(float("nan"))
            continue
        seconds.append(took)
        exact.append(bool(torch.equal(summed, expected)))
        diffs.append(float((summed - expected).abs().max()))
    out.put({"rank": rank, "seconds": seconds[1:], "exact": exact[1:], "max_abs_diff": max(diffs[1:], default=None)})
    averager.shutdown()
    dht.shutdown()


def hivemind_round(mib: float, rounds: int, matchmaking: float) -> dict:
    ctx = mp.get_context("spawn")
    maddrs, out = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_hivemind_peer, args=(r, mib, rounds, matchmaking, maddrs, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=120 + rounds * (matchmaking + 60)) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    per_round = [max(a, b) for a, b in zip(results[0]["seconds"], results[1]["seconds"], strict=True)]
    return {
        "seconds": per_round,
        "median_seconds": statistics.median(per_round),
        "exact": all(all(r["exact"]) for r in results),
        "max_abs_diff": max(r["max_abs_diff"] or 0.0 for r in results),
    }


# ---- the direct exchange ----------------------------------------------------------------------------------
async def direct_round(mib: float, rounds: int) -> dict:
    a, b = _tensor(mib, 0), _tensor(mib, 1)
    limit = a.numel() * 4 + (1 << 20)

    async def push(request_iterator, context) -> bytes:
        asm = TensorAssembler(max_tensor_bytes=limit, max_stream_bytes=limit)
        async for message in request_iterator:
            asm.feed(message)
        received[asm.meta.microbatch] = asm.finish()
        return b""

    received: dict[int, dict[str, torch.Tensor]] = {}
    servers, stubs = [], []
    for _ in (0, 1):  # each replica serves its own port
        server = grpc.aio.server(options=SERVER_OPTIONS)
        method = grpc.stream_unary_rpc_method_handler(push)
        handler = grpc.method_handlers_generic_handler("bench.Exchange", {"Push": method})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        stubs.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS))
    seconds, exact = [], []
    expected = a + b
    try:
        for _ in range(rounds + 1):
            received.clear()
            started = time.perf_counter()
            sends = [
                stubs[1 - i].stream_unary(METHOD)(encode_stream(pb.MicrobatchMeta(microbatch=i), [("g", t)]))
                for i, t in enumerate((a, b))
            ]
            await asyncio.gather(*sends)
            # each replica sums in the same fixed order (by first microbatch): replica 0's view shown
            total = combine_partials([(0, {"g": a}), (1, received[1])])
            seconds.append(time.perf_counter() - started)
            exact.append(bool(torch.equal(total["g"], expected)))
    finally:
        for channel in stubs:
            await channel.close()
        for server in servers:
            await server.stop(0)
    return {"seconds": seconds[1:], "median_seconds": statistics.median(seconds[1:]), "exact": all(exact[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1.5,13.5,54")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-matchmaking", type=float, default=0.5, help="hivemind matchmaking (default 0.5 s)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "averaging.json")
    args = parser.parse_args()
    rows = []
    for mib in (float(s) for s in args.sizes_mib.split(",")):
        direct = asyncio.run(direct_round(mib, args.rounds))
        hive = hivemind_round(mib, args.rounds, args.min_matchmaking)
        rows.append({"mib": mib, "direct": direct, "hivemind": hive,
                     "hivemind_over_direct": hive["median_seconds"] / direct["median_seconds"]})  # fmt: skip
        print(f"{mib:6.1f} MiB: direct {direct['median_seconds'] * 1e3:8.1f} ms (exact {direct['exact']}), "
              f"hivemind {hive['median_seconds'] * 1e3:8.1f} ms (exact {hive['exact']}, max diff "
              f"{hive['max_abs_diff']:.2e}), {rows[-1]['hivemind_over_direct']:.1f}x")  # fmt: skip
    write_results(args.out, {"benchmark": "averaging", "min_matchmaking_time": args.min_matchmaking, "rows": rows})


if __name__ == "__main__":
    main()
