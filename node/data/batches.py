"""Batches as pure functions of (tokens, seed, step): a replayed step sees exactly the same data."""

from __future__ import annotations

import torch


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts.unsqueeze(1) + torch.arange(seq_len + 1).unsqueeze(0)
    window = tokens[idx].long()
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def batch_for_step(
    tokens: torch.Tensor, *, seed: int, step: int, num_microbatches: int, microbatch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The M microbatches ``(inputs, targets)`` of training step ``step``; int64, (microbatch_size, seq_len)."""
    if step < 0 or num_microbatches <= 0 or microbatch_size <= 0 or seq_len <= 0:
        raise ValueError("step must be >= 0 and sizes positive")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens cannot hold a window of {seq_len + 1}")
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % (1 << 63))
    starts = torch.randint(0, len(tokens) - seq_len, (num_microbatches * microbatch_size,), generator=gen)
    inputs, targets = _windows(tokens, starts, seq_len)
    return list(zip(inputs.split(microbatch_size), targets.split(microbatch_size), strict=True))


def validation_batches(
    tokens: torch.Tensor, *, num_batches: int, batch_size: int, seq_len: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of evenly spaced windows of the held-out tokens (the same on every call)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{len(tokens)} validation tokens cannot hold a window of {seq_len + 1}")
    count = num_batches * batch_size
    starts = torch.linspace(0, len(tokens) - seq_len - 1, count).long()
    inputs, targets = _windows(tokens, starts, seq_len)
    return list(zip(inputs.split(batch_size), targets.split(batch_size), strict=True))
