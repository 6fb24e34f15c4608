"""Whole-swarm snapshots: their cost to training, and the time to resume from one, against real S3.

Starts a moto S3 server on loopback, then runs ``swarm-node local --stages 4 --steps N`` without snapshots
and with ``--snapshot-to s3://... --snapshot-every K``, alternating, ``--repeats`` times, and reports the
median committed-step time of each (past start-up) and their ratio, measured side by side. Then a swarm
of new processes resumes from the last snapshot (``--resume``) and it reports the restore time against
the bytes moved. Goal: snapshots every 10 steps cost at most 2 % of step time.

All runs use ``--insecure`` so that the resumed run, in another work folder, can read snapshots written
without a swarm secret; that removes TLS from every variant alike.

    python benchmarks/snapshot_overhead.py [--steps 60] [--every 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics

from _common import RESULTS, median_step_seconds, run_local, write_results

from node.local.objectstore import CREDENTIALS, create_bucket, local_s3

BUCKET = "bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "snapshot_overhead.json")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)  # the swarms (children) inherit them
    base = ["--stages", "4", "--steps", str(args.steps), "--insecure"]
    off, on, sealed = [], [], []
    with local_s3() as endpoint:
        create_bucket(endpoint, BUCKET)
        for i in range(args.repeats):
            url = f"s3://{BUCKET}/run{i}"
            snap = ["--snapshot-to", url, "--snapshot-every", str(args.every), "--storage-endpoint", endpoint]
            off.append(median_step_seconds(run_local(base, timeout=900)))
            summary = run_local([*base, *snap], timeout=900)
            on.append(median_step_seconds(summary))
            sealed.append(summary["snapshots"])
            print(f"run {i + 1}/{args.repeats}: step {off[-1]:.3f}s without, {on[-1]:.3f}s with snapshots", flush=True)
        resume = ["--snapshot-to", url, "--storage-endpoint", endpoint, "--resume"]
        resumed = run_local(["--stages", "4", "--steps", str(args.steps + 5), "--insecure", *resume], timeout=900)
    ratios = [b / a for a, b in zip(off, on, strict=True)]
    restore = resumed["resumed"]
    report = {
        "steps": args.steps,
        "every": args.every,
        "repeats": args.repeats,
        "step_seconds_off": off,
        "step_seconds_on": on,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "snapshots_per_run": [len(s) for s in sealed],
        "seal_seconds_median": statistics.median(s["seconds"] for run in sealed for s in run),
        "snapshot_bytes": sealed[-1][-1]["bytes"] if sealed[-1] else 0,
        "restore": restore,
        "restore_mb_per_s": restore["bytes"] / restore["seconds"] / 1e6 if restore and restore["seconds"] else None,
        "goal": "ratio_median <= 1.02",
    }
    print(
        f"step time with snapshots every {args.every} / without: median {report['ratio_median']:.3f} "
        f"(min {report['ratio_min']:.3f}, max {report['ratio_max']:.3f}); commit -> sealed "
        f"{report['seal_seconds_median']:.2f}s; restore of {report['snapshot_bytes'] / 1e6:.1f} MB: "
        f"{restore['seconds']:.2f}s (slowest stage)"
    )
    write_results(args.out, report)


if __name__ == "__main__":
    main()
