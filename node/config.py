"""Model and training configuration: presets, config files and their validation.

Every stage of a swarm must run with the same :class:`SwarmConfig`; its :meth:`SwarmConfig.fingerprint`
is published in the DHT so that a daemon refuses neighbours configured differently.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import tomllib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message is one line naming the problem."""


class ModelConfig(BaseModel):
    """A LLaMA-style decoder: RMSNorm, rotary attention, SwiGLU MLP, no biases, byte-level vocab."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(256, ge=2, le=1 << 20)
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(6, ge=1)
    n_heads: int = Field(4, ge=1)
    ffn_hidden: int = Field(352, ge=8)
    max_seq_len: int = Field(128, ge=2)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension d_model/n_heads must be even for rotary embeddings")
        return self

    def num_parameters(self) -> int:
        """Parameters of the whole model (embedding, blocks, final norm and LM head)."""
        d, f = self.d_model, self.ffn_hidden
        block = 4 * d * d + 3 * d * f + 2 * d
        return 2 * self.vocab_size * d + self.n_layers * block + d


class TrainConfig(BaseModel):
    """How a step is formed and applied; identical on every stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int = Field(128, ge=2)
    microbatch_size: int = Field(8, ge=1)
    microbatches_per_step: int = Field(4, ge=1, le=4096)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, lt=1 << 62)


PRESETS: dict[str, dict[str, Any]] = {
    # Trains visibly on a 2-core CPU in minutes.
    "tiny": {"model": {}, "train": {}},
    "small": {
        "model": {"d_model": 512, "n_layers": 6, "n_heads": 8, "ffn_hidden": 1376, "max_seq_len": 512},
        "train": {"seq_len": 512, "microbatch_size": 8, "lr": 1e-3},
    },
    # The paper's medium model (~500M with a 32k vocabulary; byte-level here): 24 layers, d=1024.
    "medium": {
        "model": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "ffn_hidden": 2816, "max_seq_len": 1024},
        "train": {"seq_len": 1024, "microbatch_size": 4, "microbatches_per_step": 8, "lr": 3e-4},
    },
    # About 1B parameters, for GPUs.
    "1b": {
        "model": {"d_model": 2048, "n_layers": 18, "n_heads": 16, "ffn_hidden": 5632, "max_seq_len": 1024},
        "train": {"seq_len": 1024, "microbatch_size": 4, "microbatches_per_step": 8, "lr": 2e-4},
    },
}


LOCAL_FIELDS = frozenset({"data", "preset", "tokenizer", "init_from"})  # not hashed: paths differ per machine


class SwarmConfig(BaseModel):
    """Everything the stages of one swarm must agree on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "tiny"
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    num_stages: int = Field(4, ge=2, le=256)
    data: str | None = None  # path of the user's corpus; None = built-in
    # a Hugging Face tokenizer.json (None: byte-level); its vocabulary size is model.vocab_size, which is hashed
    tokenizer: str | None = None
    # an exported model (swarm-node export) whose weights replace the seed's initial ones (--init-from)
    init_from: str | None = None
    wire_dtype: Literal["float32", "bfloat16", "float16", "int8"] | None = None  # None: the activation's own dtype
    # CheckFree+: odd microbatches swap the first two and the last two block stages (changes the math, so
    # it is part of the config every stage must share).
    out_of_order: bool = False

    @model_validator(mode="after")
    def _fits(self) -> SwarmConfig:
        blocks = self.num_stages - 1
        if self.model.n_layers % blocks:
            raise ValueError(
                f"n_layers={self.model.n_layers} cannot be split evenly over {blocks} block stages "
                f"(num_stages={self.num_stages}: stage 0 holds the embedding and head)"
            )
        if self.out_of_order and self.num_stages < 5:
            raise ValueError(
                f"the out-of-order pipeline of checkfree+ needs at least 5 stages (4 block stages) so that the swaps "
                f"(1, 2) and (S-2, S-1) are disjoint; got num_stages={self.num_stages}"
            )
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.train.seq_len} exceeds max_seq_len={self.model.max_seq_len}")
        return self

    @property
    def layers_per_stage(self) -> int:
        return self.model.n_layers // (self.num_stages - 1)

    def stage_layers(self, stage: int) -> range:
        """Indices of the transformer blocks held by block stage ``stage`` (1..S-1); empty for stage 0."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} outside 0..{self.num_stages - 1}")
        if stage == 0:
            return range(0)
        k = self.layers_per_stage
        return range((stage - 1) * k, stage * k)

    def fingerprint(self) -> str:
        """Short hash of the fields that must match across stages (paths are not hashed: data, tokenizer and
        init_from may live in different places on different machines; the vocabulary size is hashed)."""
        payload = self.model_dump(exclude=LOCAL_FIELDS)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{where}: {first['msg']}"


def build_config(
    *,
    preset: str = "tiny",
    config_file: str | pathlib.Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> SwarmConfig:
    """Preset, then the config file (TOML or JSON, same shape as SwarmConfig), then explicit overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    raw: dict[str, Any] = _merge({"preset": preset}, PRESETS[preset])
    if config_file is not None:
        raw = _merge(raw, read_config_file(config_file))
    raw = _merge(raw, overrides or {})
    try:
        return SwarmConfig.model_validate(raw)
    except ValidationError as err:
        src = f"{config_file}: " if config_file is not None else ""
        raise ConfigError(f"{src}{_one_line(err)}") from None


def read_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """Reads a TOML (``.toml``) or JSON (``.json``) config file into a dict; errors are one line."""
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file does not exist") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read config file ({err.strerror})") from None
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{p}: config file must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{p}: not valid {p.suffix[1:].upper()} ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a table/object")
    return data
