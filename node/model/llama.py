"""A LLaMA-style decoder, readable in one sitting, cut into pipeline stages.

Stage 0 holds the token embedding E, the final RMSNorm and the LM head E⁻¹ (so the loss is computed
where the data lives); block stages 1..S-1 each hold an equal run of transformer blocks. Parameters
are initialised per module from ``(seed, module key)``, so a stage built alone has exactly the weights
the same module has in the unsplit :class:`FullModel`.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from node.config import ModelConfig, SwarmConfig
from node.wire.quantize import as_received


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq_len, head_dim/2)."""
    head_dim = cfg.d_model // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (x[..., :h/2], x[..., h/2:]) of x: (batch, heads, seq, head_dim)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def init_module(module: nn.Module, cfg: ModelConfig, seed: int, key: str, n_layers: int) -> None:
    """Deterministic GPT-2 style init from (seed, key): normal(0, std) matrices, ones for norms,
    output projections scaled down by sqrt(2 * n_layers)."""
    gen = _generator(seed, key)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
                continue
            std = (
                cfg.init_std / math.sqrt(2 * n_layers)
                if name.endswith(("proj.weight", "down.weight"))
                else cfg.init_std
            )
            p.copy_(torch.randn(p.shape, generator=gen) * std)


class EmbeddingStage(nn.Module):
    """Stage 0: token embedding in, final norm + LM head + loss out."""

    def __init__(self, cfg: ModelConfig, seed: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_module(self, cfg, seed, "stage0", cfg.n_layers)

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embed(idx)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class BlockStage(nn.Module):
    """A run of consecutive transformer blocks (layer indices ``layers``)."""

    def __init__(self, cfg: ModelConfig, layers: range, seed: int) -> None:
        super().__init__()
        self.layers = layers
        self.blocks = nn.ModuleList(Block(cfg) for _ in layers)
        for i, block in zip(layers, self.blocks, strict=True):
            init_module(block, cfg, seed, f"block{i}", cfg.n_layers)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, self.cos, self.sin)
        return h


def build_stage(cfg: SwarmConfig, stage: int) -> nn.Module:
    """The module that pipeline stage ``stage`` owns, freshly initialised from the config's seed, or with
    ``cfg.init_from`` (an exported model) its slice of that model's weights."""
    module: nn.Module
    if stage == 0:
        module = EmbeddingStage(cfg.model, cfg.train.seed)
    else:
        module = BlockStage(cfg.model, cfg.stage_layers(stage), cfg.train.seed)
    if cfg.init_from is not None:
        from node.export.load import stage_from_export

        module.load_state_dict(stage_from_export(cfg, stage), strict=True)
    return module


class WireCrossing(torch.autograd.Function):
    """A stage boundary inside one process: the activation going forward and its gradient coming back each
    become what the next stage receives over a link of the swarm's ``wire_dtype`` (bf16 cast, int8 blocks)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, crossing) -> torch.Tensor:  # type: ignore[override]
        ctx.crossing = crossing
        return crossing(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.crossing(grad), None


class FullModel(nn.Module):
    """The unsplit model: every stage in one process, composed along a route (the reference). Between
    stages, activations and gradients lose what the swarm's ``wire_dtype`` loses on the wire."""

    def __init__(self, cfg: SwarmConfig) -> None:
        super().__init__()
        self.stages = nn.ModuleList(build_stage(cfg, s) for s in range(cfg.num_stages))
        lossy = cfg.wire_dtype not in (None, "float32")
        self.crossing = functools.partial(as_received, wire_dtype=cfg.wire_dtype) if lossy else None

    def cross(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.crossing is None else WireCrossing.apply(h, self.crossing)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, route: list[int] | None = None) -> torch.Tensor:
        """Loss of one microbatch; ``route`` lists the block stages in visiting order (default 1..S-1)."""
        order = route if route is not None else list(range(1, len(self.stages)))
        h = self.cross(self.stages[0].embed_tokens(idx))
        for s in order:
            h = self.cross(self.stages[s](h))
        return self.stages[0].loss(h, targets)
