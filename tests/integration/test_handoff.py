"""A preempted stage hands its exact state over: real processes over mutual TLS and a token-gated DHT, notices
from real local HTTP servers that speak AWS's, GCP's and Azure's metadata protocols and a real SIGTERM (as
``docker stop`` and systemd send it), a spare that takes each stage over with method ``handoff``, and runs
whose weights and losses equal the single-process reference's."""

from __future__ import annotations

import os
import pathlib
import signal

import pytest

from node.data import load_corpus
from node.events import (
    AbortEvent,
    AttemptEvent,
    DoneEvent,
    FencedEvent,
    HandedOverEvent,
    NoticeEvent,
    RecoveryEvent,
    StepEvent,
    of_type,
    read_events,
)
from node.local.launcher import LocalSwarm
from node.train.reference import train_reference
from tests import conftest
from tests.conftest import swarm_status, wait_for

pytestmark = pytest.mark.integration
STEPS = 80  # the spare starts (slowly, on a loaded machine), the notice and the handover, well before the end


def _spare_waiting(swarm: LocalSwarm) -> int:
    """Starts a spare once the swarm trains and returns its pid when it waits for a vacant stage."""
    wait_for(lambda: len(of_type(swarm.read_events(), StepEvent)) >= 3, 180, "training to start")
    spare = swarm.start_stage(None)
    maddr, keys = swarm.bootstrap_maddrs[0], swarm.credentials("status").keys
    wait_for(
        lambda: any(r["pid"] == spare.proc.pid and r["state"] == "spare" for r in swarm_status(maddr, keys=keys)),
        120,
        "the spare to wait for a vacant stage",
    )
    return spare.proc.pid


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("running_swarm", [STEPS], indirect=True, ids=[f"{STEPS}steps"])
def test_sigterm_hands_a_block_stage_over_exactly(running_swarm: LocalSwarm) -> None:
    swarm, stage = running_swarm, 2
    spare = _spare_waiting(swarm)
    leaving = swarm.stage_children[stage].proc
    assert not of_type(swarm.read_events(), DoneEvent), "the swarm finished before the notice (raise STEPS)"
    os.kill(leaving.pid, signal.SIGTERM)  # the daemon only, as docker stop does (its DHT helper stays up)
    assert leaving.wait(timeout=120) == 0  # handed over, then a clean exit
    wait_for(lambda: of_type(swarm.read_events(), DoneEvent), 300, "training to finish")
    events = swarm.read_events()
    [notice] = [e for e in of_type(events, NoticeEvent) if e.pid == leaving.pid]
    assert (notice.provider, notice.kind, notice.stage) == ("signal", "terminate", stage)
    [handed] = of_type(events, HandedOverEvent)
    [recovery] = of_type(events, RecoveryEvent)
    assert (handed.stage, handed.pid) == (stage, leaving.pid) and handed.to is not None
    assert (recovery.stage, recovery.pid, recovery.method) == (stage, spare, "handoff")
    assert recovery.step == handed.step and recovery.bytes_fetched > 0
    assert not [e for e in of_type(events, FencedEvent) if e.pid != leaving.pid]
    # the leaving node finished the step in flight before its state went: nothing was replayed
    assert not of_type(events, AbortEvent)
    # every step committed once, each with the reference's loss: the handover lost and changed nothing
    steps = of_type(events, StepEvent)
    assert [e.step for e in steps] == list(range(1, STEPS + 1))
    reference = train_reference(swarm.opts.config, load_corpus(None).train, STEPS, threads=1)
    assert [e.loss for e in steps] == reference.losses


def _mid_step(events: list, notice: NoticeEvent) -> bool:
    """Whether ``notice`` arrived while a step was in flight: after an attempt at that step began and before the
    step was committed (an aborted attempt's step is committed by its replay, later)."""
    attempts = sorted((a.time, a.step) for a in of_type(events, AttemptEvent) if a.time < notice.time)
    commits = {e.step: e.time for e in of_type(events, StepEvent)}
    return bool(attempts) and notice.time < commits.get(attempts[-1][1], float("inf"))


