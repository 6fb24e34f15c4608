"""Durable, verifiable per-stage checkpoints on (shared) storage.

Layout: ``<dir>/stage<i>/step-<N>.safetensors`` holds the stage's weights (``w.*``) and AdamW state
(``opt.*``) after committed step N; ``step-<N>.json`` is its manifest (size, SHA-256, step, data position,
config fingerprint). Both are written to a temporary name, fsynced and renamed, the manifest last, so a
checkpoint exists only once it is complete: a crash mid-write leaves at most a ``.tmp`` file, which is
ignored, and a payload that does not match its manifest (cut short, bit rot) is never loaded.

With the swarm secret (``secret``), every manifest also carries an HMAC-SHA256 over its other fields (the
payload's SHA-256 among them), keyed with a key derived from the secret for this purpose only. A store
with a secret never offers or loads a manifest whose HMAC is missing or wrong: whoever can write to the
shared storage but does not hold the secret can neither forge a checkpoint nor alter one (its step, data
position or learning-rate scale) nor bring one from another swarm. Without a secret, manifests are not
authenticated (an ``hmac`` field is then ignored).

A write that fails (a full disk, a file-size limit) leaves nothing behind: no ``.tmp`` file, and no payload
without its manifest.

The directory must outlive the machine that writes it (a shared volume, NFS or a mounted bucket): the
node that replaces a lost stage restores that stage's checkpoint from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import pathlib
import re
from collections.abc import Iterable, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load, save

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{8,})\.json$")
_KEY_LABEL = b"swarm-node checkpoint manifest hmac v1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


class CheckpointInfo(BaseModel):
    """The manifest of one checkpoint (written after its payload)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    stage: int = Field(ge=0)
    step: int = Field(ge=0)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    config_fingerprint: str
    data_position: int = Field(ge=0, description="samples of the training stream consumed before step+1")
    lr_scale: float = Field(gt=0)
    last_grad_norm: float = Field(ge=0)
    hmac: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="with the swarm secret")

    def signed_bytes(self) -> bytes:
        """What the HMAC covers: every other field, in a canonical encoding."""
        fields = self.model_dump(exclude={"hmac"})
        return _KEY_LABEL + b"\0" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def manifest_key(secret: bytes) -> bytes:
    """The key of manifest HMACs, derived from the swarm secret (which keys nothing else directly)."""
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


def manifest_hmac(key: bytes, info: CheckpointInfo) -> str:
    return hmac.new(key, info.signed_bytes(), hashlib.sha256).hexdigest()


