"""Handoff on a preemption notice: how long a preempted stage takes to reach its successor, against the transfer
bound, for block stages of about 1.5 MiB, 13.5 MiB, 145 MiB and 1.03 GiB of fp32 weights.

Each run is ``swarm-node local`` with 4 stages, a spare waiting, and ``--preempt 2@STEP:30:signal`` (SIGTERM,
as docker stop or systemd send it, with a 30 s window), under ``--check-reference``. The model is cut down to
tiny microbatches (16 tokens), so that compute stays small next to the state that moves. Per run:

- notice → successor: from the notice to the successor holding the stage (its ``recovery`` event);
- notice → next commit: from the notice to the first step committed after the successor took over;
- bytes moved: the full state (weights and both AdamW moments), as fetched;
- the transfer bound: those bytes at the loopback gRPC rate measured in the same run (the bare path of
  ``benchmarks/transport.py``), and the ratios against it. Goal: notice → next commit ≤ 1.5 × bound + one step;
- exact: the run's final weights equal the single-process reference's (the handoff cost no loss);
- where the time goes, from the events file: notice → the successor starts fetching (the spare's DHT poll,
  its claim and the claim's settle period, planning), the fetch, the load, the successor's recovery → stage 0's
  next attempt, and that attempt → its commit.

``--soft-first`` compares two variants per size instead, both with AWS notices from a local metadata server
(``--preempt 2@STEP:30:aws``): the hard notice alone, and the same hard notice after a rebalance recommendation
40 steps earlier (``:soft@STEP-40``), with which the node pre-stages its state and the spare stands by.

    python benchmarks/handoff.py [--sizes small,medium,large,huge] [--repeats 2] [--soft-first] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

from _common import REPO, RESULTS, local_swarm, write_results

from node import events as ev

# block-stage weights: ~1.5 MiB (the default tiny model), ~13.5 MiB, ~145 MiB, and ~1.03 GiB (one layer of
# d_model 8192 per block stage, 3 stages: a 4-stage swarm of that size does not fit in 24 GiB with its spare)
SIZES = {
    "small": {},
    "medium": {"d_model": 544},
    "large": {"d_model": 2048},
    "huge": {"d_model": 8192, "n_layers": 2},
}
STAGES = {"huge": 3}  # the others run 4 stages
PREEMPT_AT = {"large": 40, "huge": 12}  # steps take seconds at these sizes: preempt early (the spare is up)
TRAIN = "[train]\nseq_len = 16\nmicrobatch_size = 1\nmicrobatches_per_step = 2\n"
PREEMPT_STEP = 250  # late enough for the spare (started once training starts) to be waiting (steps take ~0.05 s)
STEPS = 260
AWS_STEPS = 400  # the AWS metadata service is polled every 5 s: room for the notice to arrive and be handled
SOFT_LEAD_STEPS = 40  # the rebalance recommendation comes this many steps (several seconds) before the notice


def loopback_rate() -> float:
    """Bytes per second of a bare gRPC byte stream on loopback (64 MiB), from benchmarks/transport.py."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "transport.json"
        cmd = [sys.executable, "benchmarks/transport.py", "--sizes-mib", "64", "--repeats", "3", "--out", str(out)]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        row = json.loads(out.read_text())["rows"][0]
    return row["bytes"] / row["bare_seconds"]


def preempt_spec(variant: str, at: int) -> str:
    """``--preempt`` of stage 2 for ``variant``, at step ``at``."""
    return {
        "signal": f"2@{at}:30:signal",
        "hard": f"2@{at}:30:aws",
        "soft-first": f"2@{at}:30:aws:soft@{max(1, at - SOFT_LEAD_STEPS)}",
    }[variant]


