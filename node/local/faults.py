"""Launcher-side fault injection in a local swarm, and the account of every node that dies.

The launcher kills nodes itself for ``--failure-rate`` (each attempt of each step draws, for every block stage, and
stage 0 with ``--stage0-failures``, whether its node dies after a random part of the step), for ``STAGE@STEP:start``
(once that step starts) and for ``spare@STEP`` (the first idle spare seen once that step has started). The other
``--kill`` faults are carried out by the daemons themselves, which write a ``killed`` event before dying.

Those deaths are planned; so is a node that leaves after handing its stage over on a notice the launcher
raised (``--preempt``). Any other death of a stage daemon or spare (SIGKILL or SIGTERM from outside, the OOM
killer, a crash, a non-zero exit) is unplanned: a spot VM or an operator does not ask first. Either way the
node is replaced (``--respawn``) and the swarm recovers; each death is kept as a :class:`Death` for the live
table and the run summary. Only the bootstrap DHT node's death, a stage lost for good (an ``unrecoverable``
event) or nodes that keep dying before they ever join the swarm stop the run with :class:`LocalSwarmError`.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from node import events as ev
from node.local.children import Child, LocalSwarmError, serving
from node.recovery.faults import FaultSpec
from node.wire.records import StageRecord, StageState

logger = logging.getLogger(__name__)

BOOTSTRAP = "dht"  # the bootstrap DHT node's child name: its death is an error, not a failure to recover from
# Unplanned deaths in a row of nodes never seen in the DHT: the node cannot start at all (a broken install, a
# bad option), and replacing it again would only loop. Any node joining the swarm resets the count.
MAX_DEATHS_BEFORE_JOINING = 3


@dataclass(frozen=True)
class Death:
    """A stage daemon or spare that the launcher saw die while the swarm trained."""

    name: str  # the child's name: stageN (first started for stage N) or nodeN (--stage auto)
    pid: int
    stage: int | None  # the stage it served as far as the launcher knows (None: a spare, or not known)
    exit_code: int  # negative: killed by that signal
    planned: bool
    # "unplanned", "handover" (it handed its stage over on the launcher's notice), or the planned kill's
    # phase (forward, backward, fetch) or ``by`` (start, failure-rate, spare, preempt)
    cause: str
    log: str | None  # the child's log file
    time: float  # Unix time the launcher saw it dead
    alive_at: float | None  # Unix time the launcher last saw it running: it died in between
    peer_id: str | None = None  # from its DHT record, if it had one
    replaced: bool = False  # a --stage auto node was started for it

    @property
    def signal(self) -> str | None:
        """The name of the signal that killed it (``SIGKILL``), None if it exited."""
        if self.exit_code >= 0:
            return None
        try:
            return signal.Signals(-self.exit_code).name
        except ValueError:
            return f"signal {-self.exit_code}"

    @property
    def died_at(self) -> float:
        """The earliest time it may have died: durations measured from it are upper bounds."""
        return self.alive_at if self.alive_at is not None else self.time

    def describe(self) -> str:
        """One line for people: who, which stage, how it ended."""
        how = f"killed by {self.signal}" if self.signal else f"exited with code {self.exit_code}"
        where = f"stage {self.stage}" if self.stage is not None else "no stage"
        return f"{self.name} (pid {self.pid}, {where}) {how}"

    def summary(self) -> dict[str, Any]:
        """The death as the run summary's ``deaths`` lists it."""
        return {
            "name": self.name,
            "stage": self.stage,
            "pid": self.pid,
            "peer_id": self.peer_id,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "log": self.log,
            "time": self.time,
            "alive_at": self.alive_at,
            "planned": self.planned,
            "cause": self.cause,
            "replaced": self.replaced,
        }


class StageDraws:
    """Seeded draws, one per stage for each attempt: the block stages from one stream and stage 0 (when it may
    fail) from a stream of its own, so that letting stage 0 fail does not move the block stages' draws."""

    def __init__(self, seed: int | str, num_stages: int, stage0: bool) -> None:
        self.num_stages = num_stages
        self._blocks = random.Random(seed)
        self._stage0 = random.Random(f"{seed}:stage0") if stage0 else None

    def each(self) -> list[tuple[int, random.Random]]:
        """(stage, the stream to draw its outcome from) for every stage that may fail, block stages first."""
        draws = [(stage, self._blocks) for stage in range(1, self.num_stages)]
        return draws + ([(0, self._stage0)] if self._stage0 is not None else [])


