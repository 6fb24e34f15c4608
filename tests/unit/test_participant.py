"""The pipeline participant with a real block-stage runtime and a fake network: order, pushes, local commit."""

from __future__ import annotations

import asyncio
import pathlib
import threading
from types import SimpleNamespace

import pytest
import torch

from node.config import build_config
from node.events import EventLog
from node.metrics import StageMetrics
from node.options import TimingOptions
from node.proto import stage_pb2 as pb
from node.recovery.faults import FaultInjector
from node.stage.compute import Compute
from node.stage.participant import PipelineParticipant
from node.stage.runtime import Reject, StageRuntime, StepError, StepFailed
from node.stage.seat import Seat
from node.topology import route_for

CFG = build_config(overrides={"num_stages": 4, "train": {"microbatches_per_step": 3, "microbatch_size": 2,
                                                         "seq_len": 8}})  # fmt: skip


class FakePresence:
    def __init__(self) -> None:
        self.me = SimpleNamespace(peer_id="me")
        self.on_peer_lost: list = []


@pytest.fixture
def part():
    seat = Seat(1, StageRuntime(CFG, 1, torch.device("cpu")))
    compute = Compute()
    p = PipelineParticipant(
        seat, compute, FakePresence(), None, CFG, TimingOptions(step_timeout=5), StageMetrics(),
        FaultInjector([], EventLog(None), CFG.train.microbatches_per_step), asyncio.Event(),
    )  # fmt: skip
    p.sent = []

    async def send_tensor(rpc, target, meta, tensor, deadline, peer_id=""):
        p.sent.append((rpc, target, meta.microbatch, meta.hop, tensor))

    p.send_tensor = send_tensor
    yield p
    p.close()
    compute.close()


def meta(mb: int, step: int = 0, attempt: int = 1, hop: int = 1) -> pb.MicrobatchMeta:
    return pb.MicrobatchMeta(step=step, microbatch=mb, route=route_for(mb, 4), hop=hop, attempt=attempt)


def activation(seed: int) -> torch.Tensor:
    return torch.randn(2, 8, CFG.model.d_model, generator=torch.Generator().manual_seed(seed))


async def test_microbatches_are_computed_in_index_order_whatever_order_they_arrive_in(part) -> None:
    rt, order = part.seat.runtime, []
    forward = rt.forward

    def recording(mb, x):
        order.append(mb)
        return forward(mb, x)

    rt.forward = recording
    late = [asyncio.create_task(part.on_forward(meta(mb), activation(mb))) for mb in (2, 1)]
    await asyncio.sleep(0.05)
    assert order == []  # 1 and 2 wait for 0
    await part.on_forward(meta(0), activation(0))
    await asyncio.gather(*late)
    await asyncio.sleep(0.05)
    assert order == [0, 1, 2]
    assert sorted((rpc, target, mb, hop) for rpc, target, mb, hop, _ in part.sent) == [
        ("Forward", 2, mb, 2) for mb in range(3)
    ]


async def test_backward_then_prepare_commit_and_the_commit_hook(part) -> None:
    for mb in range(3):
        await part.on_forward(meta(mb), activation(mb))
    for mb in range(3):
        await part.on_backward(meta(mb, hop=1), torch.ones(2, 8, CFG.model.d_model))
    await asyncio.sleep(0.05)
    assert [(rpc, target) for rpc, target, *_ in part.sent[3:]] == [("Backward", 0)] * 3
    committed: list[int] = []
    part.after_commit.append(committed.append)
    norm_sq = await part.prepare(0, 1)
    assert norm_sq > 0
    before = {k: v.clone() for k, v in part.seat.runtime.committed_state().items()}
    assert await part.commit(0, 1, 0.5) == 1
    assert await part.commit(0, 1, 0.5) == 1  # idempotent: a retried commit applies nothing twice
    assert committed == [1] and part.committed_step == 1
    after = part.seat.runtime.committed_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


async def test_a_stale_attempt_is_refused_and_abort_discards_the_step(part) -> None:
    await part.on_forward(meta(0, attempt=5), activation(0))
    with pytest.raises(StepError) as err:
        await part.on_forward(meta(1, attempt=4), activation(1))
    assert err.value.reason == Reject.STALE_ATTEMPT
    await part.abort(0, 5)
    with pytest.raises(StepError) as err:
        await part.prepare(0, 5)
    assert err.value.reason == Reject.INCOMPLETE


async def test_install_serves_an_older_runtime_and_frees_the_order(part) -> None:
    older = StageRuntime(CFG, 1, torch.device("cpu"), committed_step=0)
    part.seat.runtime.committed_step = 3
    await part.install(older)
    assert part.seat.runtime is older and part.committed_step == 0
    await part.on_forward(meta(0), activation(0))  # step 0 runs again


async def test_a_push_that_cannot_be_delivered_fails_only_its_microbatch_on_stage0(part) -> None:
    part.inflight.start({0: torch.zeros(1), 1: torch.zeros(1)})

    async def failing(rpc, target, m, tensor, deadline, peer_id=""):
        raise StepFailed("no serving peer for stage 2")

    part.send_tensor = failing
    part.push(meta(1), activation(1), "Forward", 2)
    await asyncio.sleep(0.05)
    assert isinstance(part.inflight.pending[1].exception(), StepFailed)
    assert not part.inflight.pending[0].done()
    part.inflight.cancel_rest()


async def test_no_stage_yet_means_not_ready(part) -> None:
    part.seat.runtime = None
    with pytest.raises(StepError) as err:
        await part.on_forward(meta(0), activation(0))
    assert err.value.reason == Reject.NOT_READY


async def test_throughput_counts_compute_time_only_not_the_wait_behind_other_microbatches(part) -> None:
    import time

    rt = part.seat.runtime
    forward = rt.forward

    def slow_forward(mb, x):
        time.sleep(0.2)  # every microbatch takes 0.2 s on the compute thread
        return forward(mb, x)

    rt.forward = slow_forward
    # three microbatches arrive at once: the third waits 0.4 s in the compute thread's queue before it runs
    await asyncio.gather(*(part.on_forward(meta(mb), activation(mb)) for mb in range(3)))
    # the compute time (0.2 s), not the 0.2 / 0.4 / 0.6 s from submission (their average would be 0.31)
    assert 0.19 < part._ema_seconds["forward"] < 0.27


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="OS thread names are read from Linux /proc")
async def test_the_compute_thread_is_named_compute_at_os_level() -> None:
    """So that ``top -H`` and the pipeline benchmark's CPU accounting can tell torch's thread from the rest."""
    compute = Compute()
    try:
        tid = await compute.run(threading.get_native_id)
        assert pathlib.Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "compute"
        assert tid != threading.get_native_id()
    finally:
        compute.close()
