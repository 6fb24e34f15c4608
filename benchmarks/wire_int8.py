"""Blockwise int8 on the wire against fp32: validation loss after a fixed number of steps, and tokens/s.

**Loss, over many seeds.** The single-process reference trains exactly as a swarm with the same
``wire_dtype`` does (its stages exchange activations and gradients through the wire's rounding; a 4-stage
``local --check-reference`` run with int8 or bf16 on the wire matches it to 0.0). So every seed is trained in
one process with fp32, bf16 and int8 on the wire, side by side, two seeds at a time on this machine's cores,
and evaluated at each of ``--eval-at`` steps on ``--eval-batches`` held-out microbatches. bf16 is the control:
a rounding everyone accepts, which shows how far a tiny perturbation alone moves this model's loss after so
few steps. Goal: int8 within 1 % of fp32 (mean over seeds).

**Speed, in the swarm.** ``--swarm-seeds`` real 4-stage swarms per wire (loopback): tokens/s int8 ÷ fp32, and
the swarm's own validation loss next to the reference's for the same seed and wire (they must agree).

    python benchmarks/wire_int8.py [--seeds 8] [--eval-at 30,100] [--swarm-seeds 1]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import pathlib
import statistics
import tempfile

from _common import RESULTS, median_step_seconds, run_local, write_results

WIRES = {"fp32": None, "bf16": "bfloat16", "int8": "int8"}
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13, 20: 2.09}


def train_one(job: tuple[int, str, list[int], int]) -> dict:
    """One seed and wire in this (worker) process, one torch thread: {step: validation loss}."""
    seed, wire, eval_at, eval_batches = job
    from node.config import build_config
    from node.data import load_corpus_for, validation_batches
    from node.train.reference import train_reference, validation_loss

    cfg = build_config(overrides={"num_stages": 4, "wire_dtype": WIRES[wire], "train": {"seed": seed}})
    corpus, t = load_corpus_for(cfg), cfg.train
    val = validation_batches(corpus.val, num_batches=eval_batches, batch_size=t.microbatch_size, seq_len=t.seq_len)
    losses: dict[int, float] = {}

    def on_step(step: int, _loss: float, model) -> None:
        if step in eval_at:
            losses[step] = validation_loss(model, val)

    train_reference(cfg, corpus.train, max(eval_at), on_step=on_step, threads=1)
    print(f"  seed {seed} {wire}: " + ", ".join(f"step {k} {v:.4f}" for k, v in losses.items()), flush=True)
    return {"seed": seed, "wire": wire, "val_loss": losses}


def summarise(values: list[float]) -> dict:
    """Mean, sample sd and the 95 % confidence interval of the mean (Student's t)."""
    n, mean = len(values), statistics.mean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = T95.get(n - 1, 2.0) * sd / math.sqrt(n) if n > 1 else float("inf")
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "each": values}


def swarm_run(steps: int, seed: int, wire: str) -> dict:
    config = pathlib.Path(tempfile.mkdtemp()) / "wire.toml"
    config.write_text((f'wire_dtype = "{WIRES[wire]}"\n' if WIRES[wire] else "") + f"[train]\nseed = {seed}\n")
    summary = run_local(
        ["--stages", "4", "--steps", str(steps), "--eval-every", str(steps), "--config", str(config)], timeout=1200
    )
    return {
        "val_loss": summary["evaluations"][-1]["val_loss"],
        "tokens_per_second": summary["tokens_per_second"],
        "median_step_seconds": median_step_seconds(summary),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--eval-at", default="30,100", help="steps at which to evaluate (comma-separated)")
    parser.add_argument("--eval-batches", type=int, default=32, help="held-out microbatches per evaluation")
    parser.add_argument("--swarm-seeds", type=int, default=1, help="real swarms per wire for tokens/s (0: none)")
    parser.add_argument("--swarm-steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "wire_int8.json")
    args = parser.parse_args()
    eval_at = sorted({int(s) for s in args.eval_at.split(",")})
    if not eval_at or eval_at[0] < 1 or args.seeds < 1:
        parser.error("--eval-at needs positive steps and --seeds at least 1")

    print(f"reference runs: {args.seeds} seeds x {list(WIRES)}, evaluated at steps {eval_at}")
    jobs = [(seed, wire, eval_at, args.eval_batches) for seed in range(args.seeds) for wire in WIRES]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        runs = pool.map(train_one, jobs)
    by = {(r["seed"], r["wire"]): r["val_loss"] for r in runs}
    loss: dict = {}
    for step in eval_at:
        fp32 = [by[seed, "fp32"][step] for seed in range(args.seeds)]
        loss[step] = {"fp32_mean": statistics.mean(fp32)}
        for wire in ("bf16", "int8"):
            rel = [by[seed, wire][step] / by[seed, "fp32"][step] - 1 for seed in range(args.seeds)]
            loss[step][f"{wire}_vs_fp32"] = summarise(rel)
            loss[step][f"{wire}_mean_vs_fp32_mean"] = statistics.mean(by[s, wire][step] for s in range(args.seeds)) / \
                loss[step]["fp32_mean"] - 1  # fmt: skip
        i8, b16 = loss[step]["int8_vs_fp32"], loss[step]["bf16_vs_fp32"]
        print(
            f"step {step}: fp32 mean {loss[step]['fp32_mean']:.4f}; int8 vs fp32 {100 * i8['mean']:+.2f} % "
            f"(sd {100 * i8['sd']:.2f}, 95 % CI {100 * i8['ci95'][0]:+.2f} .. {100 * i8['ci95'][1]:+.2f}); "
            f"bf16 vs fp32 {100 * b16['mean']:+.2f} % (sd {100 * b16['sd']:.2f})"
        )

    swarms = []
    for seed in range(args.swarm_seeds):
        row = {"seed": seed, **{w: swarm_run(args.swarm_steps, seed, w) for w in ("fp32", "int8")}}
        swarms.append(row)
        print(
            f"swarm seed {seed}: {row['fp32']['tokens_per_second']:,.0f} -> {row['int8']['tokens_per_second']:,.0f} "
            f"tokens/s (int8 / fp32 {row['int8']['tokens_per_second'] / row['fp32']['tokens_per_second']:.2f}); "
            f"val loss fp32 {row['fp32']['val_loss']:.4f}, int8 {row['int8']['val_loss']:.4f} (4 held-out microbatches)"
        )
    write_results(
        args.out,
        {
            "benchmark": "wire_int8",
            "seeds": args.seeds,
            "eval_batches": args.eval_batches,
            "reference_runs": runs,
            "val_loss": loss,
            "swarm_steps": args.swarm_steps,
            "swarms": swarms,
            "goal": "int8 validation loss within 1 % of fp32's (mean over seeds)",
        },
    )


if __name__ == "__main__":
    main()