def phases(events: list[ev.Event], stage: int = 2) -> dict[str, float]:
    """Where notice → next commit went, in seconds, from the events of one run."""
    notice = min((e for e in ev.of_type(events, ev.NoticeEvent) if e.stage == stage and e.kind == "terminate"),
                 key=lambda e: e.time)  # fmt: skip
    [recovery] = [e for e in ev.of_type(events, ev.RecoveryEvent) if e.method == "handoff"]
    started = recovery.time - recovery.rebuild_seconds  # the successor plans and starts fetching
    fetched = started + recovery.fetch_seconds
    attempt = min((e.time for e in ev.of_type(events, ev.AttemptEvent) if e.time > recovery.time), default=None)
    commit = min((e.time for e in ev.of_type(events, ev.StepEvent) if e.time > recovery.time), default=None)
    handed = [e.time for e in ev.of_type(events, ev.HandedOverEvent) if e.stage == stage]
    out = {
        "notice_to_fetch_start": started - notice.time,
        "fetch": recovery.fetch_seconds,
        "load": recovery.time - fetched,
        "recovered_to_next_attempt": (attempt - recovery.time) if attempt is not None else float("nan"),
        "next_attempt_to_commit": (commit - attempt) if commit is not None and attempt is not None else float("nan"),
        "notice_to_handed_over": (handed[0] - notice.time) if handed else float("nan"),
    }
    return {k: round(v, 4) for k, v in out.items()}


def one_run(size: str, rate: float, variant: str = "signal") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = pathlib.Path(tmp) / "cfg.toml"
        model = "".join(f"{k} = {v}\n" for k, v in SIZES[size].items())
        cfg.write_text(f"[model]\n{model}{TRAIN}")
        at = PREEMPT_AT.get(size, PREEMPT_STEP)
        steps = at + (STEPS - PREEMPT_STEP if variant == "signal" else AWS_STEPS - PREEMPT_STEP)
        preempt = preempt_spec(variant, at)
        args = ["--config", str(cfg), "--stages", str(STAGES.get(size, 4)), "--steps", str(steps), "--threads", "1",
                "--spares", "1", "--preempt", preempt, "--check-reference"]  # fmt: skip
        with local_swarm(args) as swarm:
            summary = swarm.summary(timeout=1800)
            events = ev.read_events(pathlib.Path(summary["workdir"]) / "events.jsonl")
    handoffs = [r for r in summary["recoveries"] if r["method"] == "handoff"]
    if len(handoffs) != 1:
        raise RuntimeError(f"{variant}: expected one handoff, got recoveries {summary['recoveries']}")
    handoff = handoffs[0]
    step = statistics.median(summary["step_seconds"])
    bound = handoff["bytes_fetched"] / rate
    return {
        "size": size,
        "variant": variant,
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
        "phases": phases(events),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--soft-first", action="store_true", help="AWS notices, without and with a soft one first")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "handoff.json")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = set(sizes) - set(SIZES)
    if unknown:
        parser.error(f"unknown sizes {sorted(unknown)} (choose from {', '.join(SIZES)})")
    rate = loopback_rate()
    print(f"loopback gRPC rate: {rate / 2**30:.2f} GiB/s")
    runs = []
    variants = ["hard", "soft-first"] if args.soft_first else ["signal"]
    for size in sizes:
        for i in range(args.repeats):
            for variant in variants:
                row = one_run(size, rate, variant)
                runs.append(row)
                report(row, i)
    write_results(args.out, {"benchmark": "handoff", "loopback_bytes_per_second": rate, "runs": runs})


def report(row: dict, i: int) -> None:
    print(
        f"{row['size']:>6} {row['variant']:>10} run {i + 1}: {row['bytes'] / 2**20:7.1f} MiB moved, "
        f"notice->successor {row['notice_to_successor_seconds']:.2f} s, notice->next commit "
        f"{row['notice_to_next_commit_seconds']:.2f} s (bound {row['transfer_bound_seconds']:.3f} s, "
        f"step {row['step_seconds']:.2f} s, goal {'met' if row['meets_goal'] else 'missed'}), "
        f"reference diff {row['reference_max_abs_diff']}; phases {row['phases']}"
    )


if __name__ == "__main__":
    main()
