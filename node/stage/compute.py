"""The threads a stage daemon runs besides its event loop, and its background tasks.

All torch work of a stage runs on one compute thread, so runtime calls never interleave and gradients
accumulate in a fixed order; blocking DHT calls run on a small I/O pool so they never stall the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def _name_os_thread(name: str) -> Callable[[], None]:
    """A thread initializer that names the OS thread too (Linux), so ``top -H`` and ``/proc`` show it."""

    def initializer() -> None:
        with contextlib.suppress(OSError), open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(name[:15])

    return initializer


class Compute:
    """The stage's single compute thread (torch releases the GIL while it works), named ``compute``."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="compute", initializer=_name_os_thread("compute"))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(*args)`` on the compute thread and waits for it."""
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queues ``fn(*args)`` now (so it runs before anything submitted later) and returns its future."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class BlockingIO:
    """A small pool for blocking calls (the DHT's store and get)."""

    def __init__(self, threads: int = 2) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="dht", initializer=_name_os_thread("dht-io"))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class Background:
    """Tasks that run beside the one that spawned them; cancelled together at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
