"""AdamW as every stage (and the reference) builds it, and the device/autocast choice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from node.config import TrainConfig


def make_optimizer(module: nn.Module, cfg: TrainConfig, lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; ``lr_scale`` > 1 for a freshly rebuilt stage."""
    decay = [p for p in module.parameters() if p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr * lr_scale,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps,
        foreach=False,
    )


def grad_norm_sq(module: nn.Module) -> float:
    """Squared L2 norm of the module's accumulated gradient (fp64 accumulation, before clipping)."""
    total = 0.0
    for p in module.parameters():
        if p.grad is not None:
            total += float(p.grad.detach().double().pow(2).sum())
    return total


def clip_coefficient(global_norm: float, max_norm: float) -> float:
    """The factor every stage multiplies its gradient by, as torch.nn.utils.clip_grad_norm_ does."""
    return min(1.0, max_norm / (global_norm + 1e-6))


def pick_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return dev


@contextlib.contextmanager
def autocast_for(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA; full precision on CPU (so the swarm matches the reference exactly)."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
