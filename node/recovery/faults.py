"""Fault injection specs: ``STAGE@STEP[:PHASE]`` — kill the node of STAGE while step STEP is in flight.

Steps are numbered from 1, as in the run summary. Phases: ``forward`` (default) and ``backward`` kill the
daemon mid-step while it processes a microbatch in that direction; ``fetch`` kills the replacement that is
rebuilding STAGE while it downloads its neighbours' weights; ``start`` (``swarm-node local`` only) kills
the node from outside shortly after the step starts, so several stages can die at once. ``spare@STEP``
(``swarm-node local`` only) kills an idle spare when step STEP starts. A kill is SIGKILL to the daemon's
whole process group: the machine vanishes with its DHT helper, as a spot preemption does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass

from node.events import EventLog, KilledEvent

logger = logging.getLogger(__name__)

PHASES = ("forward", "backward", "fetch", "start", "idle")
_SPEC = re.compile(r"^(?P<stage>\d+|spare)@(?P<step>\d+)(?::(?P<phase>[a-z]+))?$")


@dataclass(frozen=True)
class FaultSpec:
    stage: int | None  # None: a spare
    step: int
    phase: str

    def __str__(self) -> str:
        return f"{'spare' if self.stage is None else self.stage}@{self.step}:{self.phase}"


def parse_fault(text: str, num_stages: int | None = None) -> FaultSpec:
    """Parses ``STAGE@STEP[:PHASE]``; raises ValueError with a one-line reason."""
    m = _SPEC.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not STAGE@STEP[:forward|backward|fetch|start] or spare@STEP")
    stage = None if m["stage"] == "spare" else int(m["stage"])
    phase = m["phase"] or ("idle" if stage is None else "forward")
    step = int(m["step"])
    if phase not in PHASES or (stage is None) != (phase == "idle"):
        raise ValueError(f"{text!r}: phase must be forward, backward, fetch or start (spares are killed idle)")
    if step < 1:
        raise ValueError(f"{text!r}: steps are numbered from 1")
    if stage is not None and num_stages is not None and stage >= num_stages:
        raise ValueError(f"{text!r}: stage {stage} does not exist with {num_stages} stages")
    return FaultSpec(stage, step, phase)


def die_now() -> None:
    """SIGKILL this daemon and everything in its process group (when it leads one)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


class FaultInjector:
    """Dies at the first matching fault spec (tests, ``swarm-node local --kill``), after writing a ``killed``
    event. A microbatch-level phase fires on the middle microbatch of the step, so the step is mid-flight (or,
    on a replica that was not routed that microbatch, on its first microbatch of a later step)."""

    def __init__(
        self,
        specs: list[FaultSpec],
        events: EventLog,
        microbatches_per_step: int,
        recovered_at: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.specs, self.events = specs, events
        self.microbatch = microbatches_per_step // 2
        self._missed: set[FaultSpec] = set()  # specs whose step this node computed without the middle microbatch
        self.recovered_at = recovered_at  # committed step this node's stage was rebuilt at, if it was

    def check(self, phase: str, *, stage: int | None, step: int, microbatch: int | None = None) -> None:
        if not self.specs:
            return
        recovered = self.recovered_at()
        # a replacement replays the step its predecessor died in: that kill has already happened
        replayed = phase != "fetch" and recovered is not None and step <= recovered + 1
        for spec in self.specs:
            if spec.stage != stage or spec.phase != phase or replayed:
                continue
            # the middle microbatch of the step; a replica that computed a share of that step without it dies
            # at its first microbatch of a later step (still mid-step). A node that took the stage only after
            # that step (a spare, a replacement) never computed it, and is not the one to die.
            if microbatch is None or spec.step > step:
                due = spec.step == step
            elif spec.step == step:
                due = microbatch == self.microbatch
                if not due:
                    self._missed.add(spec)
            else:
                due = spec in self._missed
            if due:
                self.events.emit(KilledEvent(stage=stage, step=step, phase=phase))
                logger.warning("fault injection: dying in %s of step %d", phase, step)
                die_now()
