"""A local swarm over emulated wide-area links against the same swarm on loopback, fp32 and int8 on the wire.

Each round runs ``swarm-node local --stages 4 --steps N`` three times, side by side, with the same seed: on
loopback (the activation's own dtype on the wire), and with every node behind an emulated link of
``--rtt-ms`` and ``--mbit`` (``local --link-rtt-ms/--link-mbit``: a userspace proxy in front of each node's
gRPC port that delays every chunk by half the round trip each way and holds each direction to the rate)
with fp32 and with blockwise int8 on the wire. It reports each run's tokens/s over the loopback run's of
the same round (median step time past start-up; the order of the three rotates from round to round), and
the final validation loss of int8 against fp32 over the same link. Issue 17's goal at 20 ms and
100 Mbit/s: tokens/s >= 0.7x loopback with int8, and a validation loss within 1 % of fp32.
``--emulate-compute S`` adds S seconds per microbatch and direction on the block stages, for a
compute-to-communication ratio closer to a GPU stage's than this CPU's.

    python benchmarks/wan.py [--rtt-ms 20] [--mbit 100] [--steps 40] [--rounds 3] [--emulate-compute 0]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile

from _common import RESULTS, median_step_seconds, run_local, write_results

from node.bench.results import spread as bench_spread

VARIANTS = ("loopback", "wan fp32", "wan int8")


def run(args: argparse.Namespace, seed: int, variant: str) -> dict:
    wire = {"wan fp32": "float32", "wan int8": "int8"}.get(variant)
    with tempfile.TemporaryDirectory() as tmp:
        config = pathlib.Path(tmp) / "wire.toml"
        config.write_text((f'wire_dtype = "{wire}"\n' if wire else "") + f"[train]\nseed = {seed}\n")
        flags = ["--stages", "4", "--steps", str(args.steps), "--eval-every", str(args.steps), "--config",
                 str(config), "--emulate-compute", str(args.emulate_compute)]  # fmt: skip
        if variant != "loopback":
            flags += ["--link-rtt-ms", str(args.rtt_ms), "--link-mbit", str(args.mbit)]
        summary = run_local(flags, timeout=1800)
    step = median_step_seconds(summary)
    t = summary["config"]["train"]
    tokens_per_step = t["microbatches_per_step"] * t["microbatch_size"] * t["seq_len"]
    return {"median_step_seconds": step, "tokens_per_second": tokens_per_step / step,
            "val_loss": summary["evaluations"][-1]["val_loss"]}  # fmt: skip


def spread(values: list[float]) -> dict[str, float]:
    """The bench's mean ± sd, with the extremes."""
    summary = bench_spread(values)
    assert summary is not None  # every round gives a value
    return {**summary.model_dump(), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each with its own seed")
    parser.add_argument("--emulate-compute", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "wan.json")
    args = parser.parse_args()
    rounds = []
    for seed in range(args.rounds):
        order = VARIANTS[seed % 3:] + VARIANTS[: seed % 3]  # rotated: a drift over a round hits each in turn
        row = {variant: run(args, seed, variant) for variant in order}
        rounds.append({"seed": seed, **row})
        base = row["loopback"]["tokens_per_second"]
        print(f"round {seed}: " + "; ".join(
            f"{v} {row[v]['tokens_per_second']:.0f} tok/s ({row[v]['tokens_per_second'] / base:.2f}x), "
            f"val loss {row[v]['val_loss']:.4f}" for v in VARIANTS))  # fmt: skip
    over = {v: [r[v]["tokens_per_second"] / r["loopback"]["tokens_per_second"] for r in rounds] for v in VARIANTS[1:]}
    loss = [r["wan int8"]["val_loss"] / r["wan fp32"]["val_loss"] - 1 for r in rounds]
    report = {
        "link": {"rtt_ms": args.rtt_ms, "mbit": args.mbit}, "steps": args.steps, "rounds": rounds,
        "emulate_compute": args.emulate_compute,
        "tokens_per_second_over_loopback": {v: spread(x) for v, x in over.items()},
        "int8_val_loss_over_fp32_minus_1": spread(loss),
        "goal": "wan int8 tokens/s >= 0.7x loopback; int8 validation loss within 1 % of fp32",
    }  # fmt: skip
    for v, x in over.items():
        print(f"{v}: {statistics.fmean(x):.2f}x loopback tokens/s (min {min(x):.2f}, max {max(x):.2f})")
    print(f"int8 validation loss vs fp32 over the link: {100 * statistics.fmean(loss):+.2f} %")
    write_results(args.out, report)


if __name__ == "__main__":
    main()
