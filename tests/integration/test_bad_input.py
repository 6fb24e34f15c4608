"""Malformed messages to a live stage get a precise gRPC status and the swarm keeps training."""

from __future__ import annotations

import re
import urllib.request

import grpc
import pytest
import torch

from node.events import DoneEvent, StepEvent, of_type
from node.local.launcher import LocalSwarm
from node.proto import stage_pb2 as pb
from node.proto import stage_pb2_grpc
from node.security.keys import NodeCredentials
from node.security.tls import channel_credentials, target_name_options
from node.transport.channels import GRPC_OPTIONS
from node.wire.tensors import encode_stream
from tests.conftest import SWARM_STEPS, swarm_status, wait_for

pytestmark = pytest.mark.integration
STEPS = SWARM_STEPS


def rejected(metrics_port: int, reason: str) -> float:
    """``swarm_node_rejected_messages_total{reason=...}`` of the stage whose metrics are on ``metrics_port``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found = re.search(rf'^swarm_node_rejected_messages_total\{{reason="{reason}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def _send(stub, chunks) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.Forward(iter(chunks), timeout=20)
    return err.value


@pytest.mark.timeout(300)
def test_malformed_messages_are_rejected_while_training_continues(running_swarm: LocalSwarm) -> None:
    swarm = running_swarm
    maddr = swarm.bootstrap_maddrs[0]
    wait_for(lambda: len(of_type(swarm.read_events(), StepEvent)) >= 2, 180, "training to start")
    keys = swarm.workdir / "keys" / "nodes"
    records = swarm_status(maddr, keys=swarm.credentials("status").keys)
    assert sorted(r["stage"] for r in records) == [0, 1, 2, 3]
    assert {r["pid"] for r in records} == {c.proc.pid for c in swarm.stage_children.values()}
    stage2 = next(r for r in records if r["stage"] == 2)
    # an authenticated member that may send stage 2 activations: stage 1's node, with its own keys
    member = NodeCredentials.load(keys / "stage1")
    options = GRPC_OPTIONS + target_name_options(stage2["node"])
    channel = grpc.secure_channel(stage2["grpc_address"], channel_credentials(member), options=options)
    stub = stage_pb2_grpc.StageStub(channel)
    shape = (8, 128, 128)
    route = [0, 1, 2, 3, 0]

    def meta(step: int = 10**6, **kw) -> pb.MicrobatchMeta:
        return pb.MicrobatchMeta(
            **{"step": step, "microbatch": 0, "route": route, "hop": 2, "sender_stage": 1, "attempt": 1, **kw}
        )

    def stream(t: torch.Tensor, **kw) -> list[pb.TensorChunk]:
        # parsed back into messages: the stock generated stub (any protobuf client) must interoperate
        return [pb.TensorChunk.FromString(m) for m in encode_stream(meta(**kw), [("", t)])]

    cases = {
        "bad_shape": (stream(torch.zeros(8, 128, 64)), grpc.StatusCode.INVALID_ARGUMENT),
        # int64 of the same byte size as the fp32 activation: passes the size limit, fails the dtype check
        "bad_dtype": (stream(torch.zeros(8, 128, 64, dtype=torch.int64)), grpc.StatusCode.INVALID_ARGUMENT),
        "non_finite": (stream(torch.full(shape, float("nan"))), grpc.StatusCode.INVALID_ARGUMENT),
        "stale_step": (stream(torch.zeros(shape), step=0), grpc.StatusCode.FAILED_PRECONDITION),
        "unknown_step": (stream(torch.zeros(shape)), grpc.StatusCode.FAILED_PRECONDITION),
        "bad_route": (stream(torch.zeros(shape), route=[0, 2, 1, 3, 0]), grpc.StatusCode.INVALID_ARGUMENT),
        "oversize": (
            [
                pb.TensorChunk(
                    meta=meta(),
                    header=pb.TensorHeader(dtype=pb.DTYPE_FLOAT32, shape=[1 << 16, 1 << 16], nbytes=4 << 32),
                )
            ],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    }
    for reason, (chunks, code) in cases.items():
        err = _send(stub, chunks)
        assert err.code() == code, (reason, err.code(), err.details())
        assert err.details().startswith(reason), (reason, err.details())
    # a control call from a member that is not stage 0 is refused before it reaches the stage, and counted (the
    # count is read around the call: a neighbour's first push may have been refused while the swarm started)
    denied_before = rejected(stage2["metrics_port"], "permission_denied")
    with pytest.raises(grpc.RpcError) as info:
        stub.Rollback(pb.RollbackRequest(step=0, attempt=1 << 62), timeout=20)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    assert rejected(stage2["metrics_port"], "permission_denied") == denied_before + 1
    # and from stage 0, a rollback asked of a stage that keeps no checkpoints changes nothing
    stage0 = NodeCredentials.load(keys / "stage0")
    control = grpc.secure_channel(stage2["grpc_address"], channel_credentials(stage0), options=options)
    with pytest.raises(grpc.RpcError) as info:
        stage_pb2_grpc.StageStub(control).Rollback(pb.RollbackRequest(step=0, attempt=1 << 62), timeout=20)
    control.close()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("no_checkpoint"), info.value.details()
    # a single message above the channel limit never reaches the service
    big = pb.TensorChunk(meta=meta(), data=b"\0" * (5 << 20))
    err = _send(stub, [big])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()

    # the swarm trains to the end, with stage 2 still the same process
    wait_for(lambda: of_type(swarm.read_events(), DoneEvent), 240, "training to finish")
    steps = of_type(swarm.read_events(), StepEvent)
    assert [e.step for e in steps] == list(range(1, STEPS + 1))
    assert swarm.stage_children[2].proc.poll() is None
    for reason in [*cases, "no_checkpoint"]:
        assert rejected(stage2["metrics_port"], reason) == 1.0, reason
