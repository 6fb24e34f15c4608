"""``swarm-node local``: a bootstrap DHT node and S stage daemons as separate OS processes on loopback.

Every child runs in its own process group with a parent-death signal, and every exit path (done, failure,
Ctrl-C, SIGTERM) kills those groups, so no process outlives the launcher. Each stage daemon is started as
``swarm-node run --options WORKDIR/options/<name>.json``: the :class:`~node.options.NodeOptions` the
launcher wrote for it.

:class:`LocalSwarm` starts the processes, watches the run and tears it down; its parts live beside it:
:mod:`.children` (spawning and stopping processes), :mod:`.faults` (the launcher's own kills, and every
node death, planned or not), :mod:`.summary` (the run summary), :mod:`.view` (the live table) and :mod:`.prometheus`
(``--prometheus-dir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import pathlib
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from node import events as ev
from node.config import SwarmConfig
from node.local.children import (
    HOST,
    SWARM,
    Child,
    LocalSwarmError,
    interrupts_deferred,
    read_maddrs,
    serving,
    spawn,
    stop_all,
)
from node.local.faults import LauncherFaults
from node.local.links import EmulatedLinks, LinkShape, free_port
from node.local.preemptions import Preemptions, PreemptSpec
from node.local.prometheus import PrometheusTargets
from node.local.summary import StageLog, reference_diff, run_summary
from node.local.view import progress_table
from node.options import (
    DurabilityOptions,
    EvalOptions,
    NodeOptions,
    Placement,
    PreemptionMode,
    PreemptionOptions,
    RecoveryOptions,
    SecurityOptions,
    TimingOptions,
)
from node.recovery.faults import FaultSpec
from node.security.keys import NodeCredentials, init_authority, issue_node
from node.wire.records import SERVING_STATES, StageRecord

__all__ = ["HOST", "SWARM", "Child", "LocalOptions", "LocalSwarm", "LocalSwarmError"]

logger = logging.getLogger(__name__)


@dataclass
class LocalOptions:
    """The swarm to run; ``timing``, ``recovery`` and ``eval`` are handed to every node unchanged."""

    config: SwarmConfig
    steps: int
    workdir: pathlib.Path  # logs, events, options, weights (and checkpoints, unless recovery says where)
    check_reference: bool = False
    threads: int | None = None  # torch threads per node
    startup_timeout: float = 180.0
    quiet: bool = False
    timing: TimingOptions = field(default_factory=TimingOptions)
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    durability: DurabilityOptions = field(default_factory=DurabilityOptions)
    eval: EvalOptions = field(default_factory=EvalOptions)
    kills: list[FaultSpec] = field(default_factory=list)
    failure_rate: float = 0.0
    stage0_failures: bool = False  # --failure-rate and --preemption-rate draw for stage 0 too
    respawn: bool = True
    spares: int = 0
    seed: int = 0
    prometheus_dir: pathlib.Path | None = None  # write prometheus.yml + targets.json (file_sd) here
    metrics: bool = True  # every daemon serves /metrics on a free port
    insecure: bool = False  # no keys: cleartext gRPC and an open DHT (default: a throw-away swarm authority)
    # on one machine there is no cloud metadata service to ask: notices are signals (SIGTERM hands a stage over)
    preemption: PreemptionOptions = field(default_factory=lambda: PreemptionOptions(mode=PreemptionMode.SIGNAL))
    preempts: list[PreemptSpec] = field(default_factory=list)  # --preempt: notices from local metadata servers
    preemption_rate: float = 0.0  # each block stage gets a SIGTERM notice with this probability per attempt
    notice_seconds: float = 30.0  # --preemption-rate: the notice's window, then SIGKILL
    replicas: list[int] = field(default_factory=list)  # peers per stage (stage 0 always has one); empty: one each
    replica_slowdown: float = 1.0  # benchmark aid: every extra replica computes this many times slower
    emulate_compute: float = 0.0  # benchmark aid: seconds of sleep per microbatch and direction on block stages
    placement: Placement = Placement.VACANT  # where --stage auto nodes (spares, respawned nodes) serve
    link: LinkShape = field(default_factory=LinkShape)  # benchmark aid: an emulated WAN link in front of each node
    verbose: int = 0  # the daemons' -v count (their logs in WORKDIR/<name>.log): 0 logs warnings only


class LocalSwarm:
    """Starts, watches and tears down a swarm on this machine."""

    def __init__(self, opts: LocalOptions, console: Console | None = None) -> None:
        self.opts = opts
        self.console = console or Console(stderr=False, quiet=opts.quiet)
        self.children: list[Child] = []
        self.stage_children: dict[int, Child] = {}
        self.auto_children: list[Child] = []  # --stage auto: spares and replacements
        self.replica_children: list[Child] = []  # --replicas: the extra peers of replicated stages
        self.bootstrap_maddrs: list[str] = []
        self.workdir = opts.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.events_path = self.workdir / "events.jsonl"
        self.save_dir = self.workdir / "weights"
        self.config_path = self.workdir / "config.json"
        self.options_dir = self.workdir / "options"
        self.dht = None
        self.node_count = 0
        self.faults = LauncherFaults(opts.kills, opts.failure_rate, opts.config.num_stages, opts.seed,
                                     opts.stage0_failures)  # fmt: skip
        self.preemptions = Preemptions(
            opts.preempts, self.faults.kill_log, opts.preemption_rate, opts.notice_seconds, opts.config.num_stages,
            opts.seed, opts.stage0_failures,
        )  # fmt: skip
        self.stage_log = StageLog()
        self.prometheus = PrometheusTargets(opts.prometheus_dir) if opts.prometheus_dir is not None else None
        self.links = EmulatedLinks(opts.link, HOST) if opts.link.emulated else None
        self.link_ports: dict[int, int] = {}  # pid -> the port of its link's proxy

    @property
    def fired(self) -> set[str]:
        """Fault specs already carried out."""
        return self.faults.fired

    @property
    def kill_log(self) -> list[ev.KilledEvent]:
        """Kills done by the launcher itself (failure rate, spares)."""
        return self.faults.kill_log

    # ---- processes --------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], capture_stdout: bool = False) -> Child:
        child = spawn(self.workdir, name, args, capture_stdout)
        self.children.append(child)
        return child

    def start_bootstrap(self) -> list[str]:
        keys = self.credentials("dht").keys
        security = ["--insecure"] if keys is None else ["--keys", str(keys)]
        child = self._spawn(
            "dht",
            ["dht", "--host", HOST, "--port", "0", "--identity", str(self.workdir / "dht.key"), *security],
            capture_stdout=True,
        )
        self.bootstrap_maddrs = read_maddrs(child, self.opts.startup_timeout)
        return self.bootstrap_maddrs

    def credentials(self, name: str) -> SecurityOptions:
        """Node ``name``'s keys: a bundle from this swarm's own throw-away authority (``WORKDIR/keys``), made
        on first use; ``--insecure``: none."""
        if self.opts.insecure:
            return SecurityOptions(insecure=True)
        authority = self.workdir / "keys"
        if not (authority / "ca.key").exists():
            init_authority(authority, name="local")
        bundle = authority / "nodes" / name
        if not (bundle / "node.pem").exists():
            issue_node(authority, name, bundle)
        return SecurityOptions(keys=bundle)

    @functools.cached_property
    def own_credentials(self) -> NodeCredentials | None:
        """The launcher's own bundle (it reads the DHT as a client), None with ``--insecure``."""
        keys = self.credentials("local").keys
        return None if keys is None else NodeCredentials.load(keys)

    def node_options(
        self, stage: int | None, name: str | None = None, slowdown: float = 1.0, replica: int | None = None
    ) -> NodeOptions:
        """What a node started now for ``stage`` (None: ``--stage auto``) is told to do; ``replica``: its index
        among the replicas ``--replicas`` starts for the stage (None: the stage has one)."""
        o = self.opts
        return NodeOptions(
            slowdown=slowdown,
            emulate_compute=o.emulate_compute,
            placement=o.placement,
            config=o.config,
            stage=stage,
            swarm=SWARM,
            initial_peers=self.bootstrap_maddrs,
            host=HOST,
            steps=o.steps,
            events_file=self.events_path,
            save_dir=self.save_dir,
            threads=o.threads,
            metrics_port=0 if o.metrics else None,
            faults=self.faults.node_faults(stage, replica),  # a replacement: only those not yet happened
            timing=o.timing,
            recovery=o.recovery,
            durability=o.durability,
            eval=o.eval,
            preemption=self.preemptions.options_for(stage, self._preemption_options()),
            security=self.credentials(name or (f"stage{stage}" if stage is not None else "node")),
        )

    def _preemption_options(self) -> PreemptionOptions:
        """With ``--preemption-rate`` a node's SIGTERM window is the drawn notices' window."""
        o = self.opts
        if not o.preemption_rate:
            return o.preemption
        return o.preemption.model_copy(update={"drain_seconds": o.notice_seconds})

    def start_stage(self, stage: int | None, replica: int = 0) -> Child:
        """Starts a daemon for ``stage`` (None: ``--stage auto``, a spare or replacement node); ``replica`` > 0
        starts another replica of a served stage."""
        self.node_count += 1
        name = f"stage{stage}" if stage is not None else f"node{self.node_count}"
        if replica:
            name += f"r{replica}"
        self.options_dir.mkdir(exist_ok=True)
        options_file = self.options_dir / f"{name}.json"
        slowdown = self.opts.replica_slowdown if replica else 1.0
        replicated = stage is not None and stage < len(self.opts.replicas) and self.opts.replicas[stage] > 1
        options = self.node_options(stage, name, slowdown, replica if replicated else None)
        if self.links is not None:  # other nodes reach it through its link's proxy
            port = free_port(HOST)
            options = options.model_copy(update={"port": port, "announce_port": self.links.add(port)})
        options_file.write_text(options.model_dump_json(indent=2), encoding="utf-8")
        child = self._spawn(name, [*["-v"] * self.opts.verbose, "run", "--options", str(options_file)])
        if options.announce_port is not None:
            self.link_ports[child.proc.pid] = options.announce_port
        if replica:
            self.replica_children.append(child)
        elif stage is not None:
            self.stage_children[stage] = child
        else:
            self.auto_children.append(child)
        return child

    def stop_all(self, grace: float = 15.0) -> None:
        """SIGTERM every child (stages first, so they announce ``offline``), then SIGKILL whatever is left."""
        stop_all(self.children, grace)

    # ---- watching ---------------------------------------------------------------------------------
    def read_events(self) -> list[ev.Event]:
        return ev.read_events(self.events_path)

    def swarm_records(self) -> list[StageRecord]:
        if self.dht is None:
            return []
        from node.dht.directory import SwarmDirectory

        try:
            with interrupts_deferred():  # like its constructor, hivemind's get can be left wedged by an interrupt
                return SwarmDirectory(self.dht, SWARM, self.own_credentials).records()
        except Exception:  # progress display only
            return []

    def status_command(self, peer: str | None = None) -> str:
        """The ``swarm-node status`` command for this swarm: its swarm name, keys (a ``status`` bundle from the
        swarm's authority) or ``--insecure``, ``--peer`` (a stage's gRPC address: fast) and the bootstrap node
        (read when the peer does not answer)."""
        keys = self.credentials("status").keys
        security = ["--insecure"] if keys is None else ["--keys", str(keys)]
        argv = ["swarm-node", "status", "--swarm", SWARM, *security]
        if peer is not None:
            argv += ["--peer", peer]
        argv += [a for maddr in self.bootstrap_maddrs for a in ("--initial-peers", maddr)]
        return shlex.join(argv)

    def _print_status_command(self, records: list[StageRecord]) -> bool:
        """Prints :meth:`status_command` once stage 0 serves (True: printed)."""
        stage0 = [r for r in records if r.stage == 0 and r.state in SERVING_STATES]
        if not stage0:
            return False
        self.console.print(f"status: {self.status_command(stage0[0].grpc_address)}", soft_wrap=True)
        return True

    def _view(self, events: list[ev.Event], records: list[StageRecord]) -> Table:
        o = self.opts
        return progress_table(
            events,
            records,
            num_stages=o.config.num_stages,
            steps=o.steps,
            bootstrap=self.bootstrap_maddrs[0],
            deaths=self.faults.unplanned(),
        )

    def check_children(self, events: list[ev.Event]) -> None:
        """Reacts to dead children: every stage daemon or spare that dies, planned kill or not, is replaced by a
        ``--stage auto`` node (``--respawn``), and the swarm recovers; a node that handed its stage over on a
        notice already has its replacement. The bootstrap node dying, or a stage lost for good, is an error."""
        # the nodes given a notice (--preempt, --preemption-rate): their replacement was started with it
        noticed = self.preemptions.noticed
        deaths = self.faults.new_deaths(
            events,
            self.children,
            self.read_events,
            seen=self.stage_log.by_pid,
            started_for={child.proc.pid: stage for stage, child in self.stage_children.items()},
            noticed=noticed,
            respawn=self.opts.respawn,
        )
        for death in deaths:
            if self.links is not None and death.pid in self.link_ports:  # its port may go to a new node
                self.links.drop(self.link_ports.pop(death.pid))
            if death.replaced:
                self.start_stage(None)

    def watch(self) -> list[ev.Event]:
        """Shows live progress until stage 0 reports done (or a process fails)."""
        from node.dht.factory import make_dht

        with interrupts_deferred():  # a Ctrl-C or SIGTERM in hivemind's constructor would leave it spinning
            self.dht = make_dht(self.bootstrap_maddrs, None, self.own_credentials, client_mode=True)
        events: list[ev.Event] = []
        last_records_at = 0.0
        records: list[StageRecord] = []
        spares_started = status_shown = False
        with Live(self._view(events, records), console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                events = self.read_events()
                if ev.of_type(events, ev.DoneEvent):
                    live.update(self._view(events, records))
                    break
                if time.monotonic() - last_records_at > 0.5:
                    records = self.swarm_records()
                    last_records_at = time.monotonic()
                    self.stage_log.observe(records)
                    status_shown = status_shown or self._print_status_command(records)
                    if self.prometheus is not None:
                        self.prometheus.update(records, self.children)
                self.check_children(events)
                if not spares_started and ev.of_type(events, ev.StepEvent):
                    for _ in range(self.opts.spares):  # spares join once the swarm trains
                        self.start_stage(None)
                    # extra replicas join a training swarm too: each copies a live replica's exact state
                    for stage, count in enumerate(self.opts.replicas):
                        for k in range(1, count if stage else 1):
                            self.start_stage(stage, replica=k)
                    spares_started = True
                self.faults.inject(events, records, self.children, self.auto_children)
                serving_now = functools.partial(serving, self.children, records)
                for _ in range(self.preemptions.inject(events, self.stage_children, serving_now, records)):
                    if self.opts.respawn:  # a replacement arrives with the notice: the stage can be handed over
                        self.start_stage(None)
                live.update(self._view(events, records))
                time.sleep(0.1)
        self.stage_log.final_records = self.swarm_records()
        return events

    # ---- the whole run ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.config_path.write_text(self.opts.config.model_dump_json(indent=2), encoding="utf-8")
        self.events_path.unlink(missing_ok=True)
        if self.prometheus is not None:
            self.prometheus.write_config()
        try:
            self.preemptions.start()
            maddrs = self.start_bootstrap()
            self.console.print(f"bootstrap: {maddrs[0]}", soft_wrap=True)
            for stage in range(self.opts.config.num_stages):
                self.start_stage(stage)
            started = time.monotonic()
            self.watch()
            wall = time.monotonic() - started
            first_pids = {stage: child.proc.pid for stage, child in self.stage_children.items()}
            stage_info = self.stage_log.stage_info(self.opts.config.num_stages, first_pids)
            # stage 0 exits by itself after its last step; the others save their weights on SIGTERM.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stage_children[0].proc.wait(timeout=60)
        finally:
            if self.dht is not None:
                self.dht.shutdown()
            self.stop_all()
            self.preemptions.stop()
            if self.links is not None:
                self.links.close()
        # events written during shutdown (the last checkpoint writes) count too
        summary = run_summary(
            self.read_events(),
            stages=stage_info,
            wall=wall,
            launcher_kills=self.kill_log,
            deaths=self.faults.deaths,
            committed_samples=self.stage_log.committed_samples,
            config=self.opts.config,
            threads=self.opts.threads,
            bootstrap=self.bootstrap_maddrs,
            workdir=self.workdir,
        )
        if self.opts.preempts:
            acknowledged = self.preemptions.acknowledged()
            summary["preemptions"] = [
                {**dataclasses.asdict(spec), "acknowledged": acknowledged.get(spec.stage, [])}
                for spec in self.opts.preempts
            ]
        if self.opts.check_reference:
            summary["reference_max_abs_diff"] = self.reference_diff()
        return summary

    def reference_diff(self) -> float:
        """Largest |swarm - single-process| parameter difference after the same number of steps."""
        o = self.opts
        events = self.read_events()
        assignments = {e.step: e.assignment for e in ev.of_type(events, ev.StepEvent) if e.assignment}
        restores: dict[int, dict[int, int]] = {}
        for e in ev.of_type(events, ev.RecoveryEvent):
            if e.method == "snapshot":  # the stage went back to its snapshot, stale_steps before the swarm
                restores.setdefault(e.step, {})[e.stage] = e.step - e.stale_steps
        return reference_diff(o.config, o.steps, o.threads, self.save_dir, self.console, assignments, restores)
