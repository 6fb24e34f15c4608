"""The split model: stages composed in order are the unsplit model; deterministic init per module."""

import pytest
import torch

from node.config import ConfigError, build_config
from node.model import FullModel, build_stage
from node.model.llama import Block
from node.wire.quantize import as_received


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


@pytest.mark.parametrize("wire_dtype", ["int8", "bfloat16"])
def test_unsplit_model_loses_what_the_wire_loses_in_both_directions(wire_dtype: str) -> None:
    """FullModel with a lossy ``wire_dtype`` computes the loss and every gradient as stages exchanging
    activations forward and gradients backward through :func:`as_received` do (the swarm's path)."""
    cfg = build_config(overrides={"num_stages": 3, "wire_dtype": wire_dtype})
    full, stages = FullModel(cfg), [build_stage(cfg, s) for s in range(3)]
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    tgt = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    full(idx, tgt).backward()
    # the pipeline by hand: each stage gets a detached copy of what crossed, and sends back its input's grad
    outputs, inputs = [stages[0].embed_tokens(idx)], []
    for s in (1, 2):
        inputs.append(as_received(outputs[-1].detach(), wire_dtype).requires_grad_(True))
        outputs.append(stages[s](inputs[-1]))
    head_in = as_received(outputs[-1].detach(), wire_dtype).requires_grad_(True)
    split_loss = stages[0].loss(head_in, tgt)
    split_loss.backward()
    grad = head_in.grad
    for out, inp in zip(reversed(outputs[1:]), reversed(inputs), strict=True):
        out.backward(as_received(grad, wire_dtype))
        grad = inp.grad
    outputs[0].backward(as_received(grad, wire_dtype))
    assert torch.equal(split_loss, full(idx, tgt))
    for s in range(3):
        for (name, p1), p2 in zip(stages[s].named_parameters(), full.stages[s].parameters(), strict=True):
            assert torch.equal(p1.grad, p2.grad), (s, name)
    # and the wire does change something: the same model without the crossing differs
    plain = FullModel(build_config(overrides={"num_stages": 3}))
    assert not torch.equal(plain(idx, tgt), split_loss)
