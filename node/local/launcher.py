"""``swarm-node local``: a bootstrap DHT node and S stage daemons as separate OS processes on loopback.

Every child runs in its own process group with a parent-death signal, and every exit path (done, failure,
Ctrl-C, SIGTERM) kills those groups, so no process outlives the launcher. Each stage daemon is started as
``swarm-node run --options WORKDIR/options/<name>.json``: the :class:`~node.options.NodeOptions` the
launcher wrote for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pathlib
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from node import events as ev
from node.config import SwarmConfig
from node.local import node_argv
from node.options import EvalOptions, NodeOptions, RecoveryOptions, TimingOptions
from node.recovery.faults import FaultSpec
from node.wire.records import StageRecord, StageState

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
SWARM = "local"  # the swarm name (DHT namespace) of every local swarm
HOST = "127.0.0.1"


class LocalSwarmError(RuntimeError):
    """The local swarm could not start or finish; the message says which process and why."""


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _present(records: list[StageRecord]) -> list[StageRecord]:
    """The records of nodes that have not gone offline."""
    return [r for r in records if r.state != StageState.OFFLINE]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: pathlib.Path | None = None

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


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
    eval: EvalOptions = field(default_factory=EvalOptions)
    kills: list[FaultSpec] = field(default_factory=list)
    failure_rate: float = 0.0
    respawn: bool = True
    spares: int = 0
    seed: int = 0
    prometheus_dir: pathlib.Path | None = None  # write prometheus.yml + targets.json (file_sd) here
    metrics: bool = True  # every daemon serves /metrics on a free port


class LocalSwarm:
    """Starts, watches and tears down a swarm on this machine."""

    def __init__(self, opts: LocalOptions, console: Console | None = None) -> None:
        self.opts = opts
        self.console = console or Console(stderr=False, quiet=opts.quiet)
        self.children: list[Child] = []
        self.stage_children: dict[int, Child] = {}
        self.bootstrap_maddrs: list[str] = []
        self.workdir = opts.workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.events_path = self.workdir / "events.jsonl"
        self.save_dir = self.workdir / "weights"
        self.config_path = self.workdir / "config.json"
        self.options_dir = self.workdir / "options"
        self.dht = None
        self.fired: set[str] = set()  # fault specs already carried out
        self.kill_log: list[ev.KilledEvent] = []  # kills done by the launcher itself (failure rate, spares)
        self.auto_children: list[Child] = []
        self.handled_deaths: set[int] = set()
        self.node_count = 0
        self.committed_samples: list[dict[str, Any]] = []
        self.final_records: list[StageRecord] = []
        self.last_seen: dict[int, StageRecord] = {}  # newest serving record of each stage
        self._seen_attempts: set[int] = set()  # steps started
        self._drawn_attempts: set[tuple[int, int]] = set()  # (step, attempt) already given their fault draws
        self._due_kills: list[tuple[float, int, int, str]] = []  # (due, stage, step, why)
        self._rng = random.Random(opts.seed)
        self._prometheus_targets: set[tuple[str, str]] | None = None  # as last written to targets.json

    # ---- processes --------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], capture_stdout: bool = False) -> Child:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        proc = subprocess.Popen(
            node_argv(*args),
            stdout=subprocess.PIPE if capture_stdout else log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            preexec_fn=_child_setup,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def start_bootstrap(self) -> list[str]:
        child = self._spawn(
            "dht",
            ["dht", "--host", HOST, "--port", "0", "--identity", str(self.workdir / "dht.key")],
            capture_stdout=True,
        )
        assert child.proc.stdout is not None
        deadline = time.monotonic() + self.opts.startup_timeout
        line = b""
        os.set_blocking(child.proc.stdout.fileno(), False)
        while time.monotonic() < deadline:
            chunk = child.proc.stdout.read()
            if chunk:
                line += chunk
            if b"\n" in line:
                break
            if child.proc.poll() is not None:
                raise LocalSwarmError(f"bootstrap DHT node exited with {child.proc.returncode}: see {child.log_path}")
            time.sleep(0.05)
        else:
            raise LocalSwarmError("bootstrap DHT node did not print its address in time")
        self.bootstrap_maddrs = line.split(b"\n", 1)[0].decode().split()
        return self.bootstrap_maddrs

    def node_options(self, stage: int | None) -> NodeOptions:
        """What a node started now for ``stage`` (None: ``--stage auto``) is told to do."""
        o = self.opts
        return NodeOptions(
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
            # a replacement only gets the faults that have not happened yet
            faults=[str(s) for s in o.kills if s.stage is not None and s.phase != "start" and str(s) not in self.fired],
            timing=o.timing,
            recovery=o.recovery,
            eval=o.eval,
        )

    def start_stage(self, stage: int | None) -> Child:
        """Starts a daemon for ``stage`` (None: ``--stage auto``, a spare or replacement node)."""
        self.node_count += 1
        name = f"stage{stage}" if stage is not None else f"node{self.node_count}"
        self.options_dir.mkdir(exist_ok=True)
        options_file = self.options_dir / f"{name}.json"
        options_file.write_text(self.node_options(stage).model_dump_json(indent=2), encoding="utf-8")
        child = self._spawn(name, ["run", "--options", str(options_file)])
        if stage is not None:
            self.stage_children[stage] = child
        else:
            self.auto_children.append(child)
        return child

    def stop_all(self, grace: float = 15.0) -> None:
        """SIGTERM every child (stages first, so they announce ``offline``), then SIGKILL whatever is left."""
        # The leader only: SIGTERM to the whole group would also kill the daemon's DHT helper process
        # before the daemon could announce itself offline with it.
        for child in sorted(self.children, key=lambda c: c.name == "dht"):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        deadline = time.monotonic() + grace
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for child in self.children:
            child.kill_group(signal.SIGKILL)  # the group may still hold the DHT helper or p2pd
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)

    # ---- watching ---------------------------------------------------------------------------------
    def read_events(self) -> list[ev.Event]:
        return ev.read_events(self.events_path)

    def swarm_records(self) -> list[StageRecord]:
        if self.dht is None:
            return []
        from node.dht.directory import SwarmDirectory

        try:
            return SwarmDirectory(self.dht, SWARM).records()
        except Exception:  # progress display only
            return []

    def _view(self, events: list[ev.Event], records: list[StageRecord]) -> Table:
        steps = ev.of_type(events, ev.StepEvent)
        table = Table(
            title=f"swarm-node local: {self.opts.config.num_stages} stages, bootstrap {self.bootstrap_maddrs[0]}"
        )
        table.add_column("step")
        table.add_column("loss")
        table.add_column("tokens/s")
        for s in range(self.opts.config.num_stages):
            table.add_column(f"stage {s}")
        if steps:
            last = steps[-1]
            tps = last.tokens / max(last.seconds, 1e-9)
            row = [f"{last.step}/{self.opts.steps}", f"{last.loss:.4f}", f"{tps:,.0f}"]
        else:
            row = [f"0/{self.opts.steps}", "-", "-"]
        by_stage: dict[int, str] = {}
        for r in records:
            by_stage[r.stage] = r.state.value if r.stage not in by_stage else by_stage[r.stage] + "+" + r.state.value
        row += [by_stage.get(s, "starting") for s in range(self.opts.config.num_stages)]
        table.add_row(*row)
        return table

    def pid_of_stage(self, records: list[StageRecord], stage: int) -> Child | None:
        """Our child process serving ``stage`` now, according to the DHT."""
        pids = {r.pid for r in _present(records) if r.stage == stage}
        return next((c for c in self.children if c.proc.pid in pids and c.proc.poll() is None), None)

    def _kill(self, child: Child, stage: int | None, reason: str, step: int) -> None:
        self.kill_log.append(ev.KilledEvent(stage=stage, step=step, by=reason, pid=child.proc.pid))
        child.kill_group(signal.SIGKILL)

    def inject_faults(self, events: list[ev.Event], records: list[StageRecord]) -> None:
        """Launcher-side faults: ``--failure-rate`` and ``spare@STEP`` kills, at the start of each step."""
        # every attempt is an iteration that can fail, replays after an abort or a rollback included
        for e in ev.of_type(events, ev.AttemptEvent):
            if (key := (e.step, e.attempt)) in self._drawn_attempts:
                continue
            self._drawn_attempts.add(key)
            self._seen_attempts.add(e.step)
            for spec in self.opts.kills:
                if spec.phase == "start" and spec.step == e.step and str(spec) not in self.fired:
                    self.fired.add(str(spec))
                    self._due_kills.append((time.monotonic() + 0.2, spec.stage, e.step, "start"))
            for stage in range(1, self.opts.config.num_stages):
                if self.opts.failure_rate and self._rng.random() < self.opts.failure_rate:
                    # mid-step: after a random part of a typical step
                    delay = self._rng.uniform(0.1, 0.5)
                    self._due_kills.append((time.monotonic() + delay, stage, e.step, "failure-rate"))
        # spare@STEP: the first idle spare seen once step STEP has started
        reached = max(self._seen_attempts, default=0)
        for spec in self.opts.kills:
            if spec.stage is None and spec.step <= reached and str(spec) not in self.fired:
                spare_pids = {r.pid for r in records if r.state == StageState.SPARE}
                spare = next(
                    (c for c in self.auto_children if c.proc.pid in spare_pids and c.proc.poll() is None), None
                )
                if spare is not None:
                    self.fired.add(str(spec))
                    self._kill(spare, None, "spare", reached)
        now = time.monotonic()
        for item in [k for k in self._due_kills if k[0] <= now]:
            self._due_kills.remove(item)
            child = self.pid_of_stage(records, item[1])
            if child is not None:
                self._kill(child, item[1], item[3], item[2])

    def check_children(self, events: list[ev.Event]) -> None:
        """Reacts to dead children: killed nodes are replaced (``--respawn``), anything else is an error."""
        for e in events:
            if isinstance(e, ev.KilledEvent):
                self.fired.add(f"{e.stage}@{e.step}:{e.phase}")
            if isinstance(e, ev.UnrecoverableEvent):
                raise LocalSwarmError(f"stage {e.stage} was lost and {e.reason}; training stopped")
        killed_pids = {k.pid for k in self.kill_log} | {e.pid for e in ev.of_type(events, ev.KilledEvent)}
        for child in list(self.children):
            code = child.proc.poll()
            if code is None or child.proc.pid in self.handled_deaths:
                continue
            if child.name == "stage0" and code == 0:
                continue
            if code == -signal.SIGKILL and child.proc.pid not in killed_pids:
                # a daemon writes its "killed" event and then dies: the death we just saw may be newer than
                # the events read above, so read them again before calling it an error
                killed_pids |= {e.pid for e in ev.of_type(self.read_events(), ev.KilledEvent)}
            if code == -signal.SIGKILL and child.proc.pid in killed_pids:
                self.handled_deaths.add(child.proc.pid)
                if self.opts.respawn:
                    self.start_stage(None)
                continue
            raise LocalSwarmError(f"{child.name} exited with code {code}: see {child.log_path}")

    def watch(self) -> list[ev.Event]:
        """Shows live progress until stage 0 reports done (or a process fails)."""
        import hivemind

        self.dht = hivemind.DHT(initial_peers=self.bootstrap_maddrs, client_mode=True, start=True, await_ready=True)
        events: list[ev.Event] = []
        last_records_at = 0.0
        records: list[StageRecord] = []
        spares_started = False
        with Live(self._view(events, records), console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                events = self.read_events()
                if ev.of_type(events, ev.DoneEvent):
                    live.update(self._view(events, records))
                    break
                if time.monotonic() - last_records_at > 0.5:
                    records = self.swarm_records()
                    last_records_at = time.monotonic()
                    serving = [r for r in _present(records) if r.stage is not None]
                    for r in serving:
                        self.last_seen[r.stage] = r
                    self.update_prometheus_targets(records)
                    self.committed_samples += [
                        {
                            "time": time.time(),
                            "stage": r.stage,
                            "peer_id": r.peer_id,
                            "committed_step": r.committed_step,
                        }
                        for r in serving
                    ]
                self.check_children(events)
                if not spares_started and ev.of_type(events, ev.StepEvent):
                    for _ in range(self.opts.spares):  # spares join once the swarm trains
                        self.start_stage(None)
                    spares_started = True
                self.inject_faults(events, records)
                live.update(self._view(events, records))
                time.sleep(0.1)
        self.final_records = self.swarm_records()
        return events

    def write_prometheus_config(self) -> None:
        """``--prometheus-dir``: the same scrape job as docker compose's, discovering the local daemons
        from ``targets.json`` (kept up to date as nodes die and replacements start)."""
        from node.monitoring import prometheus_config

        directory = self.opts.prometheus_dir
        assert directory is not None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prometheus.yml").write_text(prometheus_config(SWARM), encoding="utf-8")
        self.update_prometheus_targets([])

    def update_prometheus_targets(self, records: list[StageRecord]) -> None:
        if self.opts.prometheus_dir is None:
            return
        from node.monitoring import TARGETS_FILE, write_targets

        names = {c.proc.pid: c.name for c in self.children if c.proc.poll() is None}
        targets = {
            (names[r.pid], f"{HOST}:{r.metrics_port}") for r in _present(records) if r.metrics_port and r.pid in names
        }
        if targets != self._prometheus_targets:
            write_targets(self.opts.prometheus_dir / TARGETS_FILE, SWARM, targets)
            self._prometheus_targets = targets

    def recoveries(self, events: list[ev.Event]) -> list[dict[str, Any]]:
        """One entry per rebuilt stage, matched to the kill that caused it."""
        kills = sorted(
            [e for e in ev.of_type(events, ev.KilledEvent) if e.phase != "fetch"]
            + [k for k in self.kill_log if k.stage is not None],
            key=lambda k: k.time,
        )
        steps = ev.of_type(events, ev.StepEvent)
        detections = ev.of_type(events, ev.FailureDetectedEvent)
        out, used = [], set()
        for r in ev.of_type(events, ev.RecoveryEvent):
            kill = next(
                (k for k in reversed(kills) if k.stage == r.stage and k.time <= r.time and id(k) not in used),
                None,
            )
            if kill is None:
                continue
            used.add(id(kill))
            death = kill.time
            detected = next((d.time for d in detections if d.stage == r.stage and d.time >= death), None)
            after = next((s for s in steps if s.time > r.time), None)
            before = next((s for s in reversed(steps) if s.time < death), None)
            out.append(
                {
                    "stage": r.stage,
                    "step": r.step,
                    "method": r.method,
                    "sources": r.sources,
                    "killed_in": kill.phase if kill.by is None else kill.by,
                    "detect_seconds": None if detected is None else detected - death,
                    "recover_seconds": None if after is None else after.time - death,
                    "rebuild_seconds": r.rebuild_seconds,
                    "bytes_fetched": r.bytes_fetched,
                    "source_grad_norms": r.source_grad_norms,
                    "loss_before": before.loss if before else None,
                    "loss_after": after.loss if after else None,
                }
            )
        return out

    # ---- the whole run ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.config_path.write_text(self.opts.config.model_dump_json(indent=2), encoding="utf-8")
        self.events_path.unlink(missing_ok=True)
        if self.opts.prometheus_dir is not None:
            self.write_prometheus_config()
        try:
            maddrs = self.start_bootstrap()
            self.console.print(f"bootstrap: {maddrs[0]}", soft_wrap=True)
            for stage in range(self.opts.config.num_stages):
                self.start_stage(stage)
            started = time.monotonic()
            self.watch()
            wall = time.monotonic() - started
            stage_info = self._stage_info()
            # stage 0 exits by itself after its last step; the others save their weights on SIGTERM.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stage_children[0].proc.wait(timeout=60)
        finally:
            if self.dht is not None:
                self.dht.shutdown()
            self.stop_all()
        # events written during shutdown (the last checkpoint writes) count too
        summary = self._summary(self.read_events(), stage_info, wall)
        if self.opts.check_reference:
            summary["reference_max_abs_diff"] = self.reference_diff()
        return summary

    def _stage_info(self) -> list[dict[str, Any]]:
        """The node serving each stage at the end (a replacement, if the original was killed)."""
        info = []
        for stage in range(self.opts.config.num_stages):
            r = next((r for r in _present(self.final_records) if r.stage == stage), self.last_seen.get(stage))
            child = self.stage_children.get(stage)
            info.append(
                {
                    "stage": stage,
                    "pid": r.pid if r else (child.proc.pid if child else None),
                    "grpc_address": r.grpc_address if r else None,
                    "metrics_port": r.metrics_port if r else None,
                    "peer_id": r.peer_id if r else None,
                    "last_recovery": r.last_recovery.model_dump() if r and r.last_recovery else None,
                }
            )
        return info

    def _summary(self, events: list[ev.Event], stages: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        steps = ev.of_type(events, ev.StepEvent)
        tokens = sum(e.tokens for e in steps)
        seconds = sum(e.seconds for e in steps)
        return {
            "steps": len(steps),
            "loss": [e.loss for e in steps],
            "step_seconds": [e.seconds for e in steps],
            "tokens_per_second": tokens / seconds if seconds else 0.0,
            "wall_seconds": wall,
            "threads_per_stage": self.opts.threads,  # a reference run needs the same count to match bit for bit
            "aborted_steps": len(ev.of_type(events, ev.AbortEvent)),
            "recoveries": self.recoveries(events),
            "kills": [ev.dump(e) for e in ev.of_type(events, ev.KilledEvent)]
            + [_launcher_kill(k) for k in self.kill_log],
            "committed_samples": self.committed_samples,
            "rollbacks": [{"step": e.step, "time": e.time} for e in ev.of_type(events, ev.RolledBackEvent)],
            "evaluations": [
                {"step": e.step, "val_loss": e.val_loss, "time": e.time, "seconds": e.seconds}
                for e in ev.of_type(events, ev.EvalEvent)
            ],
            "checkpoints": _checkpoint_summary(events),
            "bootstrap": self.bootstrap_maddrs,
            "config": self.opts.config.model_dump(mode="json"),
            "stages": stages,
            "workdir": str(self.workdir),
        }

    def reference_diff(self) -> float:
        """Largest |swarm - single-process| parameter difference after the same number of steps."""
        from safetensors.torch import load_file

        from node.data import load_corpus
        from node.train.reference import train_reference

        cfg = self.opts.config
        corpus = load_corpus(cfg.data)
        self.console.print("training the single-process reference ...")
        ref = train_reference(cfg, corpus.train, self.opts.steps, threads=self.opts.threads)
        worst = 0.0
        for stage in range(cfg.num_stages):
            path = self.save_dir / f"stage{stage}.safetensors"
            if not path.exists():
                raise LocalSwarmError(f"stage {stage} saved no weights at {path}")
            swarm = load_file(str(path))
            for name, ref_tensor in ref.stage_state(stage).items():
                worst = max(worst, float((swarm[name].float() - ref_tensor.float()).abs().max()))
        return worst


def _launcher_kill(kill: ev.KilledEvent) -> dict[str, Any]:
    """A kill of the launcher's own, as the run summary lists it: ``by`` says why; it has no ``phase``."""
    return {key: value for key, value in ev.dump(kill).items() if key != "phase"}


def _checkpoint_summary(events: list[ev.Event]) -> dict[str, Any]:
    """Checkpoint writes of the run (``--recovery checkpoint``): count, bytes and durations."""
    writes = ev.of_type(events, ev.CheckpointEvent)
    snapshots = [e.seconds for e in ev.of_type(events, ev.CheckpointSnapshotEvent)]
    return {
        "writes": len(writes),
        "bytes": sum(e.bytes for e in writes),
        "write_seconds_mean": sum(e.write_seconds for e in writes) / len(writes) if writes else None,
        "snapshot_seconds_mean": sum(snapshots) / len(snapshots) if snapshots else None,
        "snapshot_seconds_total": sum(snapshots),
    }
