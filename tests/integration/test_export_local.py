"""``swarm-node local --export DIR --sample PROMPT``: a new user trains on a laptop, then uses the model."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from tests.conftest import run_local

pytestmark = pytest.mark.integration


@pytest.mark.timeout(330)
def test_local_run_exports_a_model_transformers_loads(tmp_path: pathlib.Path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    out = tmp_path / "model"
    proc, summary = run_local(
        tmp_path, "--check-reference", "--microbatches", "2", "--microbatch-size", "4", "--export", str(out),
        "--sample", "The fox", stages=2, steps=3, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary is not None and summary["reference_max_abs_diff"] < 1e-4  # the exported step is the reference's
    assert "The fox" in proc.stdout  # the sample, streamed to stdout (--quiet hides the rest)
    assert (out / "swarm_node.json").read_text().count('"step": 3') == 1

    from transformers import LlamaForCausalLM

    from node.inference import load_model

    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(idx).logits - load_model(out)(idx)).abs().max() < 1e-5
