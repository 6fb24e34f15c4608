"""A stage's runtime rebuilt from one of its checkpoints (the daemon's rollback and the bench share it)."""

from __future__ import annotations

import torch

from node.checkpoint.store import CheckpointInfo
from node.config import SwarmConfig
from node.stage.runtime import StageRuntime


def restore_runtime(
    cfg: SwarmConfig, stage: int, device: torch.device, found: tuple[CheckpointInfo, dict[str, torch.Tensor]] | None
) -> StageRuntime:
    """The runtime of ``stage`` at the checkpoint ``found`` (weights, AdamW state, step, lr scale, gradient
    norm); ``None`` is committed step 0, the seed's initial weights."""
    if found is None:
        return StageRuntime(cfg, stage, device)
    info, tensors = found
    rt = StageRuntime(
        cfg, stage, device, lr_scale=info.lr_scale, committed_step=info.step, last_grad_norm=info.last_grad_norm
    )
    rt.load_full_state(tensors)
    return rt
