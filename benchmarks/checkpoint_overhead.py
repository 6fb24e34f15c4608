"""Checkpoint strategy: its cost when nothing fails, on a real local swarm.

Runs ``swarm-node local --stages 4 --steps N`` with ``--recovery checkfree`` (no checkpoints) and with
``--recovery checkpoint --checkpoint-every K`` for each K, alternating, ``--repeats`` times, and reports the
median committed-step time, tokens/s, the time the training path was blocked by snapshots, and the
background write time and size. Goal: the checkpoint strategy costs no measurable step time (the write
is off the training path; only the in-memory snapshot is on it).

    python benchmarks/checkpoint_overhead.py [--steps 60] [--every 10,1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

from _common import RESULTS, run_local, write_results


def run(steps: int, flags: list[str]) -> dict:
    summary = run_local(["--stages", "4", "--steps", str(steps), *flags], timeout=900)
    steps_s = summary["step_seconds"][5:]  # past start-up
    return {
        "step_seconds_median": statistics.median(steps_s),
        "tokens_per_second": summary["tokens_per_second"],
        "checkpoints": summary["checkpoints"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", default="10,1", help="checkpoint intervals K to measure")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "checkpoint_overhead.json")
    args = parser.parse_args()
    variants = {"off": ["--recovery", "checkfree"]}
    for k in args.every.split(","):
        variants[f"every {k}"] = ["--recovery", "checkpoint", "--checkpoint-every", k]
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, flags in variants.items():
            results[name].append(run(args.steps, flags))
    base = statistics.median(r["step_seconds_median"] for r in results["off"])
    report = {"steps": args.steps, "repeats": args.repeats, "variants": {}}
    for name, runs in results.items():
        step = statistics.median(r["step_seconds_median"] for r in runs)
        ck = [r["checkpoints"] for r in runs]
        row = {
            "step_seconds_median": step,
            "step_time_vs_off": step / base,
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
            "checkpoint_writes_per_run": statistics.median(c["writes"] for c in ck),
            "snapshot_seconds_mean": statistics.median(c["snapshot_seconds_mean"] or 0.0 for c in ck),
            "write_seconds_mean": statistics.median(c["write_seconds_mean"] or 0.0 for c in ck),
            "bytes_per_checkpoint_all_stages": statistics.median(c["bytes"] / max(1, c["writes"]) * 4 for c in ck),
        }
        report["variants"][name] = row
        print(
            f"{name:>9}: step {step:.3f} s ({row['step_time_vs_off']:.3f}× off), "
            f"{row['tokens_per_second']:,.0f} tok/s, "
            f"snapshot {row['snapshot_seconds_mean'] * 1e3:.1f} ms, write {row['write_seconds_mean'] * 1e3:.0f} ms "
            f"(background), {row['bytes_per_checkpoint_all_stages'] / 2**20:.1f} MiB per checkpoint"
        )
    write_results(args.out, report)


if __name__ == "__main__":
    main()
