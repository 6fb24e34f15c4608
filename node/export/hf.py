"""Pure mappings between this project's stage tensors and a Hugging Face ``LlamaForCausalLM``.

Stage 0 holds ``embed.weight``, ``norm.weight`` and ``head.weight``; block stage ``s`` holds
``blocks.<j>.*`` for the global layers ``cfg.stage_layers(s)``. The fused ``attn.qkv.weight`` (rows q, k, v,
each head-major) splits into ``q_proj``/``k_proj``/``v_proj``. The rotary layout needs no permutation:
:func:`node.model.llama.apply_rotary` rotates the two halves of each head (HF's ``rotate_half``), not
interleaved pairs, and both use ``inv_freq = theta^(-2i/head_dim)``. The LM head is not tied to the embedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from node.config import ModelConfig, SwarmConfig

_BLOCK = {  # our per-block name -> HF's per-layer name (qkv is split separately)
    "attn_norm.weight": "input_layernorm.weight",
    "attn.proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_STAGE0 = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}


class ExportError(ValueError):
    """An exported model (or the stage weights to export) cannot be used: one line naming the problem."""


def hf_config(
    model: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The ``config.json`` of a ``LlamaForCausalLM`` equal to ``model``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.ffn_hidden,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_heads,
        "head_dim": model.d_model // model.n_heads,
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": model.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def model_config_from_hf(config: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of an exported ``config.json``; :class:`ExportError` when it is not a Llama
    this project can hold (grouped-query attention, biases, tied embeddings, RoPE scaling)."""
    if config.get("model_type") != "llama":
        raise ExportError(f"config.json: model_type {config.get('model_type')!r}, expected 'llama'")
    try:
        heads, kv = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or 0)
        d = int(config["hidden_size"])
        rope = config.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        unsupported = [
            what
            for what, bad in (
                ("grouped-query attention", kv not in (0, heads)),
                ("attention_bias", bool(config.get("attention_bias"))),
                ("mlp_bias", bool(config.get("mlp_bias"))),
                ("tie_word_embeddings", bool(config.get("tie_word_embeddings"))),
                ("rope scaling", rope.get("rope_type", "default") != "default" or config.get("rope_scaling")),
                ("head_dim", config.get("head_dim") not in (None, d // max(heads, 1))),
                ("hidden_act", config.get("hidden_act", "silu") != "silu"),
            )
            if bad
        ]
        if unsupported:
            raise ExportError(f"config.json: unsupported Llama variant ({', '.join(unsupported)})")
        return ModelConfig(
            vocab_size=int(config["vocab_size"]),
            d_model=d,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=heads,
            ffn_hidden=int(config["intermediate_size"]),
            max_seq_len=int(config["max_position_embeddings"]),
            rope_theta=theta,
            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except ExportError:
        raise
    except KeyError as err:
        raise ExportError(f"config.json: missing {err.args[0]!r}") from None
    except (TypeError, ValueError) as err:
        raise ExportError(f"config.json: {' '.join(str(err).split())[:200]}") from None


def model_difference(exported: ModelConfig, ours: ModelConfig) -> list[str]:
    """``field: exported X, this swarm Y`` for every differing model field (``init_std`` is ignored)."""
    a, b = exported.model_dump(), ours.model_dump()
    return [f"{k}: exported {a[k]!r}, this swarm {b[k]!r}" for k in a if k != "init_std" and a[k] != b[k]]


def to_hf(cfg: SwarmConfig, stages: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names and tensors of the whole model from every stage's state dict."""
    missing = [s for s in range(cfg.num_stages) if s not in stages]
    if missing:
        raise ExportError(f"no weights of stage(s) {', '.join(map(str, missing))}")
    d = cfg.model.d_model
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _STAGE0.items():
        out[theirs] = _take(stages[0], ours, 0)
    for s in range(1, cfg.num_stages):
        for j, layer in enumerate(cfg.stage_layers(s)):
            prefix, hf = f"blocks.{j}.", f"model.layers.{layer}."
            qkv = _take(stages[s], prefix + "attn.qkv.weight", s)
            if qkv.shape[0] != 3 * d:
                raise ExportError(f"stage {s}: {prefix}attn.qkv.weight has shape {tuple(qkv.shape)}")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv.split(d), strict=True):
                out[f"{hf}self_attn.{name}.weight"] = part.contiguous()
            for ours, theirs in _BLOCK.items():
                out[hf + theirs] = _take(stages[s], prefix + ours, s)
    return out


def from_hf(cfg: SwarmConfig, tensors: Mapping[str, torch.Tensor], stage: int) -> dict[str, torch.Tensor]:
    """Stage ``stage``'s state dict (our names) from Hugging Face tensors: the inverse of :func:`to_hf`."""
    if stage == 0:
        return {ours: _take_hf(tensors, theirs) for ours, theirs in _STAGE0.items()}
    out: dict[str, torch.Tensor] = {}
    for j, layer in enumerate(cfg.stage_layers(stage)):
        prefix, hf = f"blocks.{j}.", f"model.layers.{layer}."
        out[prefix + "attn.qkv.weight"] = torch.cat(
            [_take_hf(tensors, f"{hf}self_attn.{n}.weight") for n in ("q_proj", "k_proj", "v_proj")]
        )
        for ours, theirs in _BLOCK.items():
            out[prefix + ours] = _take_hf(tensors, hf + theirs)
    return out


def hf_names(cfg: SwarmConfig, stage: int) -> list[str]:
    """The Hugging Face tensor names that stage ``stage`` is built from (to read only its slice)."""
    if stage == 0:
        return list(_STAGE0.values())
    names = []
    for layer in cfg.stage_layers(stage):
        hf = f"model.layers.{layer}."
        names += [f"{hf}self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")]
        names += [hf + theirs for theirs in _BLOCK.values()]
    return names


def _take(state: Mapping[str, torch.Tensor], name: str, stage: int) -> torch.Tensor:
    try:
        return state[name].detach().to("cpu").contiguous()
    except KeyError:
        raise ExportError(f"stage {stage}'s weights have no {name!r} (saved by another model layout?)") from None


def _take_hf(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise ExportError(f"model.safetensors has no tensor {name!r}") from None
