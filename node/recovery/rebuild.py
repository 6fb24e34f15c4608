"""Carrying out a recovery plan as pure functions: the sources' committed state in, a rebuild spec out.

The daemon (over the network) and ``bench --mode simulate`` (in one process) both turn a
:class:`~node.recovery.planner.RecoveryPlan` and what they fetched into a :class:`RebuildSpec` here, and
build the stage's runtime from it with :func:`build_runtime`, so both rebuild by the same formula.

The CheckFree average weights each neighbour by its gradient norm at its last committed step, taken
*before* clipping (the reference simulator takes it after clipping to 1.0, where it saturates and the
average degenerates to 0.5/0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from node.config import SwarmConfig
from node.model import build_stage
from node.recovery.planner import EPSILON, Method, RecoveryPlan
from node.stage.runtime import StageRuntime


class BadSource(ValueError):
    """A source sent state that cannot be this stage's: wrong names, shapes or dtypes, or non-finite values."""


class SourcesDisagree(ValueError):
    """The sources are at different committed steps (a commit landed while fetching): fetch again."""


@dataclass(frozen=True)
class Fetched:
    """One source stage's committed state."""

    stage: int
    step: int
    grad_norm: float
    weights: dict[str, torch.Tensor]
    nbytes: int = 0


@dataclass(frozen=True)
class RebuildSpec:
    """Everything a rebuilt stage starts from; its optimizer is always fresh, at lr × ``lr_scale``."""

    committed_step: int
    weights: dict[str, torch.Tensor] | None  # None: ``random_seed``'s fresh weights
    grad_norm: float
    lr_scale: float
    random_seed: int | None = None


TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def expected_state(cfg: SwarmConfig, stage: int) -> TensorSpec:
    """Name -> (shape, dtype) of stage ``stage``'s weights, from a module built on the meta device (no memory)."""
    with torch.device("meta"):
        module = build_stage(cfg, stage)
    return {name: (tuple(t.shape), t.dtype) for name, t in module.state_dict().items()}


def state_bytes(spec: TensorSpec) -> int:
    """Bytes of a state of this spec."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for shape, dtype in spec.values())


def check_weights(weights: dict[str, torch.Tensor], spec: TensorSpec, source: str) -> None:
    """Raises :class:`BadSource` unless ``weights`` has exactly the names, shapes and dtypes of ``spec`` and only
    finite values."""
    if weights.keys() != spec.keys():
        odd = sorted(weights.keys() ^ spec.keys())
        raise BadSource(f"{source} sent tensors {odd[:3]} that do not match the stage's ({len(odd)} differ)")
    for name, (shape, dtype) in spec.items():
        t = weights[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise BadSource(f"{source}: {name} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BadSource(f"{source}: {name} holds NaN or Inf")


def check_source(fetched: Fetched, spec: TensorSpec) -> None:
    """A neighbour's committed state is usable: its weights fit ``spec`` and its gradient norm is a finite,
    non-negative number (the CheckFree weights are made of it)."""
    source = f"stage {fetched.stage}"
    if not (math.isfinite(fetched.grad_norm) and fetched.grad_norm >= 0):
        raise BadSource(f"{source} sent a gradient norm of {fetched.grad_norm}")
    if fetched.step < 0:
        raise BadSource(f"{source} sent committed step {fetched.step}")
    check_weights(fetched.weights, spec, source)


def checkfree_average(
    lower: dict[str, torch.Tensor], lower_norm: float, upper: dict[str, torch.Tensor], upper_norm: float
) -> dict[str, torch.Tensor]:
    """W = (g₊·W₊ + g₋·W₋) / (g₊ + g₋) element-wise over every tensor, with g = norm + ε."""
    if lower.keys() != upper.keys():
        raise ValueError(f"neighbour stages hold different tensors: {sorted(lower.keys() ^ upper.keys())[:4]}")
    g_lo, g_hi = lower_norm + EPSILON, upper_norm + EPSILON
    out = {}
    for name, w_lo in lower.items():
        w_hi = upper[name]
        if w_lo.shape != w_hi.shape:
            raise ValueError(f"{name}: shapes {tuple(w_lo.shape)} and {tuple(w_hi.shape)} differ")
        out[name] = (g_hi * w_hi.double() + g_lo * w_lo.double()).div(g_hi + g_lo).to(w_lo.dtype)
    return out


def rebuild_spec(
    plan: RecoveryPlan, fetched: Sequence[Fetched], committed: int, lr_scale: float, random_seed: int
) -> RebuildSpec:
    """The spec of a ``checkfree``, ``copy``, ``partner_copy`` or ``random`` plan over its fetched sources.

    ``committed`` is the swarm's committed step (a random rebuild fetches nothing and starts there);
    ``random_seed`` is used by ``random`` only. Raises :class:`SourcesDisagree` when the sources are at
    different steps."""
    steps = {f.step for f in fetched} | ({committed} if plan.method == Method.RANDOM else set())
    if len(steps) > 1:
        raise SourcesDisagree(f"sources disagree on the committed step {sorted(steps)}")
    step = steps.pop() if steps else committed
    if plan.method == Method.CHECKFREE:
        lo, hi = fetched
        weights = checkfree_average(lo.weights, lo.grad_norm, hi.weights, hi.grad_norm)
        return RebuildSpec(step, weights, (lo.grad_norm + hi.grad_norm) / 2, lr_scale)
    if plan.method in (Method.COPY, Method.PARTNER_COPY):
        (src,) = fetched
        return RebuildSpec(step, src.weights, src.grad_norm, lr_scale)
    if plan.method == Method.RANDOM:
        return RebuildSpec(step, None, 0.0, lr_scale, random_seed=random_seed)
    raise ValueError(f"{plan.method} is not rebuilt from neighbours' weights")


def build_runtime(cfg: SwarmConfig, stage: int, device: torch.device, spec: RebuildSpec) -> StageRuntime:
    """The stage's runtime from ``spec`` (run it on the compute thread)."""
    return StageRuntime(
        cfg,
        stage,
        device,
        lr_scale=spec.lr_scale,
        weights=spec.weights,
        committed_step=spec.committed_step,
        last_grad_norm=spec.grad_norm,
        random_seed=spec.random_seed,
    )
