"""Text generation from an exported model: a KV-cached forward over the model's own modules, and sampling.

:class:`CausalLM` holds stage 0 (embedding, final norm, LM head) and one :class:`~node.model.llama.BlockStage`
with every layer, loaded from an export (:func:`load_model`). Its :meth:`CausalLM.forward` runs the same
modules as training (RMSNorm, the fused qkv projection, :func:`~node.model.llama.apply_rotary`, SwiGLU), keeping
each layer's keys and values so that every new token costs one position, not the whole sequence again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node.config import ModelConfig, SwarmConfig
from node.model.llama import Block, BlockStage, EmbeddingStage, apply_rotary

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class CausalLM(nn.Module):
    """The whole model in one process, for inference: ``forward(idx, cache)`` returns logits."""

    def __init__(self, model: ModelConfig) -> None:
        super().__init__()
        self.config = model
        self.stage0 = EmbeddingStage(model, 0)
        self.blocks = BlockStage(model, range(model.n_layers), 0)

    @classmethod
    def from_stages(cls, cfg: SwarmConfig, stages: dict[int, dict[str, torch.Tensor]]) -> CausalLM:
        """The model of a swarm's stage state dicts (stage 0 and block stages 1..S-1)."""
        lm = cls(cfg.model)
        lm.stage0.load_state_dict(stages[0])
        merged = {}
        for s in range(1, cfg.num_stages):
            for j, layer in enumerate(cfg.stage_layers(s)):
                prefix = f"blocks.{j}."
                merged |= {
                    f"blocks.{layer}.{k[len(prefix) :]}": v for k, v in stages[s].items() if k.startswith(prefix)
                }
        lm.blocks.load_state_dict(merged)
        return lm

    def _attend(self, block: Block, x: torch.Tensor, pos: int, past: tuple[torch.Tensor, torch.Tensor] | None):
        attn = block.attn
        b, t, d = x.shape
        q, k, v = attn.qkv(x).view(b, t, 3, attn.n_heads, d // attn.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = self.blocks.cos[pos:], self.blocks.sin[pos:]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # several new positions after a cached prefix: causal within them, all of the prefix visible
            total = k.shape[2]
            mask = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(diagonal=total - t)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.proj(y.transpose(1, 2).reshape(b, t, d)), (k, v)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)`` of tokens ``idx`` at positions ``pos..``; with a ``cache`` (a list,
        filled on the first call) the keys and values of earlier positions are reused and extended."""
        if pos + idx.shape[1] > self.config.max_seq_len:
            raise ValueError(f"positions up to {pos + idx.shape[1]} exceed max_seq_len={self.config.max_seq_len}")
        h = self.stage0.embed_tokens(idx)
        for i, block in enumerate(self.blocks.blocks):
            past = cache[i] if cache is not None and i < len(cache) else None
            a, kv = self._attend(block, block.attn_norm(h), pos, past)
            h = h + a
            h = h + block.mlp(block.mlp_norm(h))
            if cache is not None:
                if i < len(cache):
                    cache[i] = kv
                else:
                    cache.append(kv)
        return self.stage0.head(self.stage0.norm(h))


def load_model(root: str | os.PathLike[str], device: str | torch.device = "cpu") -> CausalLM:
    """The model of an export directory (``swarm-node export``), in eval mode on ``device``."""
    from node.export.hf import from_hf
    from node.export.load import read_export_config, read_export_tensors

    model = read_export_config(root)
    tensors = read_export_tensors(root)
    cfg = SwarmConfig(model=model, num_stages=2, train={"seq_len": min(model.max_seq_len, 128)})
    lm = CausalLM.from_stages(cfg, {0: from_hf(cfg, tensors, 0), 1: from_hf(cfg, tensors, 1)})
    return lm.to(device).eval()


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn: greedy when ``temperature`` is 0, else from the tempered softmax restricted
    to the ``top_k`` most likely tokens and/or the smallest set holding ``top_p`` of the probability."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 200
    seed: int = 0


def next_token(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """One token id from the last position's ``logits`` (1-D)."""
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the first token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


@torch.no_grad()
def generate(
    lm: CausalLM, prompt: list[int], s: Sampling, eos: int | None = None, on_token: Callable[[int], Any] | None = None
) -> Iterator[int]:
    """Yields new token ids one at a time (streamed: each as soon as it is drawn), up to ``s.max_new_tokens``,
    ``eos`` or the model's context length. A pure function of the weights, the prompt and ``s`` (its seed)."""
    gen = torch.Generator().manual_seed(s.seed)
    device = next(lm.parameters()).device
    ids = list(prompt) or [eos if eos is not None else 10]  # an empty prompt starts from EOS (or a newline)
    ids = ids[-lm.config.max_seq_len :]
    cache: KVCache = []
    logits = lm(torch.tensor([ids], device=device), cache, 0)[0, -1]
    pos = len(ids)
    for _ in range(s.max_new_tokens):
        token = next_token(logits, s, gen)
        if eos is not None and token == eos:
            return
        yield token
        if pos >= lm.config.max_seq_len:
            return
        logits = lm(torch.tensor([[token]], device=device), cache, pos)[0, -1]
        pos += 1
