"""Summing the partial gradients of a stage's replicas in one fixed order, so that every replica (and the
single-process reference, given the same shares) holds the same gradient bit for bit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def combine_partials(partials: Sequence[tuple[int, Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """``partials``: (first microbatch of the share, gradient per parameter name). Returns their sum, taken in
    ascending order of first microbatch: ``((P₀ + P₁) + P₂) …``, each addition elementwise."""
    if not partials:
        raise ValueError("no partial gradients to combine")
    ordered = sorted(partials, key=lambda item: item[0])
    first = ordered[0][1]
    total = {name: grad.clone() for name, grad in first.items()}
    for _, grads in ordered[1:]:
        if grads.keys() != total.keys():
            raise ValueError("partial gradients of different parameters")
        for name, grad in grads.items():
            total[name] += grad.to(total[name].device, total[name].dtype)
    return total
