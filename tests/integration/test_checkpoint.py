"""The checkpoint strategy: a lost stage rolls the whole swarm back to the newest common checkpoint.

Exactness is checked against the single-process reference: after a rollback the swarm replays the same
batches from the restored weights and AdamW moments, so its final weights must equal the reference's bit
for bit. Any part of the state not restored (a moment, the step counter, the data position) breaks that.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest

from node.checkpoint import CheckpointStore
from node.config import build_config
from node.events import Event, RecoveryEvent, RollbackEvent, StepEvent, of_type, read_events
from tests.conftest import run_local

pytestmark = pytest.mark.integration


def _events(tmp_path: pathlib.Path, workdir: str = "swarm") -> list[Event]:
    return read_events(tmp_path / workdir / "events.jsonl")


@pytest.mark.timeout(420)
def test_lost_stage_rolls_every_stage_back_to_the_checkpoint(tmp_path: pathlib.Path) -> None:
    ckpt = tmp_path / "ckpt"
    proc, summary = run_local(
        tmp_path,
        "--recovery", "checkpoint", "--checkpoint-every", "3", "--checkpoint-dir", str(ckpt),
        "--kill", "2@8:forward", "--check-reference",
        steps=9,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = _events(tmp_path)
    # stage 2 died in step 8 (7 committed, newest checkpoint 6); its replacement restored checkpoint 6
    [recovery] = of_type(events, RecoveryEvent)
    assert (recovery.stage, recovery.method, recovery.step) == (2, "checkpoint", 6)
    # every stage went back to 6, the survivors from 7
    rollbacks = {e.stage: (e.from_step, e.step) for e in of_type(events, RollbackEvent)}
    assert rollbacks == {0: (7, 6), 1: (7, 6), 2: (6, 6), 3: (7, 6)}
    assert [r["step"] for r in summary["rollbacks"]] == [6]
    # step 7 was trained twice, on the same batch from the same state: the same loss
    step7 = [e.loss for e in of_type(events, StepEvent) if e.step == 7]
    assert len(step7) == 2 and step7[0] == step7[1]
    # weights, moments and data position were all restored: the swarm ends exactly where one process does
    assert summary["reference_max_abs_diff"] == 0.0
    cfg = build_config(overrides={"num_stages": 4})
    for stage in range(4):
        store = CheckpointStore(ckpt, stage, cfg.fingerprint())
        assert store.steps()[-1] == 9
        store.load(9)  # verifies size and checksum
    assert summary["checkpoints"]["writes"] >= 4 * 3


# slow: test_snapshots resumes a whole swarm bit for bit; cut-short files are unit-tested
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_restart_resumes_and_never_loads_a_checkpoint_cut_short(tmp_path: pathlib.Path) -> None:
    ckpt = tmp_path / "ckpt"
    flags = ["--recovery", "checkpoint", "--checkpoint-every", "3", "--checkpoint-dir", str(ckpt)]
    first, _ = run_local(tmp_path / "first", *flags, steps=6)
    assert first.returncode == 0, first.stderr[-3000:]
    # stage 2's newest checkpoint is cut short, as by a crash of the storage mid-write
    cfg = build_config(overrides={"num_stages": 4})
    assert CheckpointStore(ckpt, 2, cfg.fingerprint()).steps() == [3, 6]
    cut = ckpt / "stage2" / "step-00000006.safetensors"
    cut.write_bytes(cut.read_bytes()[:1000])
    # the whole swarm restarts on the same storage and trains on to step 9: the same swarm, so the same
    # authority (another one's swarm secret would not verify these checkpoints' manifests)
    shutil.copytree(tmp_path / "first" / "swarm" / "keys", tmp_path / "second" / "swarm" / "keys")
    second, summary = run_local(tmp_path / "second", *flags, "--check-reference", steps=9)
    assert second.returncode == 0, second.stderr[-3000:]
    events = _events(tmp_path / "second")
    restored = {e.stage: e.step for e in of_type(events, RecoveryEvent)}
    assert restored == {0: 6, 1: 6, 2: 3, 3: 6}
    assert {e.stage: e.step for e in of_type(events, RollbackEvent)} == {0: 3, 1: 3, 2: 3, 3: 3}
    assert [e.step for e in of_type(events, StepEvent)] == list(range(4, 10))
    assert summary["reference_max_abs_diff"] == 0.0
