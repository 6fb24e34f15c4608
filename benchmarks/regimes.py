"""Which recovery strategy reaches the target first, by regime: stage size, step time and storage bandwidth.

Training dynamics come from the model trained here (``swarm-node bench --mode simulate``, the same seeded
failures in every regime); each regime puts its own bytes and step time on the clock (``--stage-mib``,
``--step-seconds``) and its own off-node storage (``--storage-bandwidth``). Failure draws are per iteration
at the paper's rate for its 91.35 s iterations, so every regime sees the same failures and only the costs
differ. For each regime the script reports each strategy's time to the target, the winner, and CheckFree
(and CheckFree+) against the best checkpointing (``--checkpoint-every auto``: Young–Daly for that regime).

    python benchmarks/regimes.py [--iterations 300] [--seeds 2] [--per-hour 0.1] [--storage 100,1000]
        [--reuse-since 2026-12-07T10:00:00+00:00]

``--reuse-since`` takes a regime's results from its folder when they were written at or after that time (a
sweep cut short and resumed), instead of running it again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys

from _common import REPO, RESULTS, write_results

# (name, a block stage's weights in MiB or None for the trained model's, seconds per iteration or None: measured)
SIZES = [
    ("trained model (tiny)", None, None),
    ("30 MiB/stage, 9 s steps", 30.0, 9.0),
    ("305 MiB/stage (500M-class), 91.35 s steps", 305.0, 91.35),  # the paper's medium model and step
]
STRATEGIES = "none,checkfree,checkfree+,checkpoint,ladder"
# the live bench's median death -> next commit, over every strategy (benchmarks/results/bench-live)
FAILURE_OVERHEAD = 3.9


def bench(out: pathlib.Path, stage_mib: float | None, step: float | None, storage: float, args) -> dict:
    step = step if step is not None or stage_mib is not None else args.trained_step_seconds
    cmd = [sys.executable, "-m", "node", "bench", "--mode", "simulate", "--strategies", STRATEGIES,
           "--checkpoint-every", "auto", "--failures-per-hour", str(args.per_hour), "--iterations",
           str(args.iterations), "--seeds", str(args.seeds), "--storage-bandwidth", str(storage),
           "--failure-overhead-seconds", str(FAILURE_OVERHEAD), "--eval-batches", str(args.eval_batches),
           "--out", str(out), "--json"]  # fmt: skip
    if stage_mib is not None:
        cmd += ["--stage-mib", str(stage_mib)]
    if step is not None:
        cmd += ["--step-seconds", str(step)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def reused(out: pathlib.Path, since: datetime.datetime | None) -> dict | None:
    """The regime's results in ``out`` if they were written at or after ``since``."""
    path = out / "results.json"
    if since is None or not path.exists():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    return results if datetime.datetime.fromisoformat(results["created"]) >= since else None


def verdict(results: dict) -> dict:
    """Each strategy's mean time to target (None: some seed never reached it), the winner, and CheckFree's
    and CheckFree+'s time over the best checkpointing's."""
    cells = {}
    for row in results["summary"]:
        label = row["strategy"] + (f" {row['variant']}" if row["variant"] else "")
        done = row["reached"] == row["seeds"] and row["seconds_to_target"]
        cells[label] = {
            "seconds": row["seconds_to_target"]["mean"] if done else None,
            "sd": row["seconds_to_target"]["sd"] if done else None,
            "reached": f"{row['reached']}/{row['seeds']}",
            "over_no_failures": (row.get("over_no_failures") or {}).get("mean") if done else None,
        }
    timed = {k: v["seconds"] for k, v in cells.items() if v["seconds"] is not None and k != "none"}
    checkpoint = cells.get("checkpoint K=auto", {}).get("seconds")
    ratio = {}
    for name in ("checkfree", "checkfree+", "ladder"):
        mine = cells.get(name, {}).get("seconds")
        ratio[name] = mine / checkpoint if mine and checkpoint else None
    return {
        "cells": cells,
        "winner": min(timed, key=timed.get) if timed else None,
        "over_best_checkpoint": ratio,
        "auto_k": results["costs"].get("checkpoint_every_auto"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--per-hour", type=float, default=0.1, help="failure rate per stage and hour")
    parser.add_argument("--storage", default="100,1000", help="storage bandwidths in MB/s")
    parser.add_argument("--eval-batches", type=int, default=32, help="held-out microbatches per evaluation")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "regimes.json")
    parser.add_argument("--trained-step-seconds", type=float, metavar="SECONDS",
                        help="the trained model's step time, measured earlier on a quiet machine (default: measured "
                        "by this sweep's no-failure run, which other load on the machine inflates)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch threads of each bench (default: torch's)")
    parser.add_argument("--reuse-since", type=datetime.datetime.fromisoformat, metavar="ISO_TIME",
                        help="reuse a regime's results written at or after this time")  # fmt: skip
    args = parser.parse_args()
    rows = []
    for name, stage_mib, step in SIZES:
        for storage in (float(s) for s in args.storage.split(",")):
            out = RESULTS / "regimes" / f"{stage_mib or 'trained'}-mib-{storage:g}-mbs"
            result = verdict(reused(out, args.reuse_since) or bench(out, stage_mib, step, storage, args))
            rows.append({"regime": name, "stage_mib": stage_mib, "step_seconds": step,
                         "storage_mb_s": storage, **result})  # fmt: skip
            ratios = ", ".join(f"{k} {v:.2f}x" if v else f"{k} -" for k, v in result["over_best_checkpoint"].items())
            print(f"{name}, storage {storage:g} MB/s: winner {result['winner']}; over the best checkpointing "
                  f"(K={result['auto_k']}): {ratios}", flush=True)  # fmt: skip
    write_results(args.out, {"iterations": args.iterations, "seeds": args.seeds, "per_hour": args.per_hour,
                             "eval_batches": args.eval_batches,
                             "failure_overhead_seconds": FAILURE_OVERHEAD, "regimes": rows})  # fmt: skip


if __name__ == "__main__":
    main()
