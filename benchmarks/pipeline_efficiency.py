"""Pipeline efficiency: swarm tokens/s ÷ single-process tokens/s, same model, batches and machine.

The swarm is ``swarm-node local`` (S processes, real DHT, real gRPC on loopback); the baseline is the
single-process reference trainer (node/train/reference.py) using all cores. Each round runs both, one after
the other; the ratio is taken per round, and the report gives its median and range. Both skip warm-up steps
and use the median step time. Goal: ≥ 0.85.

Where the swarm's CPU goes (``_cpu.py``): during each round's steady state the script reads the CPU time of
every thread of the swarm's processes, by class (the stages' compute threads, their event loops and gRPC
threads, the DHT helpers, the launcher), per committed step, next to the single process's CPU per step.

    python benchmarks/pipeline_efficiency.py [--stages 4] [--steps 30] [--microbatches 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import statistics
import time

import torch
from _common import RESULTS, local_swarm, write_results
from _cpu import CLASSES, machine_busy, sample

from node.config import build_config
from node.data import load_corpus_for
from node.events import StepEvent, of_type, read_events
from node.train.reference import train_reference

GOAL = 0.85


def committed_steps(events: pathlib.Path) -> int:
    """The highest step the swarm's event log shows committed."""
    return max((e.step for e in of_type(read_events(events), StepEvent)), default=0)


def swarm_round(args: argparse.Namespace) -> dict:
    """One swarm run: its median step time past warm-up, and its CPU per step by class (steady state)."""
    cmd = ["--stages", str(args.stages), "--steps", str(args.steps), "--preset", args.preset,
           "--microbatches", str(args.microbatches)]  # fmt: skip
    with local_swarm(cmd) as swarm:
        events = swarm.summary_path.parent / "swarm" / "events.jsonl"
        marks: list[tuple[int, dict[str, float], tuple[float, float]]] = []
        wanted = [args.warmup, args.steps - 1]  # sample once warm, and again before the last step's shutdown
        while swarm.running() and wanted:
            step = committed_steps(events)
            if step >= wanted[0]:
                marks.append((step, sample(swarm.process.pid), machine_busy()))
                wanted.pop(0)
            time.sleep(0.05)
        summary = swarm.summary(timeout=600)
    result = {"step_seconds": statistics.median(summary["step_seconds"][args.warmup :])}
    if len(marks) == 2:
        (s0, cpu0, busy0), (s1, cpu1, busy1) = marks
        steps = s1 - s0
        result["cpu_seconds_per_step"] = {k: (cpu1[k] - cpu0[k]) / steps for k in CLASSES}
        result["machine_busy_fraction"] = (busy1[0] - busy0[0]) / max(1e-9, busy1[1] - busy0[1])
        result["sampled_steps"] = steps
    return result


def single_round(args: argparse.Namespace, cfg, tokens: torch.Tensor) -> dict:
    """The reference on all cores: median step time past warm-up and its CPU seconds per step."""
    torch.set_num_threads(os.cpu_count() or 1)
    before = resource.getrusage(resource.RUSAGE_SELF)
    ref = train_reference(cfg, tokens, args.steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    step_seconds = statistics.median(ref.step_seconds[args.warmup :])
    return {"step_seconds": step_seconds, "cpu_seconds_per_step": cpu / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "pipeline_efficiency.json")
    args = parser.parse_args()
    if args.steps < args.warmup + 3:
        parser.error("--steps must leave at least 3 steps after --warmup")
    cfg = build_config(
        preset=args.preset,
        overrides={"num_stages": args.stages, "train": {"microbatches_per_step": args.microbatches}},
    )
    tokens_per_step = cfg.train.microbatches_per_step * cfg.train.microbatch_size * cfg.train.seq_len
    tokens = load_corpus_for(cfg).train

    rounds = []
    for r in range(args.rounds):
        swarm, single = swarm_round(args), single_round(args, cfg, tokens)
        efficiency = single["step_seconds"] / swarm["step_seconds"]
        rounds.append({"swarm": swarm, "single": single, "efficiency": efficiency})
        print(
            f"round {r + 1}: swarm {tokens_per_step / swarm['step_seconds']:,.0f} tokens/s "
            f"({swarm['step_seconds']:.3f} s/step), single {tokens_per_step / single['step_seconds']:,.0f} tokens/s "
            f"({single['step_seconds']:.3f} s/step): efficiency {efficiency:.2f}"
        )
        if "cpu_seconds_per_step" in swarm:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in swarm["cpu_seconds_per_step"].items())
            print(
                f"  CPU s/step: swarm {parts} (machine busy {swarm['machine_busy_fraction']:.0%}); "
                f"single {single['cpu_seconds_per_step']:.2f}"
            )
    effs = [r["efficiency"] for r in rounds]
    result = {
        "benchmark": "pipeline_efficiency",
        "preset": args.preset,
        "stages": args.stages,
        "steps": args.steps,
        "cores": os.cpu_count(),
        "microbatches_per_step": cfg.train.microbatches_per_step,
        "tokens_per_step": tokens_per_step,
        "rounds": rounds,
        "efficiency": {"median": statistics.median(effs), "min": min(effs), "max": max(effs)},
        "goal": GOAL,
    }
    spread = f"range {min(effs):.2f}-{max(effs):.2f}"
    print(f"pipeline efficiency: median {statistics.median(effs):.2f} ({spread}; goal >= {GOAL})")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