class LauncherFaults:
    """Carries out the launcher's own kills and keeps account of every planned death."""

    def __init__(
        self, kills: list[FaultSpec], failure_rate: float, num_stages: int, seed: int, stage0: bool = False
    ) -> None:
        self.kills = kills
        self.failure_rate = failure_rate
        self.num_stages = num_stages
        self.fired: set[str] = set()  # fault specs already carried out
        self.kill_log: list[ev.KilledEvent] = []  # kills done by the launcher itself (failure rate, spares)
        self.handled_deaths: set[int] = set()  # pids of exits already dealt with
        self.deaths: list[Death] = []  # every death seen, planned or not, in order
        self._alive_at: dict[int, float] = {}  # pid -> Unix time last seen running
        self._joined = 0  # nodes seen in the DHT so far
        self._deaths_before_joining = 0  # unplanned deaths in a row of nodes never seen in the DHT
        self._seen_attempts: set[int] = set()  # steps started
        self._drawn_attempts: set[tuple[int, int]] = set()  # (step, attempt) already given their fault draws
        self._due_kills: list[tuple[float, int, int, str]] = []  # (due, stage, step, why)
        self._draws = StageDraws(seed, num_stages, stage0)

    def node_faults(self, stage: int | None = None, replica: int | None = None) -> list[str]:
        """The faults a node started now carries out itself: a replacement only gets those not yet happened.
        ``replica`` (the node is replica ``replica`` of ``stage``, which has several): of that stage's kills,
        in step order, it gets only the one with its index, so that each kill takes one replica (every node of
        a stage would otherwise carry it out, one after the other as the step is replayed)."""
        pending = [s for s in self.kills if s.stage is not None and s.phase != "start" and str(s) not in self.fired]
        if replica is None:
            return [str(s) for s in pending]
        mine = sorted((s for s in pending if s.stage == stage), key=lambda s: s.step)
        return [str(s) for s in pending if s.stage != stage] + ([str(mine[replica])] if replica < len(mine) else [])

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
            for stage, rng in self._draws.each():
                if self.failure_rate and rng.random() < self.failure_rate:
                    # mid-step: after a random part of a typical step
                    delay = rng.uniform(0.1, 0.5)
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

    def new_deaths(
        self,
        events: list[ev.Event],
        children: list[Child],
        read_events: Callable[[], list[ev.Event]],
        *,
        seen: Mapping[int, StageRecord] | None = None,
        started_for: Mapping[int, int] | None = None,
        noticed: Collection[int] = (),
        respawn: bool = True,
    ) -> list[Death]:
        """The deaths of ``children`` not reported before (each once), planned or not, also kept in
        :attr:`deaths`; those with ``replaced`` need a new ``--stage auto`` node (a node that handed its stage
        over on a notice already has its replacement, and after the last step none is needed).

        ``seen``: pid -> newest serving record the launcher saw of it (its stage and peer id); ``started_for``:
        pid -> the stage a node was started for (the stage of a node with no record yet); ``noticed``: pids
        the launcher raised a preemption notice for; ``read_events`` re-reads the event log. Raises
        LocalSwarmError when the bootstrap node died, a stage was lost for good, or nodes keep dying before
        they join."""
        seen = seen or {}
        self._mark_fired(events)
        _raise_if_unrecoverable(events)
        now = time.time()
        exited: list[tuple[Child, int]] = []
        for child in children:
            code = child.proc.poll()
            if code is None:
                self._alive_at[child.proc.pid] = now
            elif child.proc.pid not in self.handled_deaths:
                exited.append((child, code))
        if not exited:
            return []
        for child, code in exited:
            if child.name == BOOTSTRAP:
                raise LocalSwarmError(f"the bootstrap DHT node exited with code {code}: see {child.log_path}")
        # a daemon writes its last event (killed, handed_over, done, unrecoverable) and then exits: the exit
        # just seen may be newer than the events read before it, so read them again
        events = read_events()
        self._mark_fired(events)
        _raise_if_unrecoverable(events)
        kills = {k.pid: k for k in [*ev.of_type(events, ev.KilledEvent), *self.kill_log]}
        handed_over = {e.pid for e in ev.of_type(events, ev.HandedOverEvent)}
        done = bool(ev.of_type(events, ev.DoneEvent))
        if len(seen) > self._joined:
            self._joined, self._deaths_before_joining = len(seen), 0
        new = []
        for child, code in exited:
            pid = child.proc.pid
            self.handled_deaths.add(pid)
            if code == 0 and done:
                continue  # training is over: stage 0 leaves by itself
            record = seen.get(pid)
            stage = record.stage if record is not None else (started_for or {}).get(pid)
            kill = kills.get(pid)
            if kill is not None:
                planned, cause, stage = True, kill.phase if kill.by is None else kill.by, kill.stage
            elif code == 0 and pid in handed_over and pid in noticed:
                # preempted: it handed its stage over and left (its replacement was started with the notice)
                planned, cause = True, "handover"
            else:
                planned, cause = False, "unplanned"
            death = Death(
                name=child.name,
                pid=pid,
                stage=stage,
                exit_code=code,
                planned=planned,
                cause=cause,
                log=str(child.log_path) if child.log_path is not None else None,
                time=now,
                alive_at=self._alive_at.get(pid),
                peer_id=record.peer_id if record is not None else None,
                replaced=respawn and cause != "handover" and not done,
            )
            self.deaths.append(death)
            new.append(death)
            if not planned:
                logger.warning(
                    "unplanned death: %s%s; see %s", death.describe(),
                    ", starting a replacement" if death.replaced else "", death.log,
                )  # fmt: skip
                if record is None:
                    self._deaths_before_joining += 1
                    if self._deaths_before_joining >= MAX_DEATHS_BEFORE_JOINING:
                        raise LocalSwarmError(
                            f"{self._deaths_before_joining} nodes in a row died before joining the swarm, the last "
                            f"{death.describe()}: see {death.log}"
                        )
        return new

    def _mark_fired(self, events: list[ev.Event]) -> None:
        for e in ev.of_type(events, ev.KilledEvent):
            self.fired.add(f"{e.stage}@{e.step}:{e.phase}")

    def unplanned(self) -> list[Death]:
        """The deaths nobody planned, in order."""
        return [d for d in self.deaths if not d.planned]


def _raise_if_unrecoverable(events: list[ev.Event]) -> None:
    for e in ev.of_type(events, ev.UnrecoverableEvent):
        raise LocalSwarmError(f"stage {e.stage} was lost and {e.reason}; training stopped")
