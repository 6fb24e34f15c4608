"""Whole-swarm durability against a real S3-compatible server on loopback (moto): snapshot, kill every
process, resume on new processes exactly; bad storage fails at start-up in one line."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time

import pytest

from node.checkpoint import CheckpointError
from node.checkpoint.snapshots import find_snapshot, seal, snapshot_steps
from node.local import local_argv, node_argv
from node.local.objectstore import CREDENTIALS, create_bucket, local_s3
from node.storage import open_storage
from tests.conftest import REPO, kill_swarm
from tests.unit.test_snapshots import CFG, SECRET, _part, _snapshot

pytestmark = pytest.mark.integration
ENV = {**os.environ, **CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "swarm-snapshots"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in CREDENTIALS.items():  # this process reads the bucket too
        monkeypatch.setenv(name, value)
    with local_s3() as endpoint:
        create_bucket(endpoint, BUCKET)
        yield endpoint


@pytest.mark.timeout(600)
def test_new_processes_resume_from_the_newest_snapshot_bit_for_bit(tmp_path: pathlib.Path, s3: str) -> None:
    url = f"s3://{BUCKET}/run"
    storage = open_storage(url, s3)
    workdir = tmp_path / "swarm"  # the same swarm authority for both runs (manifests carry its HMAC)
    flags = ["--stages", "4", "--snapshot-to", url, "--snapshot-every", "4", "--storage-endpoint", s3]
    first = subprocess.Popen(
        local_argv(*flags, "--steps", "200", workdir=workdir, json_out=tmp_path / "first.json"),
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not [s for s in snapshot_steps(storage) if s >= 8]:
            assert first.poll() is None, f"the first swarm exited early: {first.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no snapshot of step 8 was sealed"
            time.sleep(0.5)
    finally:
        kill_swarm(first)
    sealed = snapshot_steps(storage)

    out = tmp_path / "second.json"
    second = subprocess.run(
        local_argv(*flags, "--resume", "--steps", "24", "--check-reference", workdir=workdir, json_out=out),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(out.read_text())
    resumed = summary["resumed"]
    assert resumed is not None and resumed["stages"] == [0, 1, 2, 3]
    # the newest complete snapshot: every sealed one is complete here, a later one may be torn by the kill
    assert resumed["step"] == max(sealed) and resumed["bytes"] > 0
    assert summary["steps"] == 24 - resumed["step"]
    # the resumed swarm's weights after step 24 equal one process training steps 1..24 from the seed
    assert summary["reference_max_abs_diff"] == 0.0
    # and it kept snapshotting: 24 is sealed too
    assert 24 in snapshot_steps(storage)


def _run_node(*flags: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = node_argv("run", "--stage", "1", "--num-stages", "4", "--insecure", *flags)
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_a_wrong_bucket_or_wrong_credentials_fail_at_start_in_one_line(s3: str) -> None:
    proc = _run_node("--snapshot-to", "s3://no-such-bucket/x", "--storage-endpoint", s3, env=ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no-such-bucket" in proc.stderr and "does not exist" in proc.stderr
    with local_s3(check_credentials=True) as strict:
        proc = _run_node("--snapshot-to", f"s3://{BUCKET}/x", "--storage-endpoint", strict, env=ENV)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "access denied" in proc.stderr and "credentials" in proc.stderr


def test_a_snapshot_interrupted_mid_write_is_skipped_on_s3(s3: str) -> None:
    storage = open_storage(f"s3://{BUCKET}/torn", s3)
    _snapshot(storage, 4)
    _part(storage, 0, 8)
    _part(storage, 1, 8)  # the swarm went before stage 2's part of step 8 was stored: step 8 is never sealed
    with pytest.raises(CheckpointError):
        seal(storage, 8, CFG, SECRET)
    _snapshot(storage, 12)
    torn = "stage2/step-00000012.safetensors"
    storage.put(torn, storage.get(torn)[:-100])  # and a sealed one loses the end of a part
    found, skipped = find_snapshot(storage, CFG, SECRET)
    assert found is not None and found.step == 4
    assert snapshot_steps(storage) == [4, 12] and len(skipped) == 1 and "stage 2" in skipped[0]
