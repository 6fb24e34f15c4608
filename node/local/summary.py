"""The run summary of a local swarm (what ``swarm-node local --json-out`` writes), from the events log and
what the launcher saw: every node death (planned or not), each recovery matched to the kill or unplanned death
that caused it, checkpoint figures, the node serving each stage at the end (:class:`StageLog`), and the
single-process reference comparison.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from node import events as ev
from node.config import SwarmConfig
from node.local.children import LocalSwarmError, present
from node.local.faults import Death
from node.wire.records import SERVING_STATES, StageRecord


class StageLog:
    """What the launcher saw of the swarm in the DHT: each stage's committed step over time, the newest serving
    record of each stage and of each node (by pid), and the records at the end."""

    def __init__(self) -> None:
        self.committed_samples: list[dict[str, Any]] = []
        self.last_seen: dict[int, StageRecord] = {}  # newest serving record of each stage
        # newest record of each node that has not gone offline, spares included: the stage a node that
        # dies served, and whether it ever joined the swarm
        self.by_pid: dict[int, StageRecord] = {}
        self.final_records: list[StageRecord] = []

    def observe(self, records: list[StageRecord]) -> None:
        for r in present(records):
            if r.pid is not None:
                self.by_pid[r.pid] = r
        serving = [r for r in present(records) if r.stage is not None]
        for r in serving:
            self.last_seen[r.stage] = r
        self.committed_samples += [
            {"time": time.time(), "stage": r.stage, "peer_id": r.peer_id, "committed_step": r.committed_step}
            for r in serving
        ]

    def stage_info(self, num_stages: int, first_pids: dict[int, int]) -> list[dict[str, Any]]:
        """The node serving each stage at the end (a replacement, if the original was killed); without a record,
        the pid of the node first started for it (``first_pids``)."""
        info, final = [], present(self.final_records)
        for stage in range(num_stages):
            r = next((r for r in present(self.final_records) if r.stage == stage), self.last_seen.get(stage))
            info.append(
                {
                    "stage": stage,
                    "pid": r.pid if r else first_pids.get(stage),
                    "grpc_address": r.grpc_address if r else None,
                    "metrics_port": r.metrics_port if r else None,
                    "peer_id": r.peer_id if r else None,
                    # peers serving the stage at the end (several: replicas)
                    "replicas": sum(x.stage == stage and x.state in SERVING_STATES for x in final),
                    "last_recovery": r.last_recovery.model_dump() if r and r.last_recovery else None,
                    # a preempted neighbour's state this node still keeps (dropped once that stage is served again)
                    "parked_stage": r.parked_stage if r else None,
                }
            )
        return info


@dataclass(frozen=True)
class _Cause:
    """What took a stage down: a kill (the daemon's own or the launcher's) or an unplanned death."""

    time: float
    stage: int | None
    killed_in: str | None


def _kill_cause(kill: ev.KilledEvent) -> _Cause:
    return _Cause(kill.time, kill.stage, kill.phase if kill.by is None else kill.by)


def _unplanned_causes(deaths: Sequence[Death], detections: list[ev.FailureDetectedEvent]) -> list[_Cause]:
    """The unplanned deaths as causes, at the earliest time each may have happened. A node whose stage the
    launcher had not seen yet (a spare that had just taken one) gets the stage its peers found dead."""
    causes = []
    for d in deaths:
        if d.planned:
            continue
        stage = d.stage
        if stage is None and d.peer_id is not None:
            found = next((e for e in detections if e.peer == d.peer_id and e.time >= d.died_at), None)
            stage = found.stage if found else None
        causes.append(_Cause(d.died_at, stage, "unplanned"))
    return causes


def recoveries(
    events: list[ev.Event], launcher_kills: list[ev.KilledEvent], deaths: Sequence[Death] = ()
) -> list[dict[str, Any]]:
    """One entry per rebuilt stage, matched to the kill or unplanned death (``killed_in: "unplanned"``) that
    caused it; ``deaths``: what the launcher saw die (:attr:`LauncherFaults.deaths`)."""
    steps = ev.of_type(events, ev.StepEvent)
    detections = ev.of_type(events, ev.FailureDetectedEvent)
    kills = sorted(
        [_kill_cause(e) for e in ev.of_type(events, ev.KilledEvent) if e.phase != "fetch"]
        + [_kill_cause(k) for k in launcher_kills if k.stage is not None]
        + _unplanned_causes(deaths, detections),
        key=lambda k: k.time,
    )
    unplanned_pids = {d.pid for d in deaths if not d.planned}
    notices = [n for n in ev.of_type(events, ev.NoticeEvent) if n.kind == "terminate" and n.stage is not None]
    out, used = [], set()
    for r in ev.of_type(events, ev.RecoveryEvent):
        if r.method == "handoff":
            notice = next((n for n in reversed(notices) if n.stage == r.stage and n.time <= r.time), None)
            after = next((s for s in steps if s.time > r.time), None)
            out.append(
                {
                    "stage": r.stage,
                    "step": r.step,
                    "method": r.method,
                    "sources": r.sources,
                    # a SIGTERM from outside is a notice too: the node hands its stage over all the same
                    "killed_in": "unplanned" if notice and notice.pid in unplanned_pids else "preempt",
                    "notice_seconds": notice.seconds_left if notice else None,
                    "handoff_seconds": r.time - notice.time if notice else None,
                    "recover_seconds": after.time - notice.time if notice and after else None,
                    "bytes_fetched": r.bytes_fetched,
                    "rebuild_seconds": r.rebuild_seconds,
                    "stale_steps": r.stale_steps,
                }
            )
            continue
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
                "killed_in": kill.killed_in,
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


def resumed(events: list[ev.Event]) -> dict[str, Any] | None:
    """``--resume``: the snapshot step the swarm started from, and what taking it cost each stage."""
    taken = [r for r in ev.of_type(events, ev.RecoveryEvent) if r.method == "resume"]
    if not taken:
        return None
    return {
        "step": max(r.step for r in taken),
        "stages": sorted(r.stage for r in taken),
        "bytes": sum(r.bytes_fetched for r in taken),
        "seconds": max(r.rebuild_seconds for r in taken),
    }


def run_summary(
    events: list[ev.Event],
    *,
    stages: list[dict[str, Any]],
    wall: float,
    launcher_kills: list[ev.KilledEvent],
    deaths: Sequence[Death] = (),
    committed_samples: list[dict[str, Any]],
    config: SwarmConfig,
    threads: int | None,
    bootstrap: list[str],
    workdir: pathlib.Path,
) -> dict[str, Any]:
    """The run summary: ``stages`` from :meth:`StageLog.stage_info`, ``wall`` the seconds of the run,
    ``deaths`` every node the launcher saw die (``deaths`` in the summary, planned or not)."""
    steps = ev.of_type(events, ev.StepEvent)
    tokens = sum(e.tokens for e in steps)
    seconds = sum(e.seconds for e in steps)
    return {
        "steps": len(steps),
        "loss": [e.loss for e in steps],
        "step_seconds": [e.seconds for e in steps],
        "prepare_seconds": [e.prepare_seconds for e in steps],
        # stages served by several replicas: each replica's microbatches, per step (None: one peer each)
        "step_assignments": [e.assignment for e in steps],
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "wall_seconds": wall,
        "threads_per_stage": threads,  # a reference run needs the same count to match bit for bit
        "aborted_steps": len(ev.of_type(events, ev.AbortEvent)),
        "recoveries": recoveries(events, launcher_kills, deaths),
        "kills": [ev.dump(e) for e in ev.of_type(events, ev.KilledEvent)] + [launcher_kill(k) for k in launcher_kills],
        "deaths": [d.summary() for d in deaths],
        "committed_samples": committed_samples,
        "rollbacks": [{"step": e.step, "time": e.time} for e in ev.of_type(events, ev.RolledBackEvent)],
        "evaluations": [
            {"step": e.step, "val_loss": e.val_loss, "time": e.time, "seconds": e.seconds}
            for e in ev.of_type(events, ev.EvalEvent)
        ],
        "checkpoints": checkpoint_summary(events),
        "snapshots": [
            {"step": e.step, "bytes": e.bytes, "seconds": e.seconds} for e in ev.of_type(events, ev.SnapshotEvent)
        ],
        "neighbour_snapshots": neighbour_snapshot_summary(events),
        "resumed": resumed(events),
        "bootstrap": bootstrap,
        "config": config.model_dump(mode="json"),
        "stages": stages,
        "workdir": str(workdir),
    }


def launcher_kill(kill: ev.KilledEvent) -> dict[str, Any]:
    """A kill of the launcher's own, as the run summary lists it: ``by`` says why; it has no ``phase``."""
    return {key: value for key, value in ev.dump(kill).items() if key != "phase"}


