"""node.export and node.inference: the Hugging Face mapping both ways, exports from saved files and snapshots,
--init-from, and KV-cached generation. Exactness is checked against transformers' LlamaForCausalLM."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the export is read from its local directory

from node.checkpoint.snapshots import seal
from node.checkpoint.store import CheckpointStore
from node.cli import main
from node.config import build_config
from node.data import ByteTokenizer
from node.export.hf import ExportError, from_hf, hf_config, model_config_from_hf, to_hf
from node.export.io import StageWeights, from_save_dir, from_snapshot, write_export
from node.inference import CausalLM, Sampling, generate, load_model
from node.model import FullModel, build_stage
from node.stage.runtime import StageRuntime

MODEL = {"d_model": 64, "n_layers": 4, "n_heads": 4, "ffn_hidden": 96, "max_seq_len": 32}
CFG = build_config(overrides={"num_stages": 3, "model": MODEL, "train": {"seq_len": 32, "seed": 3}})


def _trained_like(cfg=CFG) -> FullModel:
    """The seed's model with norms moved off 1 (so that a wrongly mapped norm shows in the logits)."""
    model = FullModel(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.2 if p.ndim == 1 else 0.01))
    return model


def _stages(model: FullModel) -> dict[int, dict[str, torch.Tensor]]:
    return {s: {k: v.detach().clone() for k, v in m.state_dict().items()} for s, m in enumerate(model.stages)}


def _logits(model: FullModel, idx: torch.Tensor) -> torch.Tensor:
    h = model.stages[0].embed_tokens(idx)
    for s in range(1, len(model.stages)):
        h = model.stages[s](h)
    return model.stages[0].head(model.stages[0].norm(h))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, FullModel]:
    model = _trained_like()
    out = tmp_path_factory.mktemp("export")
    write_export(out, StageWeights(CFG, 5, _stages(model), "test"), ByteTokenizer())
    return out, model


def test_mapping_round_trips_and_splits_qkv() -> None:
    model = _trained_like()
    stages = _stages(model)
    hf = to_hf(CFG, stages)
    assert "model.layers.3.self_attn.q_proj.weight" in hf and "lm_head.weight" in hf
    assert not any("qkv" in k for k in hf)
    assert len(hf) == 3 + 9 * MODEL["n_layers"]
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, stages[1]["blocks.0.attn.qkv.weight"][: MODEL["d_model"]])
    for s in range(CFG.num_stages):
        back = from_hf(CFG, hf, s)
        assert back.keys() == stages[s].keys()
        assert all(torch.equal(back[k], stages[s][k]) for k in back)


def test_config_maps_both_ways_and_refuses_other_llamas() -> None:
    hf = hf_config(CFG.model)
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["tie_word_embeddings"] is False
    assert model_config_from_hf(hf) == CFG.model
    with pytest.raises(ExportError, match="grouped-query attention"):
        model_config_from_hf({**hf, "num_key_value_heads": 2})
    with pytest.raises(ExportError, match="missing 'hidden_size'"):
        model_config_from_hf({k: v for k, v in hf.items() if k != "hidden_size"})


def test_transformers_loads_the_export_with_equal_logits(exported) -> None:
    from transformers import LlamaForCausalLM

    out, model = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    hf = LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(idx).logits - _logits(model, idx)).abs().max().item()
    assert diff < 1e-5, diff


def test_transformers_tokenizer_reads_the_byte_level_vocabulary(exported) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported[0], local_files_only=True)
    text = "naïve → 日本"
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode())


def test_kv_cache_matches_the_full_forward_and_generation_is_seeded(exported) -> None:
    out, model = exported
    lm = load_model(out)
    idx = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = lm(idx)
        assert (full - _logits(model, idx)).abs().max() < 1e-5
        cache: list = []
        parts = [lm(idx[:, :17], cache, 0), lm(idx[:, 17:25], cache, 17)]
        parts += [lm(idx[:, i : i + 1], cache, i) for i in range(25, 30)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    prompt = list(b"The fox")
    a = list(generate(lm, prompt, Sampling(temperature=1.0, top_k=20, max_new_tokens=12, seed=7)))
    b = list(generate(lm, prompt, Sampling(temperature=1.0, top_k=20, max_new_tokens=12, seed=7)))
    greedy = list(generate(lm, prompt, Sampling(temperature=0.0, max_new_tokens=12)))
    top1 = list(generate(lm, prompt, Sampling(temperature=1.0, top_k=1, max_new_tokens=12, seed=3)))
    nucleus = list(generate(lm, prompt, Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=12, seed=4)))
    assert a == b and len(a) == 12 and greedy == top1 == nucleus
    assert len(list(generate(lm, list(range(28)), Sampling(max_new_tokens=50)))) == 32 - 28 + 1  # context ends it


