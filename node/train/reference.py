"""The single-process reference: the same model, batches, clipping and AdamW as the swarm, in one process.

``swarm-node local --check-reference`` compares the swarm's final weights against this, and the pipeline
efficiency benchmark uses its throughput as the baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from node.config import SwarmConfig
from node.data import training_batch
from node.model import FullModel
from node.topology import route_for
from node.train.commit import apply_update, decide_commit
from node.train.optim import autocast_for, grad_norm_sq, make_optimizer


@dataclass
class ReferenceRun:
    model: FullModel
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    def stage_state(self, stage: int) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.stages[stage].state_dict().items()}


def train_reference(
    cfg: SwarmConfig,
    tokens: torch.Tensor,
    steps: int,
    device: torch.device | None = None,
    on_step: Callable[[int, float], None] | None = None,
    threads: int | None = None,
) -> ReferenceRun:
    """Trains ``steps`` steps exactly as the swarm does (per-stage AdamW is per-parameter, so one optimizer
    over the whole model is the same math).

    ``threads``: torch CPU threads for this run (restored afterwards). Pass the stages' count to compare bit for
    bit: MKL splits a weight gradient's reduction across threads on some CPUs (AVX-512), so the order of the
    sums, and the last bits, depend on the thread count."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(cfg, tokens, steps, device or torch.device("cpu"), on_step)
    finally:
        torch.set_num_threads(previous)


def _train(
    cfg: SwarmConfig,
    tokens: torch.Tensor,
    steps: int,
    device: torch.device,
    on_step: Callable[[int, float], None] | None,
) -> ReferenceRun:
    t = cfg.train
    model = FullModel(cfg).to(device)
    optimizer = make_optimizer(model, t)
    run = ReferenceRun(model)
    for step in range(steps):
        started = time.perf_counter()
        batch = training_batch(tokens, t, step)
        losses = []
        for mb, (x, y) in enumerate(batch):
            route = route_for(mb, cfg.num_stages, cfg.out_of_order)[1:-1]
            with autocast_for(device):
                loss = model(x.to(device), y.to(device), route)
            (loss / t.microbatches_per_step).backward()
            losses.append(float(loss.detach()))
        norms = {s: grad_norm_sq(stage) for s, stage in enumerate(model.stages)}
        decision = decide_commit(norms, cfg.num_stages, t.grad_clip)
        if not decision.commit:
            raise FloatingPointError(f"reference step {step + 1}: {decision.reason}")
        apply_update(model, optimizer, decision.clip_coef)
        run.losses.append(sum(losses) / len(losses))
        run.step_seconds.append(time.perf_counter() - started)
        if on_step is not None:
            on_step(step + 1, run.losses[-1])
    return run
