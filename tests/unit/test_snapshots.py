"""Swarm snapshots: complete or absent, skipped with a reason when broken, refused for another config; the
planner resumes every stage from the same step."""

from __future__ import annotations

import pathlib

import pytest
import torch

from node.checkpoint import CheckpointStore
from node.checkpoint.snapshots import (
    SnapshotMismatch,
    config_difference,
    find_snapshot,
    read_manifest,
    seal,
    snapshot_steps,
)
from node.config import build_config
from node.recovery.planner import Method, plan_recovery
from node.storage import StorageError, open_storage
from node.storage.backends import LocalStorage

CFG = build_config(overrides={"num_stages": 3})
SECRET = b"s" * 32


def _part(storage, stage: int, step: int, config=CFG, secret=SECRET) -> CheckpointStore:
    store = CheckpointStore(storage, stage, config.fingerprint(), keep=10, secret=secret)
    tensors = {"w.weight": torch.full((8, 4), float(step + stage)), "opt.0.step": torch.tensor(float(step))}
    store.write(step, tensors, data_position=step * 16, lr_scale=1.0, grad_norm=0.25)
    return store


def _snapshot(storage, step: int, config=CFG, secret=SECRET) -> None:
    for stage in range(config.num_stages):
        _part(storage, stage, step, config, secret)
    seal(storage, step, config, secret)


def test_a_snapshot_exists_once_every_stage_part_is_durable(tmp_path: pathlib.Path) -> None:
    storage = open_storage(tmp_path)
    _snapshot(storage, 4)
    _part(storage, 0, 8)
    _part(storage, 1, 8)  # stage 2's part of step 8 never arrived: sealing it fails, nothing is written
    with pytest.raises(Exception, match="no checkpoint of step 8"):
        seal(storage, 8, CFG, SECRET)
    assert snapshot_steps(storage) == [4]
    found, skipped = find_snapshot(storage, CFG, SECRET)
    assert found is not None and found.step == 4 and skipped == []
    assert found.data_position == 4 * CFG.train.microbatches_per_step * CFG.train.microbatch_size
    assert set(found.parts) == {0, 1, 2} and found.nbytes > 0


def test_broken_snapshots_are_skipped_with_a_reason(tmp_path: pathlib.Path) -> None:
    storage = open_storage(tmp_path)
    for step in (4, 8, 12, 16):
        _snapshot(storage, step)
    # 16: a part cut short after sealing; 12: the manifest altered; 8: a part replaced by another write
    data = tmp_path / "stage1" / "step-00000016.safetensors"
    data.write_bytes(data.read_bytes()[:-10])
    manifest = tmp_path / "swarm" / "step-00000012.json"
    manifest.write_text(manifest.read_text().replace('"data_position":', '"data_position":1'))
    CheckpointStore(storage, 2, CFG.fingerprint(), keep=10, secret=SECRET).write(
        8, {"w.weight": torch.zeros(8, 4)}, data_position=0, lr_scale=1.0, grad_norm=0.0
    )
    found, skipped = find_snapshot(storage, CFG, SECRET)
    assert found is not None and found.step == 4
    assert len(skipped) == 3
    assert "step 16" in skipped[0] and "stage 1" in skipped[0]
    assert "step 12" in skipped[1] and "HMAC" in skipped[1]
    assert "step 8" in skipped[2] and "replaced" in skipped[2]


def test_another_swarms_secret_finds_nothing(tmp_path: pathlib.Path) -> None:
    storage = open_storage(tmp_path)
    _snapshot(storage, 4)
    found, skipped = find_snapshot(storage, CFG, b"o" * 32)
    assert found is None and "HMAC" in skipped[0]
    assert read_manifest(storage, 4, SECRET).step == 4


def test_a_snapshot_of_another_configuration_is_refused_naming_the_difference(tmp_path: pathlib.Path) -> None:
    storage = open_storage(tmp_path)
    _snapshot(storage, 4)
    other = build_config(overrides={"num_stages": 3, "train": {"lr": CFG.train.lr * 2}})
    with pytest.raises(SnapshotMismatch, match=r"train\.lr: snapshot"):
        find_snapshot(storage, other, SECRET)
    assert config_difference({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ["a.c: snapshot 2, this node 3"]


def test_no_snapshot_at_all(tmp_path: pathlib.Path) -> None:
    assert find_snapshot(open_storage(tmp_path / "empty"), CFG) == (None, [])


def test_resume_plan_takes_the_snapshot_until_the_swarm_moves_past_it() -> None:
    live = frozenset({0, 2})
    for committed in (0, 40):
        plan = plan_recovery(1, 3, live, committed, resume_step=40)
        assert plan.method == Method.RESUME and "step 40" in plan.reason
    assert plan_recovery(2, 4, frozenset({0, 1, 3}), 41, resume_step=40).method == Method.CHECKFREE
    assert plan_recovery(1, 3, live, 0).method == Method.FRESH
    # a handover in progress is exact and fresher than any snapshot
    assert plan_recovery(1, 3, live, 40, resume_step=40, handing_over=frozenset({1})).method == Method.HANDOFF


def test_local_storage_urls_and_check(tmp_path: pathlib.Path) -> None:
    for url in (tmp_path / "a", f"file://{tmp_path}/b", str(tmp_path / "c")):
        storage = open_storage(url)
        assert isinstance(storage, LocalStorage)
        storage.check()
        storage.put("x/y.bin", b"123")
        assert (storage.get("x/y.bin"), storage.size("x/y.bin"), storage.list("x")) == (b"123", 3, ["y.bin"])
        storage.delete("x/y.bin")
        storage.delete("x/y.bin")  # missing is fine
        assert storage.size("x/y.bin") is None and storage.list("x") == [] and storage.list("nothing") == []
    (tmp_path / "a-file").write_bytes(b"")  # not a directory (and root may write anywhere else)
    with pytest.raises(StorageError, match="a-file"):
        open_storage(tmp_path / "a-file" / "sub").check()
    with pytest.raises(StorageError, match="no storage backend"):
        open_storage("nosuchprotocol://bucket/x")
