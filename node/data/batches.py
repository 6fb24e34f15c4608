"""Batches as pure functions of (tokens, seed, step): a replayed step sees exactly the same data."""

from __future__ import annotations

import torch

from node.config import TrainConfig

_SEED_MIX = 1_000_003
_SEED_MOD = 1 << 63


def _check(tokens: torch.Tensor, seq_len: int, what: str, **sizes: int) -> None:
    for name, value in {**sizes, "seq_len": seq_len}.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if tokens.dim() != 1:
        raise ValueError(f"{what} tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens)} {what} tokens cannot hold a window of seq_len + 1 = {seq_len + 1}")


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``seq_len + 1`` tokens at ``starts``: (inputs, targets), int64, shifted by one token."""
    idx = starts.to(tokens.device).unsqueeze(1) + torch.arange(seq_len + 1, device=tokens.device).unsqueeze(0)
    window = tokens[idx].long()
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def step_seed(seed: int, step: int) -> int:
    """The generator seed of training step ``step``: a mix of both, kept in 63-bit range."""
    return (seed * _SEED_MIX + step) % _SEED_MOD


def batch_for_step(
    tokens: torch.Tensor, *, seed: int, step: int, num_microbatches: int, microbatch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The microbatches ``[(inputs, targets), ...]`` of training step ``step``.

    A pure function of its arguments: ``num_microbatches * microbatch_size`` window starts are drawn
    uniformly from ``[0, len(tokens) - seq_len - 1]`` by a generator seeded with :func:`step_seed`. Each
    tensor is int64 of shape ``(microbatch_size, seq_len)``; targets are the inputs shifted by one token.
    Raises ``ValueError`` for a negative step, non-positive sizes, or too few tokens.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    _check(tokens, seq_len, "training", num_microbatches=num_microbatches, microbatch_size=microbatch_size)
    gen = torch.Generator().manual_seed(step_seed(seed, step))
    count = num_microbatches * microbatch_size
    starts = torch.randint(0, len(tokens) - seq_len, (count,), generator=gen)
    inputs, targets = _windows(tokens, starts, seq_len)
    return list(zip(inputs.split(microbatch_size), targets.split(microbatch_size), strict=True))


def training_batch(tokens: torch.Tensor, train: TrainConfig, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`batch_for_step` with the sizes and seed of ``train``: the batch of step ``step`` (from 0)."""
    return batch_for_step(
        tokens,
        seed=train.seed,
        step=step,
        num_microbatches=train.microbatches_per_step,
        microbatch_size=train.microbatch_size,
        seq_len=train.seq_len,
    )


def validation_batches(
    tokens: torch.Tensor, *, num_batches: int, batch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of ``num_batches`` batches of evenly spaced windows of the held-out tokens.

    The same on every call; each ``(inputs, targets)`` is int64 of shape ``(batch_size, seq_len)``, the
    first window at offset 0 and the last at ``len(tokens) - seq_len - 1`` (windows may overlap when the
    tokens are few). Raises ``ValueError`` for non-positive sizes or too few tokens.
    """
    _check(tokens, seq_len, "validation", num_batches=num_batches, batch_size=batch_size)
    count = num_batches * batch_size
    last = len(tokens) - seq_len - 1
    # integer arithmetic: exact for any length, unlike a float32 linspace
    starts = torch.arange(count, dtype=torch.int64) * last // max(count - 1, 1)
    inputs, targets = _windows(tokens, starts, seq_len)
    return list(zip(inputs.split(batch_size), targets.split(batch_size), strict=True))
