"""The CheckFree rebuild itself: a gradient-norm weighted average of neighbouring stages' weights.

The gradient norms are each stage's L2 norm of its accumulated gradient at its last committed step, taken
*before* clipping (the reference simulator takes it after clipping to 1.0, where it saturates and the
average degenerates to 0.5/0.5).
"""

from __future__ import annotations

import torch

from node.recovery.planner import EPSILON


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
