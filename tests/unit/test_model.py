"""The split model: stages composed in order are the unsplit model; deterministic init per module."""

import pytest
import torch

from node.config import ConfigError, build_config
from node.model import FullModel, build_stage
from node.model.llama import Block


@pytest.mark.parametrize("num_stages", [2, 3, 4, 7])
def test_stages_composed_equal_unsplit_model(num_stages: int) -> None:
    cfg = build_config(overrides={"num_stages": num_stages, "model": {"n_layers": 6}})
    full = FullModel(cfg)
    stages = [build_stage(cfg, s) for s in range(num_stages)]
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    h = stages[0].embed_tokens(idx)
    for s in range(1, num_stages):
        h = stages[s](h)
    split_loss = stages[0].loss(h, tgt)
    assert torch.equal(split_loss, full(idx, tgt))
    # the same module has the same weights whether built alone or inside the full model
    for s in range(num_stages):
        for (n1, p1), (n2, p2) in zip(stages[s].state_dict().items(), full.stages[s].state_dict().items(), strict=True):
            assert n1 == n2 and torch.equal(p1, p2)


def test_unsplit_model_matches_plain_block_stack() -> None:
    """The composition is the model: a hand-rolled loop over blocks gives the same logits path."""
    cfg = build_config(overrides={"num_stages": 4})
    full = FullModel(cfg)
    idx = torch.randint(0, 256, (1, 16))
    blocks: list[Block] = [b for s in range(1, 4) for b in full.stages[s].blocks]
    assert len(blocks) == cfg.model.n_layers
    h = full.stages[0].embed_tokens(idx)
    for b in blocks:
        h = b(h, full.stages[1].cos, full.stages[1].sin)
    assert torch.allclose(full.stages[0].loss(h, idx), full(idx, idx))


def test_causal_attention_ignores_future_tokens() -> None:
    cfg = build_config()
    model = FullModel(cfg)
    a = torch.randint(0, 256, (1, 20))
    b = a.clone()
    b[0, 15:] = (b[0, 15:] + 7) % 256
    ha, hb = model.stages[0].embed_tokens(a), model.stages[0].embed_tokens(b)
    for s in range(1, cfg.num_stages):
        ha, hb = model.stages[s](ha), model.stages[s](hb)
    assert torch.allclose(ha[0, :15], hb[0, :15], atol=1e-6)
    assert not torch.allclose(ha[0, 15:], hb[0, 15:])


def test_no_biases_and_param_count() -> None:
    cfg = build_config()
    model = FullModel(cfg)
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == cfg.model.num_parameters()


def test_uneven_split_is_refused_with_a_clear_message() -> None:
    with pytest.raises(ConfigError, match="cannot be split evenly over 4 block stages"):
        build_config(overrides={"num_stages": 5})
