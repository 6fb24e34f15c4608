"""Checkpoint files: atomic, verified, never loaded when cut short; the rollback target is pure."""

from __future__ import annotations

import pathlib

import pytest
import torch

from node.checkpoint import CheckpointError, CheckpointStore, rollback_target
from node.recovery.planner import Method, plan_recovery


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w.weight": torch.full((64, 32), value), "opt.0.exp_avg": torch.full((64, 32), value / 2)}


def _write(store: CheckpointStore, step: int) -> None:
    store.write(step, _state(float(step)), data_position=step * 32, lr_scale=1.0, grad_norm=0.5)


def test_round_trip_keeps_tensors_and_manifest(tmp_path: pathlib.Path) -> None:
    store = CheckpointStore(tmp_path, 2, "fp")
    _write(store, 3)
    info, tensors = store.load(3)
    assert (info.stage, info.step, info.data_position, info.last_grad_norm) == (2, 3, 96, 0.5)
    assert torch.equal(tensors["w.weight"], _state(3.0)["w.weight"])
    assert torch.equal(tensors["opt.0.exp_avg"], _state(3.0)["opt.0.exp_avg"])
    assert store.steps() == [3]


def test_a_checkpoint_cut_short_is_never_loaded(tmp_path: pathlib.Path) -> None:
    store = CheckpointStore(tmp_path, 1, "fp")
    _write(store, 3)
    _write(store, 6)
    data = store.dir / "step-00000006.safetensors"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert store.steps() == [3]  # not offered as durable to a rollback
    with pytest.raises(CheckpointError, match="bytes"):
        store.load(6)
    info, tensors = store.latest_loadable()
    assert info.step == 3 and torch.equal(tensors["w.weight"], _state(3.0)["w.weight"])


def test_corrupt_payload_of_the_right_size_fails_the_checksum(tmp_path: pathlib.Path) -> None:
    store = CheckpointStore(tmp_path, 1, "fp")
    _write(store, 4)
    data = store.dir / "step-00000004.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        store.load(4)
    assert store.latest_loadable() is None
    # its size is right, so it is still listed until a load finds it corrupt and discards it (as a
    # rollback does): then stage 0's next rollback target skips it
    assert store.steps() == [4]
    store.discard(4)
    assert store.steps() == []


def test_an_interrupted_write_leaves_no_checkpoint(tmp_path: pathlib.Path) -> None:
    store = CheckpointStore(tmp_path, 0, "fp")
    _write(store, 2)
    # a crash mid-write: the payload's temporary file exists, its manifest does not
    (store.dir / "step-00000004.safetensors.tmp").write_bytes(b"partial")
    (store.dir / "step-00000005.safetensors").write_bytes(b"renamed but no manifest yet")
    assert store.steps() == [2]
    assert store.latest_loadable()[0].step == 2


def test_other_swarm_or_stage_is_refused(tmp_path: pathlib.Path) -> None:
    _write(CheckpointStore(tmp_path, 0, "fp-a"), 2)
    other = CheckpointStore(tmp_path, 0, "fp-b")
    assert other.steps() == []
    with pytest.raises(CheckpointError, match="differently configured"):
        other.load(2)


def test_keeps_the_newest_and_discards_after_a_rollback(tmp_path: pathlib.Path) -> None:
    store = CheckpointStore(tmp_path, 0, "fp", keep=3)
    for step in (1, 2, 3, 4, 5):
        _write(store, step)
    assert store.steps() == [3, 4, 5]
    store.discard_after(3)
    assert store.steps() == [3]
    assert not any(p.name.startswith("step-00000005") for p in store.dir.iterdir())


def test_rollback_target_is_newest_common_step() -> None:
    assert rollback_target({0: [3, 6, 9], 1: [3, 6, 9], 2: [3, 6]}, 3) == 6
    assert rollback_target({0: [6, 9], 1: [3, 6]}, 2) == 6
    assert rollback_target({0: [9], 1: [6]}, 2) == 0  # nothing in common: the seed's initial weights
    assert rollback_target({0: [3, 6]}, 2) == 0  # a stage without checkpoints
    assert rollback_target({}, 1) == 0


def test_planner_restores_checkpoints_for_every_stage() -> None:
    for stage in range(4):
        for committed in (0, 7):
            plan = plan_recovery(stage, 4, frozenset(range(4)) - {stage}, committed, "checkpoint")
            assert plan.method == Method.CHECKPOINT and plan.sources == ()
