"""Reading an export directory back: its model configuration, its tensors, and one stage's slice of them
(``--init-from``). Imports nothing of the swarm beyond the configuration and the name mapping, so the model
can load its initial weights from here."""

from __future__ import annotations

import json
import os
import pathlib

import torch

from node.config import ModelConfig, SwarmConfig
from node.export.hf import ExportError, from_hf, hf_names, model_config_from_hf, model_difference


def read_export_config(root: str | os.PathLike[str]) -> ModelConfig:
    """The model configuration of an export directory; :class:`ExportError` when it is not one."""
    path = pathlib.Path(root) / "config.json"
    if not pathlib.Path(root).is_dir():
        raise ExportError(f"{root}: not a directory (an export made by swarm-node export)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing (is {root} an export made by swarm-node export?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: unreadable ({' '.join(str(err).split())[:160]})") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: not a JSON object")
    return model_config_from_hf(data)


def read_export_tensors(root: str | os.PathLike[str], names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of ``model.safetensors`` (only ``names`` when given), as float32."""
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(root) / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            wanted = names if names is not None else sorted(keys)
            missing = [n for n in wanted if n not in keys]
            if missing:
                raise ExportError(f"{path}: no tensor {missing[0]!r}")
            return {n: f.get_tensor(n).float() for n in wanted}
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except (OSError, SafetensorError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())[:160]})") from None


def check_init_from(cfg: SwarmConfig) -> None:
    """``--init-from``: the exported model's configuration must equal this swarm's (one line naming the
    difference otherwise)."""
    if cfg.init_from is None:
        return
    exported = read_export_config(cfg.init_from)
    diff = model_difference(exported, cfg.model)
    if diff:
        raise ExportError(
            f"--init-from {cfg.init_from}: the exported model differs from this swarm's ({'; '.join(diff)})"
        )


def stage_from_export(cfg: SwarmConfig, stage: int) -> dict[str, torch.Tensor]:
    """Stage ``stage``'s slice of the exported model at ``cfg.init_from`` (only its tensors are read), shaped
    and checked against this stage's module."""
    assert cfg.init_from is not None
    check_init_from(cfg)
    state = from_hf(cfg, read_export_tensors(cfg.init_from, hf_names(cfg, stage)), stage)
    return state
