"""The preemption watcher a daemon owns: SIGTERM/SIGINT and, where there is one, the cloud's metadata service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from node.metrics import LogLimiter
from node.preemption.notice import MetadataError, Notice, NoticeKind
from node.preemption.providers import (
    DEFAULT_AWS_URL,
    DEFAULT_AZURE_URL,
    DEFAULT_GCP_URL,
    REQUEST_TIMEOUT,
    AwsProvider,
    AzureProvider,
    GcpProvider,
    Provider,
    ProviderError,
    pause,
)

log = logging.getLogger(__name__)

MODES = ("auto", "aws", "gcp", "azure", "signal", "none")
PROVIDERS = ("aws", "gcp", "azure")  # also the order auto detection prefers when several answer at once
SIGNALS = (signal.SIGTERM, signal.SIGINT)
PROBE_TIMEOUT = 1.0  # off the cloud, 169.254.169.254 often swallows packets: do not wait long
BACKOFF = (1.0, 60.0)  # first and longest pause after a problem with the metadata service
MAX_SEEN = 256  # distinct notices remembered for deduplication


class PreemptionWatcher:
    """Turns SIGTERM/SIGINT and the cloud's spot notices into :class:`Notice` objects for ``on_notice``.

    ``mode`` is one of :data:`MODES`: ``auto`` probes AWS, GCP and Azure and watches the first that answers,
    ``aws``/``gcp``/``azure`` watch that one, ``signal`` watches signals only and ``none`` nothing at all.
    ``metadata_url`` replaces every provider's base URL. ``on_error(provider)`` hears of every problem with
    the metadata service (which is also logged, once per kind of problem and interval). Callbacks run on
    the event loop and must not block.
    """

    def __init__(
        self,
        mode: str,
        metadata_url: str | None,
        drain_seconds: float,
        on_notice: Callable[[Notice], None],
        on_error: Callable[[str], None] | None = None,
        poll_seconds: float | None = None,
        *,
        probe_timeout: float = PROBE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"preemption mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not math.isfinite(drain_seconds) or drain_seconds < 0:
            raise ValueError(f"drain_seconds must be a non-negative number, got {drain_seconds!r}")
        if poll_seconds is not None and (not math.isfinite(poll_seconds) or poll_seconds <= 0):
            raise ValueError(f"poll_seconds must be positive, got {poll_seconds!r}")
        if not math.isfinite(probe_timeout) or probe_timeout <= 0:
            raise ValueError(f"probe_timeout must be positive, got {probe_timeout!r}")
        if not 0 < backoff[0] <= backoff[1]:
            raise ValueError(f"backoff must be (first, longest) with 0 < first <= longest, got {backoff!r}")
        self.mode = mode
        self.metadata_url = metadata_url
        self.drain_seconds = float(drain_seconds)
        self.on_notice = on_notice
        self.on_error = on_error
        self.poll_seconds = poll_seconds
        self.probe_timeout = probe_timeout
        self.request_timeout = request_timeout
        self.backoff = backoff
        self.provider: str | None = mode if mode in PROVIDERS else None  # the one watched, once known
        self.signals_received = 0
        self._source: Provider | None = None
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._limiter = LogLimiter(log, interval=600.0, what="metadata problems")
        self._signal_loop: asyncio.AbstractEventLoop | None = None
        if metadata_url is not None:
            self.make_provider("aws")  # validates the URL now rather than in run()

    def make_provider(self, name: str) -> Provider:
        """A provider of the given name with this watcher's URL, poll interval and timeouts."""
        timeout = self.request_timeout
        if name == "aws":
            return AwsProvider(self.metadata_url or DEFAULT_AWS_URL, self.poll_seconds or 5.0, request_timeout=timeout)
        if name == "gcp":
            return GcpProvider(
                self.metadata_url or DEFAULT_GCP_URL, poll_seconds=self.poll_seconds or 5.0, request_timeout=timeout
            )
        if name == "azure":
            return AzureProvider(
                self.metadata_url or DEFAULT_AZURE_URL, self.poll_seconds or 1.0, request_timeout=timeout
            )
        raise ValueError(f"unknown metadata provider {name!r}")

    # Signals

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGTERM and SIGINT become hard ``signal`` notices due ``drain_seconds`` later, every one of them
        (the daemon decides what a second one means). Does nothing in mode ``none``. Main thread only."""
        if self.mode == "none":
            return
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._signal_loop = loop

    def remove_signal_handlers(self) -> None:
        """Gives SIGTERM and SIGINT back their default handlers."""
        loop, self._signal_loop = self._signal_loop, None
        if loop is None:
            return
        for sig in SIGNALS:
            with contextlib.suppress(RuntimeError, ValueError):  # a loop already closed
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        now = time.time()
        self.signals_received += 1
        name = signal.Signals(sig).name
        notice = Notice("signal", NoticeKind.TERMINATE, now + self.drain_seconds, now, detail=name)
        log.warning("%s received (%d so far): draining, %.0f s left", name, self.signals_received, self.drain_seconds)
        self._deliver(notice)

    # Notices

    def _deliver(self, notice: Notice) -> None:
        try:
            self.on_notice(notice)
        except Exception:
            log.exception("the preemption notice handler failed on %s", notice)

    def _emit(self, notice: Notice) -> None:
        """A provider's notice, passed on once only: providers re-read the same notice on every poll."""
        if notice.key in self._seen:
            return
        self._seen[notice.key] = None
        while len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)
        log.warning(
            "%s preemption notice (%s%s): %s, %.0f s left",
            notice.provider,
            notice.kind,
            f" {notice.event_id}" if notice.event_id else "",
            notice.detail,
            notice.seconds_left(),
        )
        self._deliver(notice)

    async def acknowledge(self, notice: Notice) -> None:
        """Lets the cloud go ahead with ``notice`` (Azure only); errors are logged, never raised."""
        source = self._source
        if source is None or notice.provider != source.name:
            return
        try:
            await source.acknowledge(notice)
        except Exception as e:
            log.warning("could not acknowledge %s notice %s: %s", notice.provider, notice.event_id, e)

    # Watching

    async def run(self, stopping: asyncio.Event) -> None:
        """Watches the metadata service (as ``mode`` says) until ``stopping`` is set. Never raises: problems are
        logged, reported to ``on_error`` and retried with a backoff. Returns at once in mode ``none``."""
        if self.mode == "none":
            return
        try:
            if self.mode == "signal":
                await stopping.wait()
                return
            source = await self._detect(stopping) if self.mode == "auto" else self.make_provider(self.mode)
            if source is None:
                if not stopping.is_set():
                    log.info("no cloud metadata service answered (tried AWS, GCP, Azure): watching signals only")
                await stopping.wait()
                return
            self._source, self.provider = source, source.name
            if self.mode == "auto":
                log.info("watching the %s metadata service for preemption notices", source.name)
            await self._watch(source, stopping)
        except Exception:
            log.exception("the preemption watcher failed: watching signals only")
            await stopping.wait()

    async def _detect(self, stopping: asyncio.Event) -> Provider | None:
        candidates = [self.make_provider(name) for name in PROVIDERS]
        probes = {asyncio.create_task(c.probe(self.probe_timeout)): c for c in candidates}
        stop = asyncio.create_task(stopping.wait())
        pending: set[asyncio.Task] = set(probes)
        try:
            while pending:
                done, pending = await asyncio.wait(pending | {stop}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    return None
                pending.discard(stop)
                for task, candidate in probes.items():
                    if task in done and task.result():
                        return candidate
            return None
        finally:
            for task in (*probes, stop):
                task.cancel()
            await asyncio.gather(*probes, stop, return_exceptions=True)

    async def _watch(self, source: Provider, stopping: asyncio.Event) -> None:
        delay = self.backoff[0]
        while not stopping.is_set():
            before = source.ok_replies
            try:
                await _until(source.watch(self._emit, stopping), stopping)
                if stopping.is_set():
                    return
                kind, problem = "internal", "the watch ended by itself"
            except ProviderError as e:
                kind, problem = e.kind, str(e)
            except MetadataError as e:
                kind, problem = "bad_reply", str(e)
            except Exception as e:  # a bug here must not take the daemon down
                kind, problem = "internal", f"{type(e).__name__}: {e}"
            if source.ok_replies > before:  # it worked for a while: start the backoff again
                delay = self.backoff[0]
            self._problem(source.name, kind, problem, delay)
            if await pause(stopping, delay):
                return
            delay = min(delay * 2, self.backoff[1])

    def _problem(self, provider: str, kind: str, problem: str, delay: float) -> None:
        key = f"{provider}:{kind}"
        self._limiter.log(key, "%s metadata service: %s (retrying in %.0f s)", provider, problem, delay)
        if self.on_error is not None:
            try:
                self.on_error(provider)
            except Exception:
                log.exception("the preemption error handler failed")


async def _until(work: Awaitable[None], stopping: asyncio.Event) -> None:
    """Runs ``work`` until it ends or ``stopping`` is set, whichever comes first (then it is cancelled)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, stop, return_exceptions=True)
    if not task.cancelled():
        task.result()  # raises what the work raised
