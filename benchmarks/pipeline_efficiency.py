"""Pipeline efficiency: swarm tokens/s ÷ single-process tokens/s, same model, batches and machine.

The swarm is ``swarm-node local`` (S processes, real DHT, real gRPC on loopback); the baseline is the
single-process reference trainer (node/train/reference.py) using all cores. Both skip warm-up steps and use
the median step time. Goal: ≥ 0.8.

    python benchmarks/pipeline_efficiency.py [--stages 4] [--steps 30] [--preset tiny] [--out ...json]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics

import torch
from _common import RESULTS, run_local, write_results

from node.config import build_config
from node.data import load_corpus
from node.train.reference import train_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--microbatches", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "pipeline_efficiency.json")
    args = parser.parse_args()
    overrides: dict = {"num_stages": args.stages}
    extra = []
    if args.microbatches:
        overrides["train"] = {"microbatches_per_step": args.microbatches}
        extra = ["--microbatches", str(args.microbatches)]
    cfg = build_config(preset=args.preset, overrides=overrides)
    tokens_per_step = cfg.train.microbatches_per_step * cfg.train.microbatch_size * cfg.train.seq_len

    swarm = run_local(["--stages", str(args.stages), "--steps", str(args.steps), "--preset", args.preset, *extra])
    swarm_step = statistics.median(swarm["step_seconds"][args.warmup :])

    torch.set_num_threads(os.cpu_count() or 1)
    ref = train_reference(cfg, load_corpus(None).train, args.steps)
    single_step = statistics.median(ref.step_seconds[args.warmup :])

    result = {
        "benchmark": "pipeline_efficiency",
        "preset": args.preset,
        "stages": args.stages,
        "steps": args.steps,
        "cores": os.cpu_count(),
        "microbatches_per_step": cfg.train.microbatches_per_step,
        "tokens_per_step": tokens_per_step,
        "swarm_step_seconds": swarm_step,
        "single_step_seconds": single_step,
        "swarm_tokens_per_second": tokens_per_step / swarm_step,
        "single_tokens_per_second": tokens_per_step / single_step,
        "efficiency": single_step / swarm_step,
        "goal": 0.8,
    }
    print(
        f"swarm  : {result['swarm_tokens_per_second']:,.0f} tokens/s ({swarm_step:.3f} s/step, {args.stages} processes)"
    )
    print(f"single : {result['single_tokens_per_second']:,.0f} tokens/s ({single_step:.3f} s/step, 1 process)")
    print(f"pipeline efficiency: {result['efficiency']:.2f} (goal >= 0.8)")
    write_results(args.out, result)


if __name__ == "__main__":
    main()