def test_generate_command_streams_text(exported, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["generate", "--model", str(exported[0]), "--prompt", "Hi", "--max-new-tokens", "5", "--seed", "1"]) == 0
    )
    assert capsys.readouterr().out.startswith("Hi")
    assert main(["generate", "--model", str(exported[0].parent / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("swarm-node: error: --model") and "\n" not in err


def _save_dir(tmp_path: pathlib.Path, model: FullModel, steps: tuple[int, ...] = (4, 4, 4)) -> pathlib.Path:
    d = tmp_path / "weights"
    d.mkdir(parents=True)
    for s, state in _stages(model).items():
        meta = {"stage": str(s), "committed_step": str(steps[s]), "config_fingerprint": CFG.fingerprint()}
        save_file(state, str(d / f"stage{s}.safetensors"), meta)
    return d


def test_export_from_a_save_dir_and_its_errors(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _trained_like()
    d = _save_dir(tmp_path, model)
    weights = from_save_dir(d, CFG.model_copy(update={"num_stages": 2}))
    assert weights.step == 4 and set(weights.stages) == {0, 1, 2}
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"model": MODEL, "train": {"seq_len": 32, "seed": 3}}))
    argv = ["export", "--from", str(d), "--config", str(cfg_file), "--out", str(tmp_path / "out"), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert torch.equal(load_model(tmp_path / "out").stage0.head.weight, model.stages[0].head.weight)
    # another configuration (the default tiny preset), stages of different steps, nothing to export
    assert main(["export", "--from", str(d), "--out", str(tmp_path / "x")]) == 2
    assert "another configuration" in capsys.readouterr().err
    d2 = _save_dir(tmp_path / "mixed", model, (4, 5, 4))
    with pytest.raises(ExportError, match="different committed steps"):
        from_save_dir(d2, CFG)
    assert main(["export", "--from", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no stage<i>.safetensors" in err and "\n" not in err


def test_export_from_the_newest_complete_snapshot(tmp_path: pathlib.Path) -> None:
    model = _trained_like()
    for step in (3, 6):
        for s, state in _stages(model).items():
            tensors = {f"w.{k}": v + step for k, v in state.items()} | {"opt.0.step": torch.tensor(1.0)}
            CheckpointStore(tmp_path, s, CFG.fingerprint(), keep=10).write(
                step, tensors, data_position=0, lr_scale=1.0, grad_norm=0.0
            )
        seal(open_storage_(tmp_path), step, CFG)
    (tmp_path / "stage2" / "step-00000006.safetensors").write_bytes(b"cut")  # the newest one is broken
    weights = from_snapshot(str(tmp_path))
    assert weights.step == 3 and weights.config == CFG.model_copy(update={"data": None})
    assert torch.equal(weights.stages[1]["blocks.0.attn.qkv.weight"], _stages(model)[1]["blocks.0.attn.qkv.weight"] + 3)
    assert main(["export", "--from", str(tmp_path), "--out", str(tmp_path / "out")]) == 0


def open_storage_(path: pathlib.Path):
    from node.storage import open_storage

    return open_storage(path)


def test_init_from_gives_each_stage_its_slice_and_refuses_another_config(exported) -> None:
    out, model = exported
    cfg = CFG.model_copy(update={"init_from": str(out)})
    for s in range(cfg.num_stages):
        got = build_stage(cfg, s).state_dict()
        assert all(torch.equal(got[k], v) for k, v in model.stages[s].state_dict().items())
    rt = StageRuntime(cfg, 1, torch.device("cpu"))
    assert rt.committed_step == 0 and not rt.optimizer.state  # a fresh optimizer
    # the fingerprint does not hash the path: every stage agrees wherever the export lives
    assert cfg.fingerprint() == CFG.fingerprint()
    wider = build_config(overrides={"num_stages": 3, "model": {**MODEL, "d_model": 128}, "train": {"seq_len": 32}})
    with pytest.raises(ExportError, match=r"d_model: exported 64, this swarm 128"):
        build_stage(wider.model_copy(update={"init_from": str(out)}), 1)


def test_init_from_flag_refuses_a_mismatch_in_one_line(exported, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--stage", "1", "--num-stages", "3", "--insecure", "--init-from", str(exported[0])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--init-from" in err and "d_model: exported 64, this swarm 128" in err and "\n" not in err


def test_causal_lm_from_stages_equals_the_swarm_model() -> None:
    model = _trained_like()
    lm = CausalLM.from_stages(CFG, _stages(model))
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(lm(idx), _logits(model, idx))


# ---- from a live swarm: choosing the configuration and the peers ------------------------------------------
def _record(stage, peer, cfg=CFG, state="online", step=7, epoch=1):
    from node.wire.records import StageRecord

    return StageRecord(
        stage=stage, num_stages=cfg.num_stages, peer_id=peer, grpc_address="127.0.0.1:1", state=state,
        committed_step=step, config_fingerprint=cfg.fingerprint(), version="0", epoch=epoch,
    )  # fmt: skip


def test_a_live_export_takes_the_configuration_the_swarm_runs_and_one_serving_peer_per_stage() -> None:
    from node.export.live import choose_peers, match_config

    flipped = CFG.model_copy(update={"out_of_order": not CFG.out_of_order})
    other = build_config(overrides={"num_stages": 3, "model": {**MODEL, "d_model": 32}, "train": {"seq_len": 32}})
    swarm = [_record(0, "a"), _record(1, "b"), _record(1, "b2", epoch=2), _record(2, "c")]
    swarm.append(_record(2, "r", state="recovering", epoch=3))  # a claim not serving yet
    assert match_config(swarm, [flipped, CFG]) is CFG
    with pytest.raises(ExportError, match="pass the swarm's --preset"):
        match_config(swarm, [other])
    with pytest.raises(ExportError, match="no stage of this swarm is serving"):
        match_config([_record(0, "a", state="recovering")], [CFG])
    peers = choose_peers(swarm, CFG)
    assert {s: p.peer_id for s, p in peers.items()} == {0: "a", 1: "b2", 2: "c"}  # the current claim of stage 1
    with pytest.raises(ExportError, match=r"stage\(s\) 2 have no serving peer"):
        choose_peers([r for r in swarm if r.stage != 2 or r.state != "online"], CFG)