@pytest.mark.timeout(480)
def test_every_provider_hands_over_exactly(tmp_path: pathlib.Path) -> None:
    """``local --preempt``: stage 0 by a GCP notice, then block stages by AWS, Azure and SIGTERM notices, two
    stages at once and mid-step; each preempted node hands its stage over to the replacement started with the
    notice and exits 0 (a planned death in the summary), and the final weights equal the single-process run's."""
    # stages 1 and 3 get their notices at the same step, as soon as it
    # starts: the pipeline is mid-step. Nodes starting on this loaded 2-core machine may take longer than 30 s
    # and plan from a partial view of the DHT at first: hence a warm spare, notices 8 steps apart (each
    # notice's replacement warms up meanwhile), and 60 s windows for the pair, from Azure and a signal, whose
    # notices carry their window (GCP's is always 30 s)
    preempts = {0: (6, 30, "gcp"), 2: (14, 30, "aws"), 1: (22, 60, "azure"), 3: (22, 60, "signal")}
    flags = [f for stage, (step, t, p) in preempts.items() for f in ("--preempt", f"{stage}@{step}:{t}:{p}")]
    proc, summary = conftest.run_local(
        tmp_path, "--threads", "1", "--check-reference", "--spares", "1", *flags, stages=4, steps=30, timeout=440
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["reference_max_abs_diff"] == 0.0
    handoffs = {r["stage"]: r for r in summary["recoveries"]}
    assert sorted(handoffs) == sorted(preempts) and {r["method"] for r in handoffs.values()} == {"handoff"}
    for stage, r in handoffs.items():  # each handed over to the replacement within the notice
        assert r["step"] >= preempts[stage][0] - 1 and r["bytes_fetched"] > 0
        assert r["sources"] == [stage] and 0 < r["handoff_seconds"] < r["notice_seconds"], r
    # two stages preempted at once, and notices that arrived while a step was in flight, still give 0.0 above
    events = read_events(pathlib.Path(summary["workdir"]) / "events.jsonl")
    notices: dict[int | None, NoticeEvent] = {}
    for e in sorted(of_type(events, NoticeEvent), key=lambda e: e.time):
        notices.setdefault(e.stage, e)  # the first of each stage (the launcher's teardown SIGTERMs are notices too)
    assert set(notices) >= {1, 3}, notices
    assert abs(notices[1].time - notices[3].time) < 2.0  # the launcher raised both as step 22 started
    assert [s for s, n in notices.items() if _mid_step(events, n)], "no notice arrived mid-step"
    # each node left by itself, exit 0, before its window ended: the launcher killed none of them
    assert not [k for k in summary["kills"] if k.get("by") == "preempt"], summary["kills"]
    # (a node that leaves after training is done is no death to the summary: the early ones are listed)
    left = {d["stage"]: d for d in summary["deaths"] if d["cause"] == "handover"}
    assert set(left) >= {0, 2} and all(d["planned"] and d["exit_code"] == 0 for d in left.values()), left
    [azure] = [p for p in summary["preemptions"] if p["provider"] == "azure"]
    assert len(azure["acknowledged"]) == 1  # the node let the event proceed once it had handed over


@pytest.mark.timeout(300)
def test_a_notice_too_short_for_a_handover_parks_the_state_on_a_neighbour(tmp_path: pathlib.Path) -> None:
    """A 1 s notice and no warm spare: nobody can take the stage in time, so the node parks its exact state on
    a route neighbour and leaves; the replacement restores that copy (method ``handoff`` from the neighbour, 0
    steps stale), the neighbour drops it once the stage is served again, and the run equals the reference."""
    proc, summary = conftest.run_local(
        tmp_path, "--threads", "1", "--check-reference", "--preempt", "1@6:1:signal", stages=3, steps=16
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["reference_max_abs_diff"] == 0.0
    [recovery] = summary["recoveries"]
    assert (recovery["stage"], recovery["method"], recovery["stale_steps"]) == (1, "handoff", 0), recovery
    assert recovery["sources"] in ([0], [2]) and recovery["bytes_fetched"] > 0  # the neighbour it parked on
    [handed] = of_type(read_events(pathlib.Path(summary["workdir"]) / "events.jsonl"), HandedOverEvent)
    assert handed.to is None and [handed.parked_on] == recovery["sources"]
    # its successor serves stage 1: the neighbour's record (as the launcher read it at the end) keeps no copy
    assert [s["parked_stage"] for s in summary["stages"]] == [None] * 3, summary["stages"]


# slow: a notice with no time is a kill nothing saved; test_unplanned_death and test_recovery cover that rebuild
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_notice_with_no_time_falls_back_to_checkfree(tmp_path: pathlib.Path) -> None:
    """SIGTERM and at once SIGKILL: nothing can be handed over or parked, the replacement rebuilds the stage
    from its neighbours (method ``checkfree``), and the summary says the preemption caused it."""
    proc, summary = conftest.run_local(tmp_path, "--threads", "1", "--preempt", "2@6:0:signal", steps=16)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [recovery] = summary["recoveries"]
    assert (recovery["stage"], recovery["method"], recovery["killed_in"]) == (2, "checkfree", "preempt")
