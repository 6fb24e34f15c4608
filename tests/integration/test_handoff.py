"""A preempted stage hands its exact state over: real processes over mutual TLS and a token-gated DHT, a real
SIGTERM (as ``docker stop`` and systemd send it), a spare that takes the stage over with method ``handoff``,
and a run whose every loss equals the single-process reference's."""

from __future__ import annotations

import os
import signal

import pytest

from node.data import load_corpus
from node.events import (
    DoneEvent,
    FencedEvent,
    HandedOverEvent,
    NoticeEvent,
    RecoveryEvent,
    StepEvent,
    of_type,
)
from node.local.launcher import LocalSwarm
from node.train.reference import train_reference
from tests.conftest import swarm_status, wait_for

pytestmark = pytest.mark.integration
STEPS = 60  # the spare starts, the notice and the handover all happen well before the end


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


@pytest.mark.timeout(420)
@pytest.mark.parametrize("running_swarm", [STEPS], indirect=True, ids=[f"{STEPS}steps"])
@pytest.mark.parametrize("stage", [2, 0], ids=["block_stage", "stage0"])
def test_sigterm_hands_the_stage_over_exactly(running_swarm: LocalSwarm, stage: int) -> None:
    swarm = running_swarm
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
    # every step committed once, each with the reference's loss: the handover lost and changed nothing
    steps = of_type(events, StepEvent)
    assert [e.step for e in steps] == list(range(1, STEPS + 1))
    reference = train_reference(swarm.opts.config, load_corpus(None).train, STEPS, threads=1)
    assert [e.loss for e in steps] == reference.losses
