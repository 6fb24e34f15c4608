"""The commit decision of a step: pure, and the same in the daemon, the simulator and the reference.

Every stage reports the squared L2 norm of its accumulated gradient (before clipping, summed in fp64).
Stage 0 commits only when every stage answered with a finite, non-negative number; the clip coefficient is
then ``min(1, grad_clip / (sqrt(Σ norm²) + 1e-6))``, the rule of ``torch.nn.utils.clip_grad_norm_``,
summed in stage order so every caller gets the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from node.train.optim import clip_coefficient


@dataclass(frozen=True)
class CommitDecision:
    """Commit (with ``clip_coef``) or refuse (with ``reason``): the step is then aborted and replayed."""

    commit: bool
    global_norm: float = math.nan
    clip_coef: float = math.nan
    stage_norms: tuple[float, ...] = ()
    reason: str = ""


def decide_commit(
    norms_sq: Mapping[int, float | BaseException], num_stages: int, grad_clip: float
) -> CommitDecision:
    """The decision over each stage's prepared squared gradient norm (or the error it answered with)."""
    missing = [s for s in range(num_stages) if s not in norms_sq]
    if missing:
        return CommitDecision(False, reason=f"stage(s) {missing} did not prepare")
    for stage in range(num_stages):
        value = norms_sq[stage]
        if isinstance(value, BaseException):
            return CommitDecision(False, reason=f"stage {stage} refused prepare: {value}")
        if not (math.isfinite(value) and value >= 0):
            return CommitDecision(False, reason=f"stage {stage} reported a squared gradient norm of {value}")
    ordered = [float(norms_sq[s]) for s in range(num_stages)]  # type: ignore[arg-type]
    global_norm = math.sqrt(sum(ordered))
    if not math.isfinite(global_norm):
        return CommitDecision(False, reason=f"global gradient norm {global_norm} is not finite")
    return CommitDecision(
        True,
        global_norm=global_norm,
        clip_coef=clip_coefficient(global_norm, grad_clip),
        stage_norms=tuple(math.sqrt(n) for n in ordered),
    )


def apply_update(module: nn.Module, optimizer: torch.optim.Optimizer, clip_coef: float) -> None:
    """Phase 2 on one stage: scale the accumulated gradient by ``clip_coef``, step AdamW, clear the gradient."""
    if clip_coef < 1.0:
        for p in module.parameters():
            if p.grad is not None:
                p.grad.mul_(clip_coef)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