def neighbour_snapshot_summary(events: list[ev.Event]) -> dict[str, Any]:
    """Neighbour snapshots sent in the run (``--recovery ladder``): count, bytes and commit-to-held times."""
    sent = ev.of_type(events, ev.NeighbourSnapshotEvent)
    return {
        "sent": len(sent),
        "bytes": sum(e.bytes for e in sent),
        "seconds_mean": sum(e.seconds for e in sent) / len(sent) if sent else None,
    }


def checkpoint_summary(events: list[ev.Event]) -> dict[str, Any]:
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


def reference_diff(
    config: SwarmConfig,
    steps: int,
    threads: int | None,
    save_dir: pathlib.Path,
    console: Console,
    assignments: dict[int, dict[str, list[list[int]]]] | None = None,
    restores: dict[int, dict[int, int]] | None = None,
) -> float:
    """Largest |swarm - single-process| parameter difference after the same number of steps: the stages' saved
    weights in ``save_dir`` against a reference trained here with the same ``threads`` (and the same replica
    shares and snapshot restores, see :func:`~node.train.reference.train_reference`)."""
    from safetensors.torch import load_file

    from node.data import load_corpus_for
    from node.train.reference import train_reference

    corpus = load_corpus_for(config)
    console.print("training the single-process reference ...")
    ref = train_reference(config, corpus.train, steps, threads=threads, assignments=assignments, restores=restores)
    worst = 0.0
    for stage in range(config.num_stages):
        path = save_dir / f"stage{stage}.safetensors"
        if not path.exists():
            raise LocalSwarmError(f"stage {stage} saved no weights at {path}")
        swarm = load_file(str(path))
        for name, ref_tensor in ref.stage_state(stage).items():
            worst = max(worst, float((swarm[name].float() - ref_tensor.float()).abs().max()))
    return worst
