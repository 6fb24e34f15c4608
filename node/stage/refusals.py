"""Refused messages: one counter, one log limiter and one status mapping for every refusal a stage makes.

The service's validation, the membership check in front of it and the parsing of unary requests all refuse
through :class:`Refusals`, so ``swarm_node_rejected_messages_total{reason=...}`` and ``GetStatus``'s
``rejected_messages`` count the same thing. At most one log line per reason is written every
``REJECT_LOG_SECONDS`` (then a summary of the ones held back), so a flood of bad messages cannot flood the log.
"""

from __future__ import annotations

import logging

import grpc

from node.metrics import LogLimiter, StageMetrics
from node.stage.runtime import Reject

logger = logging.getLogger(__name__)

REJECT_LOG_SECONDS = 10.0
LOGGED_DETAIL_CHARS = 300

STATUS_FOR: dict[Reject, grpc.StatusCode] = {
    Reject.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reject.OVERSIZE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reject.STALE_STEP: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.UNKNOWN_STEP: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.STALE_ATTEMPT: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.NOT_READY: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.INCOMPLETE: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.NO_CHECKPOINT: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.FENCED: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.DRAINING: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.STALE_EPOCH: grpc.StatusCode.FAILED_PRECONDITION,
    Reject.DUPLICATE: grpc.StatusCode.ALREADY_EXISTS,
    Reject.STALLED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reject.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Reject.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}  # every other reason: INVALID_ARGUMENT


def printable(text: str) -> str:
    """A caller-influenced text made safe for one log line: no control characters, bounded length."""
    clean = "".join(c if c.isprintable() else "?" for c in text[: LOGGED_DETAIL_CHARS + 1])
    return clean if len(clean) <= LOGGED_DETAIL_CHARS else clean[:LOGGED_DETAIL_CHARS] + "…"


class Refusals:
    """Counts, logs (rate-limited) and answers refused messages."""

    def __init__(self, metrics: StageMetrics) -> None:
        self.metrics = metrics
        self.total = 0
        self.log = LogLimiter(logger, REJECT_LOG_SECONDS, what="rejected")

    def count(self, reason: Reject, message: str, times: int = 1) -> None:
        self.metrics.rejected.labels(reason=reason.value).inc(times)
        self.total += times
        self.log.log(reason.value, "rejected message: %s: %s", reason.value, printable(message))

    async def refuse(self, context: grpc.aio.ServicerContext, reason: Reject, message: str) -> None:
        """Counts the refusal and ends the call with the reason's status (this raises)."""
        self.count(reason, message)
        await context.abort(STATUS_FOR.get(reason, grpc.StatusCode.INVALID_ARGUMENT), f"{reason.value}: {message}")
