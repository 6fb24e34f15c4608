"""Handoff on a preemption notice: how long a preempted stage takes to reach its successor, against the transfer
bound, for block stages of about 1.5 MiB, 13.5 MiB and 145 MiB of fp32 weights.

Each run is ``swarm-node local`` with 4 stages, a spare waiting, and ``--preempt 2@STEP:30:signal`` (SIGTERM,
as docker stop or systemd send it, with a 30 s window), under ``--check-reference``. The model is cut down to
tiny microbatches (16 tokens), so that compute stays small next to the state that moves. Per run:

- notice → successor: from the notice to the successor holding the stage (its ``recovery`` event);
- notice → next commit: from the notice to the first step committed after the successor took over;
- bytes moved: the full state (weights and both AdamW moments), as fetched;
- the transfer bound: those bytes at the loopback gRPC rate measured in the same run (the bare path of
  ``benchmarks/transport.py``), and the ratios against it. Goal: notice → next commit ≤ 1.5 × bound + one step;
- exact: the run's final weights equal the single-process reference's (the handoff cost no loss).

    python benchmarks/handoff.py [--sizes small,medium,large] [--repeats 2] [--out benchmarks/results/handoff.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

from _common import REPO, RESULTS, run_local, write_results

# block-stage weights: ~1.5 MiB (the default tiny model), ~13.5 MiB, ~145 MiB
SIZES = {
    "small": {},
    "medium": {"d_model": 544},
    "large": {"d_model": 2048},
}
TRAIN = "[train]\nseq_len = 16\nmicrobatch_size = 1\nmicrobatches_per_step = 2\n"
PREEMPT_STEP = 100  # late enough for the spare (started once training starts) to be waiting
STEPS = 110


def loopback_rate() -> float:
    """Bytes per second of a bare gRPC byte stream on loopback (64 MiB), from benchmarks/transport.py."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "transport.json"
        cmd = [sys.executable, "benchmarks/transport.py", "--sizes-mib", "64", "--repeats", "3", "--out", str(out)]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        row = json.loads(out.read_text())["rows"][0]
    return row["bytes"] / row["bare_seconds"]


def one_run(size: str, rate: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pathlib.Path(tmp) / "cfg.toml"
        model = "".join(f"{k} = {v}\n" for k, v in SIZES[size].items())
        cfg.write_text(f"[model]\n{model}{TRAIN}")
        summary = run_local(
            ["--config", str(cfg), "--stages", "4", "--steps", str(STEPS), "--threads", "1", "--spares", "1",
             "--preempt", f"2@{PREEMPT_STEP}:30:signal", "--check-reference"],
            timeout=1800,
        )  # fmt: skip
    [handoff] = [r for r in summary["recoveries"] if r["method"] == "handoff"]
    step = statistics.median(summary["step_seconds"])
    bound = handoff["bytes_fetched"] / rate
    return {
        "size": size,
        "bytes": handoff["bytes_fetched"],
        "notice_to_successor_seconds": handoff["handoff_seconds"],
        "notice_to_next_commit_seconds": handoff["recover_seconds"],
        "transfer_bound_seconds": bound,
        "step_seconds": step,
        "successor_over_bound": handoff["handoff_seconds"] / bound,
        "next_commit_over_bound": handoff["recover_seconds"] / bound,
        "goal_next_commit_seconds": 1.5 * bound + step,
        "meets_goal": handoff["recover_seconds"] <= 1.5 * bound + step,
        "reference_max_abs_diff": summary["reference_max_abs_diff"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "handoff.json")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = set(sizes) - set(SIZES)
    if unknown:
        parser.error(f"unknown sizes {sorted(unknown)} (choose from {', '.join(SIZES)})")
    rate = loopback_rate()
    print(f"loopback gRPC rate: {rate / 2**30:.2f} GiB/s")
    runs = []
    for size in sizes:
        for i in range(args.repeats):
            row = one_run(size, rate)
            runs.append(row)
            print(
                f"{size:>6} run {i + 1}: {row['bytes'] / 2**20:7.1f} MiB moved, notice->successor "
                f"{row['notice_to_successor_seconds']:.2f} s, notice->next commit "
                f"{row['notice_to_next_commit_seconds']:.2f} s (bound {row['transfer_bound_seconds']:.3f} s, "
                f"step {row['step_seconds']:.2f} s, goal {'met' if row['meets_goal'] else 'missed'}), "
                f"reference diff {row['reference_max_abs_diff']}"
            )
    write_results(args.out, {"benchmark": "handoff", "loopback_bytes_per_second": rate, "runs": runs})


if __name__ == "__main__":
    main()
