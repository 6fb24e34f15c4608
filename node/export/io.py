"""Writing exported models, and gathering a swarm's stage weights from saved files and snapshots.

An export directory holds ``config.json`` (a ``LlamaConfig``), ``model.safetensors`` (Hugging Face names),
``generation_config.json``, the tokenizer (``tokenizer.json`` and ``tokenizer_config.json``) and
``swarm_node.json`` (the committed step and the swarm configuration it came from).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any

import torch

from node.config import LOCAL_FIELDS, SwarmConfig
from node.export.hf import ExportError, hf_config, to_hf

log = logging.getLogger(__name__)
_STAGE_FILE = re.compile(r"^stage(\d+)\.safetensors$")


@dataclass
class StageWeights:
    """Every stage's committed weights at one step, with the configuration they belong to."""

    config: SwarmConfig
    step: int
    stages: dict[int, dict[str, torch.Tensor]]
    source: str


def write_export(out: str | os.PathLike[str], weights: StageWeights, tokenizer: Any) -> pathlib.Path:
    """Writes the Hugging Face directory of ``weights`` to ``out`` (created; files replaced)."""
    from safetensors.torch import save_file

    cfg = weights.config
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ExportError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.model.vocab_size}"
        )
    tensors = to_hf(cfg, weights.stages)
    root = pathlib.Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
        eos = tokenizer.eos_token_id
        _write_json(root / "config.json", hf_config(cfg.model, eos_token_id=eos))
        _write_json(
            root / "generation_config.json",
            {"do_sample": True, "temperature": 0.8, "top_k": 50, "max_new_tokens": 200, "eos_token_id": eos},
        )
        (root / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
        _write_json(
            root / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": cfg.model.max_seq_len,
                "clean_up_tokenization_spaces": False,
                **({"eos_token": "<|endoftext|>"} if eos is not None else {}),
            },
        )
        _write_json(
            root / "swarm_node.json",
            {
                "step": weights.step,
                "source": weights.source,
                "config": cfg.model_dump(mode="json", exclude=LOCAL_FIELDS),
            },
        )
        tmp = root / "model.safetensors.tmp"
        save_file(tensors, str(tmp), {"format": "pt", "step": str(weights.step)})
        os.replace(tmp, root / "model.safetensors")
    except OSError as err:
        raise ExportError(f"{root}: cannot write the export ({err.strerror or err})") from None
    log.info("exported step %d to %s (%d tensors)", weights.step, root, len(tensors))
    return root


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_stage_file(
    path: pathlib.Path, stage: int, step: int, grad_norm: float, state: dict[str, torch.Tensor], fingerprint: str
) -> None:
    """One stage's committed weights as ``--save-dir`` keeps them (``stage<i>.safetensors``, read back by
    :func:`from_save_dir`), with the stage, committed step, gradient norm and configuration fingerprint as
    metadata; written atomically (replicas of a stage save to one name)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"stage": str(stage), "committed_step": str(step), "grad_norm": repr(grad_norm),
            "config_fingerprint": fingerprint}  # fmt: skip
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), meta)
    os.replace(tmp, path)


# ---- gathering a swarm's weights from saved files ----------------------------------------------------
def from_save_dir(path: pathlib.Path, config: SwarmConfig | None) -> StageWeights:
    """Every ``stage<i>.safetensors`` of a ``--save-dir``: all at the same committed step, written by a swarm
    configured as ``config`` (the stage count comes from the files; the fingerprint is checked)."""
    from safetensors import SafetensorError, safe_open

    files = {int(m.group(1)): p for p in sorted(path.iterdir()) if (m := _STAGE_FILE.match(p.name))}
    if not files:
        raise ExportError(f"{path}: no stage<i>.safetensors files (a --save-dir) and no snapshot in it")
    num_stages = max(files) + 1
    missing = [s for s in range(num_stages) if s not in files]
    if missing:
        raise ExportError(f"{path}: stage file(s) missing for stage(s) {', '.join(map(str, missing))}")
    if config is None:
        raise ExportError(f"{path}: a --save-dir holds no configuration; pass the swarm's --preset/--config")
    config = config.model_copy(update={"num_stages": num_stages})
    try:
        config = SwarmConfig.model_validate(config.model_dump())
    except ValueError as err:
        raise ExportError(f"{path}: {num_stages} stage files do not fit this configuration ({_line(err)})") from None
    with contextlib.suppress(OSError, SafetensorError, ValueError):  # a checkfree+ swarm's files
        with safe_open(str(files[0]), framework="pt") as f:
            saved = (f.metadata() or {}).get("config_fingerprint")
        flipped = SwarmConfig.model_validate({**config.model_dump(), "out_of_order": not config.out_of_order})
        if saved is not None and saved != config.fingerprint() and saved == flipped.fingerprint():
            config = flipped
    stages, steps = {}, {}
    for stage, file in files.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                stages[stage] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        except (OSError, SafetensorError) as err:
            raise ExportError(f"{file}: not a readable safetensors file ({_line(err)})") from None
        fingerprint = meta.get("config_fingerprint")
        if fingerprint is not None and fingerprint != config.fingerprint():
            raise ExportError(
                f"{file} was saved by a swarm with another configuration (fingerprint {fingerprint}, this "
                f"configuration {config.fingerprint()}); pass that swarm's --preset/--config/--tokenizer"
            )
        steps[stage] = int(meta.get("committed_step", -1))
    if len(set(steps.values())) != 1:
        raise ExportError(f"{path}: the stage files are of different committed steps {steps}")
    return StageWeights(config, steps[0], stages, str(path))


def from_snapshot(url: str, endpoint: str | None = None, secret: bytes | None = None) -> StageWeights:
    """The newest complete whole-swarm snapshot at ``url`` (``--snapshot-to`` storage): every stage's weights
    of that one step, verified against the snapshot's manifests."""
    from node.checkpoint.snapshots import SnapshotError, _missing_part, read_manifest, snapshot_steps
    from node.checkpoint.store import CheckpointError, CheckpointStore
    from node.storage import StorageError, open_storage

    try:
        storage = open_storage(url, endpoint)
        steps = snapshot_steps(storage)
    except (OSError, StorageError) as err:
        raise ExportError(f"{url}: cannot read the snapshots ({_line(err)})") from None
    skipped = []
    for step in reversed(steps):
        try:
            manifest = read_manifest(storage, step, secret)
            config = SwarmConfig.model_validate({**manifest.config, "num_stages": manifest.num_stages})
        except (SnapshotError, ValueError) as err:
            skipped.append(f"step {step}: {_line(err)}")
            continue
        problem = _missing_part(storage, manifest, manifest.config_fingerprint, secret)
        if problem is not None:
            skipped.append(f"step {step}: {problem}")
            continue
        stages = {}
        try:
            for stage in range(manifest.num_stages):
                store = CheckpointStore(storage, stage, manifest.config_fingerprint, secret=secret)
                _, tensors = store.load(step)
                stages[stage] = {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}
        except (CheckpointError, OSError) as err:
            skipped.append(f"step {step}: {_line(err)}")
            continue
        for reason in skipped:
            log.warning("snapshot skipped: %s", reason)
        return StageWeights(config, step, stages, f"{url} (snapshot of step {step})")
    why = f" ({skipped[0]})" if skipped else ""
    raise ExportError(f"{url}: no complete snapshot{why}")


def is_snapshot(url: str) -> bool:
    """Whether ``url`` is (probably) ``--snapshot-to`` storage rather than a ``--save-dir``."""
    if "://" in url and not url.startswith("file://"):
        return True
    return (pathlib.Path(url.removeprefix("file://")) / "swarm").is_dir()


def _line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]
