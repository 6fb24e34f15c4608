"""A stalled node is not a dead one: a real process stopped with SIGSTOP and resumed with SIGCONT, over mutual
TLS and a token-gated DHT, with a spare waiting to take over. (The replacement of a long stall, and the
fencing of the node that comes back, are unit-tested in test_authz.py; their end-to-end test is future work.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

from node.data import load_corpus
from node.events import DoneEvent, FencedEvent, RecoveryEvent, StepEvent, of_type
from node.local.launcher import LocalSwarm
from node.train.reference import train_reference
from tests.conftest import SWARM_STEPS, swarm_status, wait_for

pytestmark = pytest.mark.integration
STEPS = SWARM_STEPS


def _stall(swarm: LocalSwarm, stage: int, seconds: float) -> float:
    """SIGSTOPs the node of ``stage`` (its whole process group) for ``seconds``; returns when it resumed."""
    wait_for(lambda: len(of_type(swarm.read_events(), StepEvent)) >= 3, 180, "training to start")
    spare = swarm.start_stage(None)  # a spare, once the swarm trains (as local starts them)
    maddr, keys = swarm.bootstrap_maddrs[0], swarm.credentials("status").keys
    wait_for(
        lambda: any(r["pid"] == spare.proc.pid and r["state"] == "spare" for r in swarm_status(maddr, keys=keys)),
        120,
        "the spare to wait for a vacant stage",
    )
    group = swarm.stage_children[stage].proc.pid
    os.killpg(group, signal.SIGSTOP)
    time.sleep(seconds)
    os.killpg(group, signal.SIGCONT)
    return time.time()


@pytest.mark.timeout(300)
def test_a_short_stall_is_not_a_death(running_swarm: LocalSwarm) -> None:
    swarm = running_swarm
    _stall(swarm, 2, 0.5)
    wait_for(lambda: of_type(swarm.read_events(), DoneEvent), 240, "training to finish")
    events = swarm.read_events()
    assert of_type(events, RecoveryEvent) == [] and of_type(events, FencedEvent) == []
    reference = train_reference(swarm.opts.config, load_corpus(None).train, STEPS, threads=1)
    assert [e.loss for e in of_type(events, StepEvent)] == reference.losses  # nothing was rebuilt or replayed
