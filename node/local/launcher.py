"""``swarm-node local``: a bootstrap DHT node and S stage daemons as separate OS processes on loopback.

Every child runs in its own process group with a parent-death signal, and every exit path (done, failure,
Ctrl-C, SIGTERM) kills those groups, so no process outlives the launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from node.config import SwarmConfig
from node.wire.records import StageRecord

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1


class LocalSwarmError(RuntimeError):
    """The local swarm could not start or finish; the message says which process and why."""


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


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
    config: SwarmConfig
    steps: int
    workdir: pathlib.Path | None = None
    json_out: pathlib.Path | None = None
    check_reference: bool = False
    threads: int | None = None
    refresh_seconds: float = 1.0
    step_timeout: float = 120.0
    startup_timeout: float = 180.0
    quiet: bool = False
    extra_run_args: list[str] = field(default_factory=list)


class LocalSwarm:
    """Starts, watches and tears down a swarm on this machine."""

    def __init__(self, opts: LocalOptions, console: Console | None = None) -> None:
        self.opts = opts
        self.console = console or Console(stderr=False, quiet=opts.quiet)
        self.children: list[Child] = []
        self.stage_children: dict[int, Child] = {}
        self.bootstrap_maddrs: list[str] = []
        self._own_workdir: tempfile.TemporaryDirectory[str] | None = None
        if opts.workdir is None:
            self._own_workdir = tempfile.TemporaryDirectory(prefix="swarm-node-local-")
            self.workdir = pathlib.Path(self._own_workdir.name)
        else:
            self.workdir = opts.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.events_path = self.workdir / "events.jsonl"
        self.save_dir = self.workdir / "weights"
        self.config_path = self.workdir / "config.json"
        self.dht = None

    # ---- processes --------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], capture_stdout: bool = False) -> Child:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        proc = subprocess.Popen(
            [sys.executable, "-m", "node", *args],
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
            ["dht", "--host", "127.0.0.1", "--port", "0", "--identity", str(self.workdir / "dht.key")],
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

    def start_stage(self, stage: int, extra: list[str] | None = None) -> Child:
        cfg = self.opts.config
        args = [
            "run",
            "--stage",
            str(stage),
            "--num-stages",
            str(cfg.num_stages),
            "--config",
            str(self.config_path),
            "--swarm",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--refresh",
            str(self.opts.refresh_seconds),
            "--step-timeout",
            str(self.opts.step_timeout),
            "--save-dir",
            str(self.save_dir),
        ]
        for maddr in self.bootstrap_maddrs:
            args += ["--initial-peers", maddr]
        if self.opts.threads:
            args += ["--threads", str(self.opts.threads)]
        if stage == 0:
            args += ["--steps", str(self.opts.steps), "--events-file", str(self.events_path)]
        args += self.opts.extra_run_args + (extra or [])
        child = self._spawn(f"stage{stage}", args)
        self.stage_children[stage] = child
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
    def read_events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        events = []
        for line in self.events_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
        return events

    def swarm_records(self) -> list[StageRecord]:
        if self.dht is None:
            return []
        from node.dht.directory import SwarmDirectory

        try:
            return SwarmDirectory(self.dht, "local").records()
        except Exception:  # progress display only
            return []

    def _view(self, events: list[dict[str, Any]], records: list[StageRecord]) -> Table:
        steps = [e for e in events if e.get("event") == "step"]
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
            tps = last["tokens"] / max(last["seconds"], 1e-9)
            row = [f"{last['step']}/{self.opts.steps}", f"{last['loss']:.4f}", f"{tps:,.0f}"]
        else:
            row = [f"0/{self.opts.steps}", "-", "-"]
        by_stage: dict[int, str] = {}
        for r in records:
            by_stage[r.stage] = r.state.value if r.stage not in by_stage else by_stage[r.stage] + "+" + r.state.value
        row += [by_stage.get(s, "starting") for s in range(self.opts.config.num_stages)]
        table.add_row(*row)
        return table

    def check_children(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None and not (child.name == "stage0" and code == 0):
                raise LocalSwarmError(f"{child.name} exited with code {code}: see {child.log_path}")

    def watch(self) -> list[dict[str, Any]]:
        """Shows live progress until stage 0 reports done (or a process fails)."""
        import hivemind

        self.dht = hivemind.DHT(initial_peers=self.bootstrap_maddrs, client_mode=True, start=True, await_ready=True)
        events: list[dict[str, Any]] = []
        last_records_at = 0.0
        records: list[StageRecord] = []
        with Live(self._view(events, records), console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                events = self.read_events()
                if any(e.get("event") == "done" for e in events):
                    live.update(self._view(events, records))
                    break
                self.check_children()
                if self.stage_children[0].proc.poll() == 0:
                    raise LocalSwarmError("stage 0 exited before finishing its steps")
                if time.monotonic() - last_records_at > 1.0:
                    records = self.swarm_records()
                    last_records_at = time.monotonic()
                live.update(self._view(events, records))
                time.sleep(0.25)
        self.final_records = self.swarm_records()
        return events

    # ---- the whole run ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.config_path.write_text(self.opts.config.model_dump_json(indent=2), encoding="utf-8")
        self.events_path.unlink(missing_ok=True)
        try:
            maddrs = self.start_bootstrap()
            self.console.print(f"bootstrap: {maddrs[0]}")
            for stage in range(self.opts.config.num_stages):
                self.start_stage(stage)
            started = time.monotonic()
            events = self.watch()
            wall = time.monotonic() - started
            stage_info = self._stage_info()
            # stage 0 exits by itself after its last step; the others save their weights on SIGTERM.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stage_children[0].proc.wait(timeout=60)
        finally:
            if self.dht is not None:
                self.dht.shutdown()
            self.stop_all()
        summary = self._summary(events, stage_info, wall)
        if self.opts.check_reference:
            summary["reference_max_abs_diff"] = self.reference_diff()
        return summary

    def _stage_info(self) -> list[dict[str, Any]]:
        latest = (
            {r.stage: r for r in self.final_records if r.pid == self.stage_children[r.stage].proc.pid}
            if getattr(self, "final_records", None)
            else {}
        )
        info = []
        for stage, child in sorted(self.stage_children.items()):
            r = latest.get(stage)
            info.append(
                {
                    "stage": stage,
                    "pid": child.proc.pid,
                    "grpc_address": r.grpc_address if r else None,
                    "metrics_port": r.metrics_port if r else None,
                    "peer_id": r.peer_id if r else None,
                }
            )
        return info

    def _summary(self, events: list[dict[str, Any]], stages: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        steps = [e for e in events if e.get("event") == "step"]
        tokens = sum(e["tokens"] for e in steps)
        seconds = sum(e["seconds"] for e in steps)
        return {
            "steps": len(steps),
            "loss": [e["loss"] for e in steps],
            "step_seconds": [e["seconds"] for e in steps],
            "tokens_per_second": tokens / seconds if seconds else 0.0,
            "wall_seconds": wall,
            "aborted_steps": sum(e.get("event") == "abort" for e in events),
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
        ref = train_reference(cfg, corpus.train, self.opts.steps)
        worst = 0.0
        for stage in range(cfg.num_stages):
            path = self.save_dir / f"stage{stage}.safetensors"
            if not path.exists():
                raise LocalSwarmError(f"stage {stage} saved no weights at {path}")
            swarm = load_file(str(path))
            for name, ref_tensor in ref.stage_state(stage).items():
                worst = max(worst, float((swarm[name].float() - ref_tensor.float()).abs().max()))
        return worst

    def cleanup(self) -> None:
        if self._own_workdir is not None:
            self._own_workdir.cleanup()
