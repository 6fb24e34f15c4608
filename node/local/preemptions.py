"""``local --preempt``: spot preemptions of a local swarm, announced the way a cloud announces them.

``--preemption-rate P`` draws notices the way ``--failure-rate`` draws kills: for every block stage and attempt
(and stage 0, with ``--stage0-failures``), with probability P its node gets SIGTERM, and SIGKILL when the
``--notice-seconds`` window ends.

``STAGE@STEP[:NOTICE_SECONDS][:PROVIDER]``: the node first started for STAGE watches a real local HTTP server
that speaks PROVIDER's metadata protocol (``aws``, ``gcp``, ``azure``; :mod:`node.local.metadata`), or only
signals (``signal``). Once step STEP starts, the launcher raises the notice (or sends SIGTERM), and when the
notice window ends it SIGKILLs the node if it is still there: the cloud takes the machine.

``...:soft@SOFT_STEP`` (``aws`` and ``gcp`` only) adds a soft notice first: once step SOFT_STEP starts, the
server raises an AWS rebalance recommendation or a GCP live migration (``MIGRATE_ON_HOST_MAINTENANCE``). The
node pre-stages its state and spares stand by for its stage; with no spare waiting, the launcher starts a
replacement node then (as it does on a hard notice), and none more on the hard notice that follows.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from node import events as ev
from node.local.children import Child
from node.local.faults import StageDraws
from node.local.metadata import AwsMetadataServer, MetadataServer, metadata_server
from node.options import PreemptionMode, PreemptionOptions
from node.wire.records import StageRecord, StageState

PROVIDERS = ("aws", "gcp", "azure", "signal")
SOFT_PROVIDERS = ("aws", "gcp")  # the clouds whose metadata services give soft notices
DEFAULT_NOTICE_SECONDS = 30.0
_SPEC = re.compile(r"^(\d+)@(\d+)(?::(\d+(?:\.\d+)?))?(?::([a-z]+))?(?::soft@(\d+))?$")


@dataclass(frozen=True)
class PreemptSpec:
    stage: int
    step: int
    notice_seconds: float = DEFAULT_NOTICE_SECONDS
    provider: str = "aws"
    soft_step: int | None = None  # a soft notice once this step starts (before ``step``'s hard one)

    def __str__(self) -> str:
        soft = f":soft@{self.soft_step}" if self.soft_step is not None else ""
        return f"{self.stage}@{self.step}:{self.notice_seconds:g}:{self.provider}{soft}"


def parse_preempt(text: str, num_stages: int) -> PreemptSpec:
    """``STAGE@STEP[:NOTICE_SECONDS][:PROVIDER][:soft@SOFT_STEP]``; raises ValueError with what is wrong."""
    m = _SPEC.match(text.strip())  # e.g. 2@10, 2@10:30, 2@10:30:gcp, 2@10:gcp, 2@10:30:aws:soft@5
    if m is None:
        raise ValueError(f"{text!r} is not STAGE@STEP[:NOTICE_SECONDS][:PROVIDER][:soft@SOFT_STEP]")
    stage, step = int(m.group(1)), int(m.group(2))
    notice = float(m.group(3)) if m.group(3) else DEFAULT_NOTICE_SECONDS
    provider = m.group(4) or "aws"
    if not 0 <= stage < num_stages:
        raise ValueError(f"{text!r}: stage {stage} is outside 0..{num_stages - 1}")
    if step < 1:
        raise ValueError(f"{text!r}: steps start at 1")
    if not 0 <= notice <= 3600:  # 0: the machine goes right after the notice
        raise ValueError(f"{text!r}: the notice must last between 0 and 3600 s")
    if provider not in PROVIDERS:
        raise ValueError(f"{text!r}: provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    soft = int(m.group(5)) if m.group(5) else None
    if soft is not None and provider not in SOFT_PROVIDERS:
        raise ValueError(f"{text!r}: only {' and '.join(SOFT_PROVIDERS)} give soft notices")
    if soft is not None and not 1 <= soft < step:
        raise ValueError(f"{text!r}: the soft notice's step must lie between 1 and {step - 1}")
    return PreemptSpec(stage, step, notice, provider, soft)


class Preemptions:
    """The metadata servers of a local swarm's planned preemptions, notices drawn at ``rate`` (SIGTERM with a
    ``rate_notice_seconds`` window, per block stage and attempt, as ``--failure-rate`` draws kills), and the
    notices and kills on time."""

    def __init__(
        self,
        specs: list[PreemptSpec],
        kill_log: list[ev.KilledEvent],
        rate: float = 0.0,
        rate_notice_seconds: float = DEFAULT_NOTICE_SECONDS,
        num_stages: int = 0,
        seed: int = 0,
        stage0: bool = False,
    ) -> None:
        self.rate, self.rate_notice_seconds, self.num_stages = rate, rate_notice_seconds, num_stages
        self._draws = StageDraws(seed + 1, num_stages, stage0)  # its own: notices do not move --failure-rate's
        self._drawn: set[tuple[int, int]] = set()  # (step, attempt) already given their draws
        taken = [s.stage for s in specs]
        if len(set(taken)) != len(taken):
            raise ValueError("at most one --preempt per stage (a replacement node is not preempted again)")
        self.specs = {s.stage: s for s in specs}
        self.servers: dict[int, MetadataServer] = {}
        self.fired: set[int] = set()  # stages whose notice was raised
        self.noticed: set[int] = set()  # pids of the nodes given a notice (their exit 0 after a handoff is planned)
        self.soft_fired: set[int] = set()  # stages whose soft notice was raised
        self.soft_replaced: set[int] = set()  # ... and got a replacement node with it (no spare was waiting)
        self.kill_log = kill_log  # the launcher's: a node killed at the end of its window is a planned death
        self._due: list[tuple[float, int, int, Child]] = []  # (when, stage, step, node): the machine goes

    def start(self) -> None:
        for stage, spec in self.specs.items():
            if spec.provider != "signal":
                self.servers[stage] = metadata_server(spec.provider)
                self.servers[stage].start()

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def options_for(self, stage: int | None, default: PreemptionOptions) -> PreemptionOptions:
        """What the node started now for ``stage`` watches: its planned notice's server (first node only)."""
        spec = self.specs.get(stage) if stage is not None else None
        if spec is None or stage in self.fired or stage in [d[1] for d in self._due]:
            return default
        if spec.provider == "signal":  # the node knows its window, as with a stop timeout of that length
            drain = max(spec.notice_seconds, 0.1)
            return default.model_copy(update={"mode": PreemptionMode.SIGNAL, "drain_seconds": drain})
        url = self.servers[stage].url
        return default.model_copy(update={"mode": PreemptionMode(spec.provider), "metadata_url": url})

    def inject(
        self,
        events: list[ev.Event],
        nodes: dict[int, Child],
        serving: Callable[[int], Child | None] = lambda s: None,
        records: list[StageRecord] | None = None,
    ) -> int:
        """Raises each notice once its step has started, and the drawn ones; SIGKILLs a node whose window has
        ended. ``serving(stage)``: the node serving a stage now; ``records``: the swarm's records (spares
        waiting). Returns how many replacement nodes the launcher should start now, as an autoscaler would:
        one for each hard notice raised, and one for each soft notice raised while no spare waits (a stage
        whose soft notice brought one gets none more with its hard notice)."""
        raised = self._soft(events, nodes, records or [])
        for e in ev.of_type(events, ev.AttemptEvent):
            if not self.rate or (e.step, e.attempt) in self._drawn:
                continue
            self._drawn.add((e.step, e.attempt))
            for stage, rng in self._draws.each():
                node = serving(stage) if rng.random() < self.rate else None
                if node is not None and node.proc.poll() is None and all(d[3] is not node for d in self._due):
                    node.proc.send_signal(signal.SIGTERM)
                    self.noticed.add(node.proc.pid)
                    self._due.append((time.monotonic() + self.rate_notice_seconds, stage, e.step, node))
                    raised += 1
        started = max((e.step for e in ev.of_type(events, ev.AttemptEvent)), default=0)
        now = time.monotonic()
        for stage, spec in self.specs.items():
            if stage in self.fired or started < spec.step or stage not in nodes:
                continue
            self.fired.add(stage)
            node = nodes[stage]
            self.noticed.add(node.proc.pid)
            if spec.provider == "signal":
                node.proc.send_signal(signal.SIGTERM)
            else:
                self.servers[stage].preempt("terminate", spec.notice_seconds)
            self._due.append((now + spec.notice_seconds, stage, started, node))
            raised += stage not in self.soft_replaced
        for item in [d for d in self._due if d[0] <= now]:
            self._due.remove(item)
            _, stage, step, node = item
            if node.proc.poll() is None:
                self.kill_log.append(ev.KilledEvent(stage=stage, step=step, by="preempt", pid=node.proc.pid))
                node.kill_group(signal.SIGKILL)
        return raised

    def _soft(self, events: list[ev.Event], nodes: dict[int, Child], records: list[StageRecord]) -> int:
        """Raises the soft notices whose step has started; returns how many replacement nodes they need."""
        started = max((e.step for e in ev.of_type(events, ev.AttemptEvent)), default=0)
        spares = sum(r.state == StageState.SPARE for r in records)
        raised = 0
        for stage, spec in self.specs.items():
            due = spec.soft_step is not None and started >= spec.soft_step
            if not due or stage in self.soft_fired or stage in self.fired or stage not in nodes:
                continue
            self.soft_fired.add(stage)
            server = self.servers[stage]
            if isinstance(server, AwsMetadataServer):
                server.rebalance()
            else:
                server.preempt("rebalance")  # GCP: a live migration
            if spares == 0:
                self.soft_replaced.add(stage)
                raised += 1
            else:
                spares -= 1  # that spare stands by for this stage
        return raised

    def acknowledged(self) -> dict[int, list[str]]:
        """Stage -> the Azure event ids its node acknowledged."""
        return {s: list(getattr(srv, "acknowledged", [])) for s, srv in self.servers.items()}
