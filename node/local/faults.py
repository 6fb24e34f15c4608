"""Launcher-side fault injection in a local swarm, and telling planned deaths from unplanned ones.

The launcher kills nodes itself for ``--failure-rate`` (each attempt of each step draws, for every block
stage, whether its node dies after a random part of the step), for ``STAGE@STEP:start`` (once that step
starts) and for ``spare@STEP`` (the first idle spare seen once that step has started). The other
``--kill`` faults are carried out by the daemons themselves, which write a ``killed`` event before dying.
A child that dies any other way is an error.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable

from node import events as ev
from node.local.children import Child, LocalSwarmError, serving
from node.recovery.faults import FaultSpec
from node.wire.records import StageRecord, StageState


class LauncherFaults:
    """Carries out the launcher's own kills and keeps account of every planned death."""

    def __init__(self, kills: list[FaultSpec], failure_rate: float, num_stages: int, seed: int) -> None:
        self.kills = kills
        self.failure_rate = failure_rate
        self.num_stages = num_stages
        self.fired: set[str] = set()  # fault specs already carried out
        self.kill_log: list[ev.KilledEvent] = []  # kills done by the launcher itself (failure rate, spares)
        self.handled_deaths: set[int] = set()  # pids of planned deaths already dealt with
        self._seen_attempts: set[int] = set()  # steps started
        self._drawn_attempts: set[tuple[int, int]] = set()  # (step, attempt) already given their fault draws
        self._due_kills: list[tuple[float, int, int, str]] = []  # (due, stage, step, why)
        self._rng = random.Random(seed)

    def node_faults(self) -> list[str]:
        """The faults a node started now carries out itself: a replacement only gets those not yet happened."""
        return [str(s) for s in self.kills if s.stage is not None and s.phase != "start" and str(s) not in self.fired]

    def _kill(self, child: Child, stage: int | None, reason: str, step: int) -> None:
        self.kill_log.append(ev.KilledEvent(stage=stage, step=step, by=reason, pid=child.proc.pid))
        child.kill_group(signal.SIGKILL)

    def inject(
        self, events: list[ev.Event], records: list[StageRecord], children: list[Child], spares: list[Child]
    ) -> None:
        """Launcher-side faults: ``--failure-rate`` and ``spare@STEP`` kills, at the start of each step.
        ``children``: every child (a stage is killed in the one serving it); ``spares``: the ``--stage auto`` ones."""
        # every attempt is an iteration that can fail, replays after an abort or a rollback included
        for e in ev.of_type(events, ev.AttemptEvent):
            if (key := (e.step, e.attempt)) in self._drawn_attempts:
                continue
            self._drawn_attempts.add(key)
            self._seen_attempts.add(e.step)
            for spec in self.kills:
                if spec.phase == "start" and spec.step == e.step and str(spec) not in self.fired:
                    self.fired.add(str(spec))
                    self._due_kills.append((time.monotonic() + 0.2, spec.stage, e.step, "start"))
            for stage in range(1, self.num_stages):
                if self.failure_rate and self._rng.random() < self.failure_rate:
                    # mid-step: after a random part of a typical step
                    delay = self._rng.uniform(0.1, 0.5)
                    self._due_kills.append((time.monotonic() + delay, stage, e.step, "failure-rate"))
        # spare@STEP: the first idle spare seen once step STEP has started
        reached = max(self._seen_attempts, default=0)
        for spec in self.kills:
            if spec.stage is None and spec.step <= reached and str(spec) not in self.fired:
                spare_pids = {r.pid for r in records if r.state == StageState.SPARE}
                spare = next((c for c in spares if c.proc.pid in spare_pids and c.proc.poll() is None), None)
                if spare is not None:
                    self.fired.add(str(spec))
                    self._kill(spare, None, "spare", reached)
        now = time.monotonic()
        for item in [k for k in self._due_kills if k[0] <= now]:
            self._due_kills.remove(item)
            child = serving(children, records, item[1])
            if child is not None:
                self._kill(child, item[1], item[3], item[2])

    def planned_deaths(
        self, events: list[ev.Event], children: list[Child], read_events: Callable[[], list[ev.Event]]
    ) -> list[Child]:
        """The children newly dead of a planned kill (each reported once); any other death, or a stage lost for
        good, raises LocalSwarmError. ``read_events`` re-reads the event log."""
        for e in events:
            if isinstance(e, ev.KilledEvent):
                self.fired.add(f"{e.stage}@{e.step}:{e.phase}")
            if isinstance(e, ev.UnrecoverableEvent):
                raise LocalSwarmError(f"stage {e.stage} was lost and {e.reason}; training stopped")
        killed_pids = {k.pid for k in self.kill_log} | {e.pid for e in ev.of_type(events, ev.KilledEvent)}
        planned = []
        for child in children:
            code = child.proc.poll()
            if code is None or child.proc.pid in self.handled_deaths:
                continue
            if child.name == "stage0" and code == 0:
                continue
            if code == 0 and child.proc.pid in {e.pid for e in ev.of_type(read_events(), ev.HandedOverEvent)}:
                # preempted: it handed its stage over and left (its replacement was started with the notice)
                self.handled_deaths.add(child.proc.pid)
                continue
            if code == -signal.SIGKILL and child.proc.pid not in killed_pids:
                # a daemon writes its "killed" event and then dies: the death we just saw may be newer than
                # the events read above, so read them again before calling it an error
                killed_pids |= {e.pid for e in ev.of_type(read_events(), ev.KilledEvent)}
            if code == -signal.SIGKILL and child.proc.pid in killed_pids:
                self.handled_deaths.add(child.proc.pid)
                planned.append(child)
                continue
            raise LocalSwarmError(f"{child.name} exited with code {code}: see {child.log_path}")
        return planned
