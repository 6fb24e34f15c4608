"""The single-process reference: the same model, batches, clipping and AdamW as the swarm, in one process.

``swarm-node local --check-reference`` compares the swarm's final weights against this, and the pipeline
efficiency benchmark uses its throughput as the baseline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from node.config import SwarmConfig
from node.data import training_batch
from node.model import FullModel
from node.topology import route_for
from node.train.commit import apply_update, decide_commit
from node.train.optim import autocast_for, grad_norm_sq, make_optimizer
from node.train.partials import combine_partials


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
    on_step: Callable[[int, float, FullModel], None] | None = None,
    threads: int | None = None,
    assignments: Mapping[int, Mapping[str, list[list[int]]]] | None = None,
    restores: Mapping[int, Mapping[int, int]] | None = None,
) -> ReferenceRun:
    """Trains ``steps`` steps exactly as the swarm does (per-stage AdamW is per-parameter, so one optimizer
    over the whole model is the same math, and :class:`FullModel` loses what the config's ``wire_dtype``
    loses between stages). ``on_step(step, loss, model)`` runs after each committed step.

    ``threads``: torch CPU threads for this run (restored afterwards). Pass the stages' count to compare bit for
    bit: MKL splits a weight gradient's reduction across threads on some CPUs (AVX-512), so the order of the
    sums, and the last bits, depend on the thread count.

    ``assignments``: committed step (from 1) -> stage -> the microbatches each replica of that stage computed
    (as the swarm's step events record them). Such a stage's gradient is then summed as the replicas sum it:
    each share's microbatches in order, then the shares by :func:`combine_partials`.

    ``restores``: committed step N -> stage -> an earlier step M: after step N, that stage's weights and AdamW
    state go back to what they were after step M (a neighbour snapshot restored M steps stale, as the swarm's
    recovery events record it)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(cfg, tokens, steps, device or torch.device("cpu"), on_step, assignments or {}, restores or {})
    finally:
        torch.set_num_threads(previous)


def _train(
    cfg: SwarmConfig,
    tokens: torch.Tensor,
    steps: int,
    device: torch.device,
    on_step: Callable[[int, float, FullModel], None] | None,
    assignments: Mapping[int, Mapping[str, list[list[int]]]],
    restores: Mapping[int, Mapping[int, int]],
) -> ReferenceRun:
    t = cfg.train
    model = FullModel(cfg).to(device)
    optimizer = make_optimizer(model, t)
    run = ReferenceRun(model)
    wanted = {(stage, earlier) for per_stage in restores.values() for stage, earlier in per_stage.items()}
    kept: dict[tuple[int, int], tuple[dict, list]] = {}
    for stage, earlier in wanted:  # the snapshot of step 0: the seed's initial state, AdamW state empty
        if earlier == 0:
            kept[stage, 0] = _stage_state(model.stages[stage], optimizer)
    for step in range(steps):
        started = time.perf_counter()
        batch = training_batch(tokens, t, step)
        losses = []
        shares = {int(s): groups for s, groups in assignments.get(step + 1, {}).items()}
        partials = {s: [{} for _ in groups] for s, groups in shares.items()}
        for mb, (x, y) in enumerate(batch):
            route = route_for(mb, cfg.num_stages, cfg.out_of_order)[1:-1]
            with autocast_for(device):
                loss = model(x.to(device), y.to(device), route)
            (loss / t.microbatches_per_step).backward()
            losses.append(float(loss.detach()))
            for s, groups in shares.items():  # this microbatch's gradient goes to its replica's partial
                k = next(i for i, group in enumerate(groups) if mb in group)
                for name, p in model.stages[s].named_parameters():
                    if p.grad is not None:
                        if name in partials[s][k]:
                            partials[s][k][name] += p.grad
                        else:
                            partials[s][k][name] = p.grad
                        p.grad = None
        for s, groups in shares.items():
            total = combine_partials([(group[0], partials[s][k]) for k, group in enumerate(groups)])
            for name, p in model.stages[s].named_parameters():
                if name in total:
                    p.grad = total[name]
        norms = {s: grad_norm_sq(stage) for s, stage in enumerate(model.stages)}
        decision = decide_commit(norms, cfg.num_stages, t.grad_clip)
        if not decision.commit:
            raise FloatingPointError(f"reference step {step + 1}: {decision.reason}")
        apply_update(model, optimizer, decision.clip_coef)
        for stage in range(cfg.num_stages):
            if (stage, step + 1) in wanted:
                kept[stage, step + 1] = _stage_state(model.stages[stage], optimizer)
        for stage, earlier in restores.get(step + 1, {}).items():
            _load_stage_state(model.stages[stage], optimizer, kept[stage, earlier])
        run.losses.append(sum(losses) / len(losses))
        run.step_seconds.append(time.perf_counter() - started)
        if on_step is not None:
            on_step(step + 1, run.losses[-1], model)
    return run


@torch.no_grad()
def validation_loss(model: FullModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The mean loss over ``batches`` along the in-order route, as stage 0's evaluation computes it (activations
    cross the wire forward only)."""
    device = next(model.parameters()).device
    losses = []
    for x, y in batches:
        with autocast_for(device):
            losses.append(float(model(x.to(device), y.to(device))))
    return sum(losses) / len(losses)


def _stage_state(stage: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """A copy of one stage's weights and AdamW state (per parameter, in order)."""
    per_param = [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                 for p in stage.parameters()]  # fmt: skip
    return {k: v.clone() for k, v in stage.state_dict().items()}, per_param


def _load_stage_state(stage: torch.nn.Module, optimizer: torch.optim.Optimizer, state: tuple[dict, list]) -> None:
    weights, per_param = state
    stage.load_state_dict(weights)
    for p, saved in zip(stage.parameters(), per_param, strict=True):
        optimizer.state[p] = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved.items()}
