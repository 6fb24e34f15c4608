"""``swarm-node export --initial-peers``: a member exports a live swarm mid-training (real processes, mutual
TLS, the real DHT). The export is one committed step of the whole model, equal to the single-process
reference at that step, and the swarm trains on."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest
from safetensors.torch import load_file

from node.local import node_argv
from node.security.keys import issue_node
from tests.conftest import REPO, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def export(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(node_argv("export", *args), cwd=REPO, capture_output=True, text=True, timeout=180, env=env)


# slow: test_export_local exports a swarm's model and loads it in transformers
@pytest.mark.slow
@pytest.mark.parametrize("running_swarm", [100_000], indirect=True)
def test_a_live_export_is_one_committed_step_of_the_reference(running_swarm, tmp_path: pathlib.Path) -> None:
    from node.data import load_corpus_for
    from node.dht.factory import make_dht
    from node.export.hf import to_hf
    from node.train.reference import train_reference

    swarm = running_swarm
    maddr = swarm.bootstrap_maddrs[0]
    status_keys = swarm.credentials("status").keys
    # an in-process DHT client reads the records in a moment (a `status` process would start a DHT each time)
    swarm.dht = make_dht(swarm.bootstrap_maddrs, None, swarm.own_credentials, client_mode=True)

    def training() -> list | None:
        records = swarm.swarm_records()
        online = sorted(r.stage for r in records if r.state == "online") == [0, 1, 2, 3]
        return records if online and min(r.committed_step for r in records) >= 5 else None

    records = wait_for(training, 180, "four online stages past step 5", interval=1)
    stage0 = next(r.grpc_address for r in records if r.stage == 0)
    exporter = tmp_path / "exporter"
    issue_node(swarm.workdir / "keys", "exporter", exporter)  # a member of the swarm, serving no stage
    out = tmp_path / "model"
    done = export("--out", str(out), "--initial-peers", maddr, "--swarm", "local", "--keys", str(exporter), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    reply = json.loads(done.stdout)
    step = reply["step"]
    assert step >= 5 and reply["source"].startswith("live swarm 'local'")

    def after() -> bool:  # fast: stage 0's view (status --peer), not a DHT client
        out = subprocess.run(node_argv("status", "--keys", str(status_keys), "--peer", stage0, "--json"), cwd=REPO,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        return out.returncode == 0 and min(s["committed_step"] for s in json.loads(out.stdout)["stages"]) > step

    wait_for(after, 60, "the swarm training on after the export", interval=1)

    cfg = swarm.opts.config
    ref = train_reference(cfg, load_corpus_for(cfg).train, step, threads=1)
    expected = to_hf(cfg, {s: ref.stage_state(s) for s in range(cfg.num_stages)})
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == expected.keys()
    worst = max(float((exported[k].float() - v.float()).abs().max()) for k, v in expected.items())
    assert worst == 0.0, f"the export differs from the reference at step {step} by {worst}"
    assert json.loads((out / "swarm_node.json").read_text())["step"] == step

