"""Microbatch routes through the pipeline: pure functions of the swarm's shape."""

from __future__ import annotations


def default_route(num_stages: int) -> list[int]:
    """0 → 1 → … → S-1 → 0: stage 0 embeds at the start and computes the loss at the end."""
    return [0, *range(1, num_stages), 0]


def route_for(microbatch: int, num_stages: int) -> list[int]:
    """The route of ``microbatch``; every microbatch follows the default route for now."""
    del microbatch
    return default_route(num_stages)


def check_route(route: list[int], hop: int, stage: int, microbatch: int, num_stages: int) -> str | None:
    """Why a message's (route, hop) is invalid for the receiving ``stage``, or None when it is fine."""
    expected = route_for(microbatch, num_stages)
    if list(route) != expected:
        return f"route {list(route)} is not this swarm's route {expected} for microbatch {microbatch}"
    if not 0 <= hop < len(route) or route[hop] != stage:
        return f"hop {hop} of route {list(route)} is not stage {stage}"
    return None
