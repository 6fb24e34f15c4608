"""Neighbour snapshots (``--recovery ladder``): their traffic and their cost to step time, at several K.

Runs ``swarm-node local --stages 4 --steps N`` with ``--recovery checkfree`` (no snapshots) and with
``--recovery ladder --snapshot-neighbour-every K`` for each K, in turn within each repeat, so that every
ratio is measured side by side, and reports per K: the median committed-step time (past start-up) against
the run without snapshots, the bytes sent per committed step (all stages together) and the time from a
commit to its snapshot being held.

    python benchmarks/neighbour_snapshots.py [--steps 60] [--every 1,10,50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

from _common import RESULTS, median_step_seconds, run_local, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", default="1,10,50", help="values of K, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "neighbour_snapshots.json")
    args = parser.parse_args()
    every = [int(k) for k in args.every.split(",")]
    base = ["--stages", "4", "--steps", str(args.steps)]
    off: list[float] = []
    on: dict[int, list[dict]] = {k: [] for k in every}
    for i in range(args.repeats):
        off.append(median_step_seconds(run_local([*base, "--recovery", "checkfree"], timeout=900)))
        line = [f"run {i + 1}/{args.repeats}: no snapshots {off[-1]:.3f}s"]
        for k in every:
            summary = run_local([*base, "--recovery", "ladder", "--snapshot-neighbour-every", str(k)], timeout=900)
            sent, seconds = summary["neighbour_snapshots"], median_step_seconds(summary)
            on[k].append({"step_seconds": seconds, "ratio": seconds / off[-1],
                          "bytes_per_step": sent["bytes"] / args.steps, "sent": sent["sent"],
                          "held_seconds_mean": sent["seconds_mean"]})  # fmt: skip
            line.append(f"K={k} {on[k][-1]['step_seconds']:.3f}s ({on[k][-1]['bytes_per_step'] / 1e6:.2f} MB/step)")
        print(", ".join(line), flush=True)
    report: dict = {"steps": args.steps, "repeats": args.repeats, "step_seconds_off": off, "per_k": {}}
    for k, runs in on.items():
        ratios = [r["ratio"] for r in runs]
        report["per_k"][str(k)] = {
            "runs": runs,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "bytes_per_step_median": statistics.median(r["bytes_per_step"] for r in runs),
        }
        print(f"K={k}: step time x{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}), "
              f"{report['per_k'][str(k)]['bytes_per_step_median'] / 1e6:.2f} MB per committed step")  # fmt: skip
    write_results(args.out, report)


if __name__ == "__main__":
    main()
