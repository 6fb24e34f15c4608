"""A stalled node is not a dead one, and a node declared dead that comes back is fenced: a real process stopped
with SIGSTOP and resumed with SIGCONT, over mutual TLS and a token-gated DHT, with a spare waiting to take over."""

from __future__ import annotations

import os
import signal
import time

import pytest

from node.data import load_corpus
from node.events import DoneEvent, FencedEvent, RecoveryEvent, StepEvent, of_type
from node.local.launcher import LocalSwarm
from node.train.reference import train_reference
from tests.conftest import swarm_status, wait_for

pytestmark = pytest.mark.integration


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


LONG_RUN = 80  # steps: the spare starts (slowly, on a loaded machine), the stall and what follows, well before the end


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("running_swarm", [LONG_RUN], indirect=True, ids=[f"{LONG_RUN}steps"])
def test_a_short_stall_is_not_a_death(running_swarm: LocalSwarm) -> None:
    swarm = running_swarm
    _stall(swarm, 2, 0.5)
    assert not of_type(swarm.read_events(), DoneEvent), "the swarm finished before the stall (raise LONG_RUN)"
    wait_for(lambda: of_type(swarm.read_events(), DoneEvent), 300, "training to finish")
    events = swarm.read_events()
    assert of_type(events, RecoveryEvent) == [] and of_type(events, FencedEvent) == []
    reference = train_reference(swarm.opts.config, load_corpus(None).train, LONG_RUN, threads=1)
    assert [e.loss for e in of_type(events, StepEvent)] == reference.losses  # nothing was rebuilt or replayed


# slow: a stalled owner yielding to a claim is unit-tested (test_presence); test_recovery covers the rebuild
@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("running_swarm", [LONG_RUN], indirect=True, ids=[f"{LONG_RUN}steps"])
def test_a_long_stall_is_one_recovery_and_the_returning_owner_is_fenced(running_swarm: LocalSwarm) -> None:
    swarm = running_swarm
    stalled = swarm.stage_children[2].proc.pid
    resumed = _stall(swarm, 2, 5.0)
    assert not of_type(swarm.read_events(), DoneEvent), "the swarm finished before the stall (raise LONG_RUN)"
    [fence] = wait_for(lambda: of_type(swarm.read_events(), FencedEvent), 60, "the returning owner to be fenced")
    wait_for(lambda: of_type(swarm.read_events(), DoneEvent), 300, "training to finish")
    events = swarm.read_events()
    [recovery] = of_type(events, RecoveryEvent)  # exactly one: the spare took stage 2
    assert recovery.stage == 2 and recovery.pid != stalled and recovery.method == "checkfree"
    assert (fence.stage, fence.pid, fence.by_epoch > fence.epoch) == (2, stalled, True)
    refresh = swarm.opts.timing.refresh_seconds
    assert fence.time - resumed < 2 * refresh + 1.0, fence.time - resumed  # its first DHT reads after SIGCONT
    # every step committed exactly once, in order (the rebuilt stage changes the losses after the recovery)
    assert [e.step for e in of_type(events, StepEvent)] == list(range(1, LONG_RUN + 1))
    assert swarm.stage_children[2].proc.poll() is None  # the old process lives on, as a spare