def _fsync_dir(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    """``data`` at ``path``, complete or not at all: written to a temporary file, fsynced and renamed; the
    temporary file is removed when any of it fails (ENOSPC, EFBIG, EIO...)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class CheckpointStore:
    """Checkpoints of one stage under ``root/stage<i>``; keeps the newest ``keep``. With ``secret`` (the
    swarm secret) manifests are authenticated."""

    def __init__(
        self, root: pathlib.Path, stage: int, fingerprint: str, keep: int = 3, secret: bytes | None = None
    ) -> None:
        self.dir = pathlib.Path(root) / f"stage{stage}"
        self.stage = stage
        self.fingerprint = fingerprint
        self.keep = max(2, keep)  # the previous one must survive while the next is written
        self._key = manifest_key(secret) if secret is not None else None

    def _paths(self, step: int) -> tuple[pathlib.Path, pathlib.Path]:
        return self.dir / f"step-{step:08d}.safetensors", self.dir / f"step-{step:08d}.json"

    def write(
        self, step: int, tensors: Mapping[str, torch.Tensor], *, data_position: int, lr_scale: float, grad_norm: float
    ) -> int:
        """Writes the checkpoint of committed step ``step`` atomically; returns its size in bytes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        payload = save({k: v.contiguous() for k, v in tensors.items()}, {"stage": str(self.stage), "step": str(step)})
        data_path, manifest_path = self._paths(step)
        _write_atomically(data_path, payload)
        try:
            self._write_manifest(step, manifest_path, payload, data_position, lr_scale, grad_norm)
        except BaseException:
            self._remove(step)  # a payload without its manifest is no checkpoint, and must not fill the disk
            raise
        _fsync_dir(self.dir)
        self.prune()
        return len(payload)

    def _write_manifest(
        self,
        step: int,
        path: pathlib.Path,
        payload: bytes,
        data_position: int,
        lr_scale: float,
        grad_norm: float,
    ) -> None:
        info = CheckpointInfo(
            stage=self.stage,
            step=step,
            size=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            config_fingerprint=self.fingerprint,
            data_position=data_position,
            lr_scale=lr_scale,
            last_grad_norm=grad_norm,
        )
        if self._key is not None:
            info = info.model_copy(update={"hmac": manifest_hmac(self._key, info)})
        _write_atomically(path, info.model_dump_json().encode())

    def manifest(self, step: int) -> CheckpointInfo:
        data_path, manifest_path = self._paths(step)
        try:
            info = CheckpointInfo.model_validate_json(manifest_path.read_bytes())
        except FileNotFoundError:
            raise CheckpointError(f"stage {self.stage} has no checkpoint of step {step}") from None
        except (OSError, ValidationError) as err:
            raise CheckpointError(f"manifest {manifest_path} is unreadable: {err}") from None
        if self._key is not None:
            if info.hmac is None:
                raise CheckpointError(f"manifest {manifest_path} carries no HMAC; this swarm requires one")
            if not hmac.compare_digest(info.hmac, manifest_hmac(self._key, info)):
                raise CheckpointError(
                    f"manifest {manifest_path} fails its HMAC check (another swarm's secret, or altered)"
                )
        if info.stage != self.stage or info.step != step:
            raise CheckpointError(f"manifest {manifest_path} is of stage {info.stage} step {info.step}")
        if info.config_fingerprint != self.fingerprint:
            raise CheckpointError(f"checkpoint {data_path} was written by a differently configured swarm")
        try:
            size = data_path.stat().st_size
        except OSError:
            raise CheckpointError(f"checkpoint {data_path} is missing") from None
        if size != info.size:
            raise CheckpointError(f"checkpoint {data_path} is {size} bytes, its manifest says {info.size}")
        return info

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (manifest valid and payload of the right size), oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.iterdir():
            m = _NAME.match(path.name)
            if m is None:
                continue
            try:
                self.manifest(int(m.group(1)))
            except CheckpointError:
                continue
            found.append(int(m.group(1)))
        return sorted(found)

    def load(self, step: int) -> tuple[CheckpointInfo, dict[str, torch.Tensor]]:
        """The checkpoint of ``step``, verified against its manifest (size and SHA-256)."""
        info = self.manifest(step)
        data_path, _ = self._paths(step)
        payload = data_path.read_bytes()
        if len(payload) != info.size or hashlib.sha256(payload).hexdigest() != info.sha256:
            raise CheckpointError(f"checkpoint {data_path} does not match its manifest (cut short or corrupted)")
        try:
            return info, load(payload)
        except SafetensorError as err:
            raise CheckpointError(f"checkpoint {data_path} is not a valid safetensors file: {err}") from None

    def latest_loadable(self) -> tuple[CheckpointInfo, dict[str, torch.Tensor]] | None:
        """The newest checkpoint that verifies, skipping (and logging) broken ones; None when there is none."""
        for step in reversed(self.steps()):
            try:
                return self.load(step)
            except CheckpointError as err:
                logger.error("skipping checkpoint: %s", err)
        return None

    def discard_after(self, step: int) -> None:
        """Deletes checkpoints newer than ``step`` (after a rollback they belong to an abandoned future)."""
        for s in self.steps():
            if s > step:
                self._remove(s)

    def prune(self) -> None:
        for s in self.steps()[: -self.keep]:
            self._remove(s)

    def discard(self, step: int) -> None:
        """Deletes the checkpoint of ``step`` (found corrupt on load: it must stop being offered)."""
        self._remove(step)

    def _remove(self, step: int) -> None:
        for path in reversed(self._paths(step)):  # manifest first: the checkpoint stops existing at once
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def rollback_target(durable: Mapping[int, Iterable[int]], num_stages: int) -> int:
    """The newest committed step every stage has a durable checkpoint of (0: the seed's initial weights,
    which every stage can rebuild exactly). A pure function of ``stage -> checkpoint steps``."""
    common: set[int] | None = None
    for stage in range(num_stages):
        steps = set(durable.get(stage, ()))
        common = steps if common is None else common & steps
    return max((common or set()) | {0})
