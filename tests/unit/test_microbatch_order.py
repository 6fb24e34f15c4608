"""MicrobatchOrder: microbatches reach the compute thread in index order, also after a rollback."""

import asyncio

from node.stage.inflight import MicrobatchOrder


async def _admitted_order(order: MicrobatchOrder, step: int, attempt: int, committed: int) -> list[int]:
    """Microbatches 2, 1, 0 of one step arrive in that order; returns the order they are admitted in."""
    admitted: list[int] = []

    async def one(mb: int) -> None:
        await order.turn(step, attempt, "forward", mb - 1, committed, timeout=5.0)
        admitted.append(mb)
        await order.advance(step, attempt, "forward", mb)

    tasks = []
    for mb in (2, 1, 0):
        tasks.append(asyncio.create_task(one(mb)))
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    return admitted


async def test_microbatches_are_admitted_in_index_order() -> None:
    assert await _admitted_order(MicrobatchOrder(), step=3, attempt=0, committed=3) == [0, 1, 2]


async def test_an_older_step_after_a_reset_is_ordered_again() -> None:
    order = MicrobatchOrder()
    assert await _admitted_order(order, step=8, attempt=0, committed=8) == [0, 1, 2]
    # a rollback from step 8 to 6: step 6 sorts below the step in flight and would not be held back...
    assert await _admitted_order(order, step=6, attempt=1, committed=6) == [2, 1, 0]
    # ...until the order forgets it, as the daemon's rollback does
    await order.reset()
    assert await _admitted_order(order, step=6, attempt=2, committed=6) == [0, 1, 2]


async def test_a_replica_waits_only_for_the_microbatch_before_it_in_its_share() -> None:
    """Replica shares 1, 3 (and 0, 2 elsewhere): microbatch 3 waits for 1, and 1 (its first) for nothing."""
    order, admitted = MicrobatchOrder(), []

    async def one(mb: int, prev: int) -> None:
        await order.turn(5, 1, "backward", prev, 5, timeout=5.0)
        admitted.append(mb)
        await order.advance(5, 1, "backward", mb)

    late = asyncio.create_task(one(3, 1))
    await asyncio.sleep(0.02)
    assert admitted == []
    await one(1, -1)
    await late
    assert admitted == [1, 3]
