"""Pipeline topology: routes, swap partners, route neighbours and stage-0 copy holders.

Pure functions of the swarm's shape (S stages, in-order or CheckFree+ out-of-order), shared by the stages,
the recovery planner, the single-process reference and the simulator. Nothing here imports another
``node`` module.

Plain pipeline: 0 → 1 → … → S-1 → 0. With the CheckFree+ out-of-order pipeline, odd microbatches swap the
first two block stages and the last two (0 → 2 → 1 → 3 … → S-1 → S-2 → 0), so each edge stage also learns
to stand in for its *swap partner*. The swaps are derived from S and need S ≥ 5 to be disjoint.
"""

from __future__ import annotations


def default_route(num_stages: int) -> list[int]:
    """0 → 1 → … → S-1 → 0: stage 0 embeds at the start and computes the loss at the end."""
    return [0, *range(1, num_stages), 0]


def route_for(microbatch: int, num_stages: int, out_of_order: bool = False) -> list[int]:
    """The route of ``microbatch``: swapped edges on odd microbatches when ``out_of_order``."""
    route = default_route(num_stages)
    if out_of_order and microbatch % 2 == 1:
        if num_stages < 5:
            raise ValueError(f"out-of-order routes need at least 5 stages, got {num_stages}")
        route[1], route[2] = route[2], route[1]
        route[-3], route[-2] = route[-2], route[-3]
    return route


def swap_partner(stage: int, num_stages: int, out_of_order: bool) -> int | None:
    """The stage that ``stage`` trades places with on odd microbatches (None for middle stages and stage 0)."""
    if not out_of_order or stage == 0:
        return None
    pairs = {1: 2, 2: 1, num_stages - 2: num_stages - 1, num_stages - 1: num_stages - 2}
    return pairs.get(stage)


def check_route(
    route: list[int], hop: int, stage: int, microbatch: int, num_stages: int, out_of_order: bool = False
) -> str | None:
    """Why a message's (route, hop) is invalid for the receiving ``stage``, or None when it is fine."""
    expected = route_for(microbatch, num_stages, out_of_order)
    if list(route) != expected:
        return f"route {list(route)} is not this swarm's route {expected} for microbatch {microbatch}"
    if not 0 <= hop < len(route) or route[hop] != stage:
        return f"hop {hop} of route {list(route)} is not stage {stage}"
    return None


def copy_holders(num_stages: int) -> tuple[int, ...]:
    """Stages that keep a copy of stage 0 under checkfree+: its two route neighbours, 1 and S-1."""
    return (1, num_stages - 1)


def snapshot_holder(stage: int, num_stages: int) -> int:
    """The stage that keeps ``stage``'s neighbour snapshots (``--recovery ladder``): the next stage on the route,
    and for the last stage the one before it (a block stage, since stage 0 already carries the most state)."""
    return stage + 1 if stage + 1 < num_stages else stage - 1


def neighbour_stages(stage: int, num_stages: int) -> tuple[int, ...]:
    """The stages a stage heartbeats: its route neighbours; stage 0 watches every stage (it drives steps)."""
    if stage == 0:
        return tuple(range(1, num_stages))
    return tuple(sorted({stage - 1, (stage + 1) % num_stages}))


def heartbeat_side(stage: int, other: int, num_stages: int) -> str | None:
    """Which route neighbour ``other`` is to ``stage`` (the ``side`` label of the heartbeat RTT): ``prev`` or
    ``next``; ``None`` for a stage stage 0 watches without being its neighbour."""
    if other == (stage - 1) % num_stages:
        return "prev"
    if other == (stage + 1) % num_stages:
        return "next"
    return None


def nearest_live_block_stages(stage: int, num_stages: int, live: frozenset[int]) -> tuple[int | None, int | None]:
    """The nearest live block stage below and above ``stage`` (stage 0 is not a block stage)."""
    below = next((s for s in range(stage - 1, 0, -1) if s in live), None)
    above = next((s for s in range(stage + 1, num_stages) if s in live), None)
    return below, above
