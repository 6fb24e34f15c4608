"""Writes checkpoints off the training path (CheckFreq-style snapshot-then-persist).

The training path only pays for the *snapshot*: a copy of the weights and AdamW state to host memory, taken
on the stage's compute thread right after a commit, before the next step can change a parameter. A single
background thread serializes and writes it. A snapshot due while the previous write is still running waits
for it, so at most one snapshot is held in memory besides the live state. A write that fails (a full disk,
say) is counted and logged, leaves no partial file (:mod:`node.checkpoint.store`), and the writer goes on
with the next snapshot: training never waits on, or stops for, a checkpoint.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from node.checkpoint.store import CheckpointStore
from node.metrics import StageMetrics

logger = logging.getLogger(__name__)


class BackgroundWriter:
    """Persists snapshots of one stage with ``store`` on a background thread; records metrics."""

    def __init__(
        self, store: CheckpointStore, metrics: StageMetrics, on_durable: Callable[[int, float, int], None]
    ) -> None:
        """``on_durable(step, write_seconds, bytes)`` runs on the writer thread after each completed write."""
        self.store = store
        self.metrics = metrics
        self.on_durable = on_durable
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._last: Future[None] | None = None

    def wait(self) -> None:
        """Blocks until the write in progress (if any) is done."""
        if self._last is not None:
            concurrent.futures.wait([self._last])

    def submit(
        self, step: int, tensors: dict[str, torch.Tensor], *, data_position: int, lr_scale: float, grad_norm: float
    ) -> Future[None]:
        """Queues the write of a snapshot (already a private CPU copy) of committed step ``step``."""

        def write() -> None:
            started = time.perf_counter()
            try:
                nbytes = self.store.write(
                    step, tensors, data_position=data_position, lr_scale=lr_scale, grad_norm=grad_norm
                )
            except OSError as err:  # ENOSPC, EFBIG, EIO...: the storage's problem, not a bug
                self.metrics.checkpoint_writes.labels(result="failed").inc()
                logger.error("checkpoint of step %d on stage %d failed: %s", step, self.store.stage, err)
                return
            except Exception:
                self.metrics.checkpoint_writes.labels(result="failed").inc()
                logger.exception("checkpoint of step %d on stage %d failed", step, self.store.stage)
                return
            seconds = time.perf_counter() - started
            self.metrics.checkpoint_writes.labels(result="ok").inc()
            self.metrics.checkpoint_write_seconds.observe(seconds)
            self.metrics.checkpoint_bytes.inc(nbytes)
            self.metrics.checkpoint_step.set(step)
            self.on_durable(step, seconds, nbytes)

        self._last = self._pool.submit(write)
        return self._last

    def close(self) -> None:
        """Finishes the write in progress (a clean exit loses no checkpoint), then stops the thread."""
        self._pool.shutdown(wait=True)
