"""Checkpoint files: atomic, verified, never loaded when cut short; the rollback target is pure."""

from __future__ import annotations

import errno
import hashlib
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from node.checkpoint import CheckpointError, CheckpointStore, rollback_target
from node.recovery.planner import Method, plan_recovery
from node.storage import backends


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


# ---- authenticated manifests (the swarm secret) --------------------------------------------------------
SECRET = b"s" * 32


def _tamper(store: CheckpointStore, step: int, new_step: int | None = None, **fields) -> None:
    """What someone with write access to the storage but without the secret can do: edit the manifest
    (and move it), keeping it consistent with the payload (the SHA-256 recomputed over the payload)."""
    path = store.dir / f"step-{step:08d}.json"
    manifest = json.loads(path.read_text())
    payload = (store.dir / f"step-{step:08d}.safetensors").read_bytes()
    manifest.update(fields, sha256=hashlib.sha256(payload).hexdigest())
    if new_step is not None:
        manifest["step"] = new_step
        (store.dir / f"step-{new_step:08d}.safetensors").write_bytes(payload)
        path = store.dir / f"step-{new_step:08d}.json"
    path.write_text(json.dumps(manifest))


def test_with_the_secret_manifests_carry_a_verified_hmac(tmp_path: pathlib.Path) -> None:
    store = CheckpointStore(tmp_path, 1, "fp", secret=SECRET)
    _write(store, 3)
    info, _ = store.load(3)
    assert info.hmac is not None and len(info.hmac) == 64
    assert CheckpointStore(tmp_path, 1, "fp").load(3)[0].step == 3  # no secret: not checked (as before)


@pytest.mark.parametrize(
    ("edit", "offered"),
    [
        (lambda s: _tamper(s, 3, lr_scale=100.0), []),
        (lambda s: _tamper(s, 3, data_position=0), []),
        (lambda s: _tamper(s, 3, new_step=9), [3]),  # a copy posing as a newer step
        (lambda s: _tamper(s, 3, hmac=None), []),
    ],
)
def test_a_tampered_manifest_is_never_offered_or_loaded(tmp_path: pathlib.Path, edit, offered) -> None:
    store = CheckpointStore(tmp_path, 1, "fp", secret=SECRET)
    _write(store, 3)
    edit(store)
    assert store.steps() == offered
    step = 9 if offered else 3
    with pytest.raises(CheckpointError, match="HMAC"):
        store.load(step)
    assert store.latest_loadable() is None or store.latest_loadable()[0].step == 3


def test_a_checkpoint_of_another_swarm_secret_or_without_one_is_refused(tmp_path: pathlib.Path) -> None:
    _write(CheckpointStore(tmp_path, 0, "fp", secret=b"other swarm".ljust(32)), 2)
    _write(CheckpointStore(tmp_path, 1, "fp"), 2)  # written without a secret
    for stage, why in ((0, "fails its HMAC check"), (1, "carries no HMAC")):
        store = CheckpointStore(tmp_path, stage, "fp", secret=SECRET)
        assert store.steps() == [] and store.latest_loadable() is None
        with pytest.raises(CheckpointError, match=why):
            store.load(2)


# ---- a full disk ----------------------------------------------------------------------------------------
_FULL_DISK_CHILD = r"""
import json, pathlib, resource, signal, sys
import torch
from node.checkpoint import CheckpointStore, BackgroundWriter
from node.metrics import StageMetrics

root = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
store, metrics, durable = CheckpointStore(root, 0, "fp", secret=b"k" * 32), StageMetrics(), []
small = {"w.a": torch.ones(1000)}
big = {"w.a": torch.ones(1 << 20)}  # 4 MiB: past the limit
out = {}
try:
    store.write(1, big, data_position=0, lr_scale=1.0, grad_norm=0.5)
except OSError as err:
    out["direct"] = err.errno
writer = BackgroundWriter(store, metrics, lambda step, s, n: durable.append(step))
writer.submit(2, small, data_position=2, lr_scale=1.0, grad_norm=0.5)
writer.submit(3, big, data_position=3, lr_scale=1.0, grad_norm=0.5)
writer.submit(4, small, data_position=4, lr_scale=1.0, grad_norm=0.5)
writer.close()
value = lambda r: metrics.registry.get_sample_value("swarm_node_checkpoint_writes_total", {"result": r})
out.update(steps=store.steps(), durable=durable, files=sorted(p.name for p in store.dir.iterdir()),
           ok=value("ok"), failed=value("failed"))
print(json.dumps(out))
"""


def test_a_full_disk_leaves_no_partial_file_and_the_writer_goes_on(tmp_path: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=pathlib.Path(__file__).parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["direct"] == errno.EFBIG
    assert out["steps"] == [2, 4] and out["durable"] == [2, 4]
    assert (out["ok"], out["failed"]) == (2.0, 1.0)
    assert not [name for name in out["files"] if name.endswith(".tmp") or "00000003" in name or "00000001" in name]
    assert "checkpoint of step 3 on stage 0 failed" in proc.stderr


def test_a_manifest_that_cannot_be_written_takes_its_payload_with_it(tmp_path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path, 0, "fp")
    _write(store, 2)
    real = backends.write_atomically

    def no_space_for_manifests(path: pathlib.Path, data: bytes) -> None:
        if path.suffix == ".json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(backends, "write_atomically", no_space_for_manifests)
    with pytest.raises(OSError, match="No space"):
        _write(store, 4)
    assert sorted(p.name for p in store.dir.iterdir()) == ["step-00000002.json", "step-00000002.safetensors"]
    assert store.steps() == [2]


def test_write_atomically_removes_its_temporary_file_when_the_write_fails(tmp_path, monkeypatch) -> None:
    def fsync_fails(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backends.os, "fsync", fsync_fails)
    with pytest.raises(OSError, match="No space"):
        backends.write_atomically(tmp_path / "x.safetensors", b"data")
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_with_a_non_finite_number_is_unreadable(tmp_path: pathlib.Path) -> None:
    store = CheckpointStore(tmp_path, 0, "fp")
    _write(store, 2)
    path = store.dir / "step-00000002.json"
    path.write_text(path.read_text().replace('"lr_scale":1.0', '"lr_scale":Infinity'))
    assert store.steps() == []
    with pytest.raises(CheckpointError, match="unreadable"):
        store.load(2)
