"""What a stage tracks of the step in flight, apart from its weights: the order in which microbatches may be
computed (:class:`MicrobatchOrder`), stage 0's futures of the step's microbatches (:class:`StepInFlight`),
and the partial gradients a replica's co-replicas sent it (:class:`PartialGradients`)."""

from __future__ import annotations

import asyncio
import contextlib

import torch

from node.stage.runtime import Reject, StepError


class MicrobatchOrder:
    """Admits the microbatches of the step in flight to the compute thread in order, per direction: each after
    the microbatch this node computes before it in the step (``prev``: the one below it, or with replicas the
    one below it in this replica's share; -1 for its first).

    Messages that are not for the step in flight (stale, ahead, older attempt) are not held back: the
    runtime refuses them. A newer attempt of the step releases everyone waiting on the older one.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._key: tuple[int, int] = (-1, -1)
        self._done: dict[str, set[int]] = {}

    async def turn(self, step: int, attempt: int, direction: str, prev: int, committed: int, timeout: float) -> None:
        async with self._cond:
            if step != committed or (step, attempt) < self._key:
                return
            if (step, attempt) > self._key:
                self._key, self._done = (step, attempt), {}
                self._cond.notify_all()
            key = self._key
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self._key != key or prev < 0 or prev in self._done.get(direction, ())),
                    timeout,
                )

    async def reset(self) -> None:
        """Forgets the step in flight (after a rollback the next step is an older one); releases waiters."""
        async with self._cond:
            self._key, self._done = (-1, -1), {}
            self._cond.notify_all()

    async def advance(self, step: int, attempt: int, direction: str, mb: int) -> None:
        async with self._cond:
            if (step, attempt) == self._key:
                self._done.setdefault(direction, set()).add(mb)
                self._cond.notify_all()


class PartialGradients:
    """The partial gradients this replica's co-replicas sent for the step in flight (``PushGradients``), until
    its own ``Prepare`` takes them. Only the newest (step, attempt) is kept, from at most ``max_peers`` peers."""

    def __init__(self, max_peers: int = 64) -> None:
        self._cond = asyncio.Condition()
        self._key: tuple[int, int] = (-1, -1)
        self._got: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}
        self.max_peers = max_peers

    async def put(self, step: int, attempt: int, peer: str, first: int, grads: dict[str, torch.Tensor]) -> bool:
        async with self._cond:
            if (step, attempt) > self._key:
                self._key, self._got = (step, attempt), {}
            if (step, attempt) != self._key or (peer not in self._got and len(self._got) >= self.max_peers):
                return False
            self._got[peer] = (first, grads)
            self._cond.notify_all()
            return True

    async def take(
        self, step: int, attempt: int, expected: dict[str, int], timeout: float
    ) -> list[tuple[int, dict[str, torch.Tensor]]]:
        """The partials of the peers in ``expected`` (peer -> first microbatch of its share), waiting for them."""
        if not expected:  # every other replica has an empty share (joiners): nobody sends this one anything
            return []

        def complete() -> bool:
            return self._key == (step, attempt) and all(
                p in self._got and self._got[p][0] == first for p, first in expected.items()
            )

        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(complete), timeout)
            except TimeoutError:
                missing = sorted(p for p in expected if p not in self._got or self._key != (step, attempt))
                raise StepError(Reject.INCOMPLETE, f"step {step}: no partial gradient from {missing}") from None
            return [self._got[p] for p in expected]


class StepInFlight:
    """Stage 0's side of the step (or evaluation) in flight: a future per microbatch that resolves when its
    backward pass is home (or, for an evaluation, with its loss), the targets and the losses."""

    def __init__(self) -> None:
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.targets: dict[int, torch.Tensor] = {}
        self.losses: dict[int, float] = {}
        self.eval_future: asyncio.Future[float] | None = None
        self.eval_targets: torch.Tensor | None = None

    def start(self, targets: dict[int, torch.Tensor]) -> None:
        loop = asyncio.get_running_loop()
        self.pending = {mb: loop.create_future() for mb in targets}
        self.targets, self.losses = targets, {}

    def start_eval(self, targets: torch.Tensor) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.eval_future, self.eval_targets, self.pending = fut, targets, {0: fut}  # type: ignore[dict-item]
        return fut

    def finish_eval(self) -> None:
        self.eval_future, self.pending = None, {}

    def resolve(self, mb: int) -> None:
        fut = self.pending.get(mb)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def fail(self, failure: Exception, mb: int | None = None) -> None:
        """Makes the step in flight (or one microbatch of it) give up now rather than at its timeout."""
        futures = self.pending.values() if mb is None else [f for m, f in self.pending.items() if m == mb]
        for fut in futures:
            if not fut.done():
                fut.set_exception(failure)

    def cancel_rest(self) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.cancel()
