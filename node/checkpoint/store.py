"""Durable, verifiable per-stage checkpoints on (shared) storage.

Layout, on any :mod:`node.storage` (a directory or object storage): ``stage<i>/step-<N>.safetensors`` holds
the stage's weights (``w.*``) and AdamW state (``opt.*``) after committed step N; ``step-<N>.json`` is its
manifest (size, SHA-256, step, data position, config fingerprint). Each is stored atomically, the manifest
last, so a checkpoint exists only once it is complete: a crash mid-write leaves at most a payload without
a manifest (or a local ``.tmp`` file), which is ignored, and a payload that does not match its manifest
(cut short, bit rot) is never loaded.

With the swarm secret (``secret``), every manifest also carries an HMAC-SHA256 over its other fields (the
payload's SHA-256 among them), keyed with a key derived from the secret for this purpose only. A store
with a secret never offers or loads a manifest whose HMAC is missing or wrong: whoever can write to the
shared storage but does not hold the secret can neither forge a checkpoint nor alter one (its step, data
position or learning-rate scale) nor bring one from another swarm. Without a secret, manifests are not
authenticated (an ``hmac`` field is then ignored).

A write that fails (a full disk, a file-size limit) leaves nothing behind: no ``.tmp`` file, and no payload
without its manifest.

The storage must outlive the machine that writes it (object storage, a shared volume, NFS): the node that
replaces a lost stage restores that stage's checkpoint from it.
"""

from __future__ import annotations

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

from node.storage import Storage, open_storage
from node.storage.backends import LocalStorage

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


class CheckpointStore:
    """Checkpoints of one stage under ``stage<i>/`` of ``storage`` (a :class:`~node.storage.Storage`, or a
    directory path); keeps the newest ``keep``. With ``secret`` (the swarm secret) manifests are
    authenticated."""

    def __init__(
        self,
        storage: Storage | str | os.PathLike[str],
        stage: int,
        fingerprint: str,
        keep: int = 3,
        secret: bytes | None = None,
    ) -> None:
        self.storage = storage if hasattr(storage, "put") else open_storage(storage)  # type: ignore[arg-type]
        self.prefix = f"stage{stage}"
        self.stage = stage
        self.fingerprint = fingerprint
        self.keep = max(2, keep)  # the previous one must survive while the next is written
        self._key = manifest_key(secret) if secret is not None else None

    @property
    def dir(self) -> pathlib.Path:
        """The stage's directory, on local storage (tests look inside it)."""
        assert isinstance(self.storage, LocalStorage), "only local storage has a directory"
        return self.storage.path(self.prefix)

    def _keys(self, step: int) -> tuple[str, str]:
        return f"{self.prefix}/step-{step:08d}.safetensors", f"{self.prefix}/step-{step:08d}.json"

    def write(
        self, step: int, tensors: Mapping[str, torch.Tensor], *, data_position: int, lr_scale: float, grad_norm: float
    ) -> int:
        """Writes the checkpoint of committed step ``step`` atomically; returns its size in bytes."""
        payload = save({k: v.contiguous() for k, v in tensors.items()}, {"stage": str(self.stage), "step": str(step)})
        data_key, manifest_key_ = self._keys(step)
        self.storage.put(data_key, payload)
        try:
            self._write_manifest(step, manifest_key_, payload, data_position, lr_scale, grad_norm)
        except BaseException:
            self._remove(step)  # a payload without its manifest is no checkpoint, and must not fill the disk
            raise
        self.prune()
        return len(payload)

    def _write_manifest(
        self,
        step: int,
        key: str,
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
        self.storage.put(key, info.model_dump_json().encode())

    def manifest(self, step: int) -> CheckpointInfo:
        data_path, manifest_path = self._keys(step)
        try:
            info = CheckpointInfo.model_validate_json(self.storage.get(manifest_path))
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
            size = self.storage.size(data_path)
        except OSError as err:
            raise CheckpointError(f"checkpoint {data_path} is unreadable: {err}") from None
        if size is None:
            raise CheckpointError(f"checkpoint {data_path} is missing")
        if size != info.size:
            raise CheckpointError(f"checkpoint {data_path} is {size} bytes, its manifest says {info.size}")
        return info

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (manifest valid and payload of the right size), oldest first."""
        found = []
        for name in self.storage.list(self.prefix):
            m = _NAME.match(name)
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
        data_path, _ = self._keys(step)
        try:
            payload = self.storage.get(data_path)
        except OSError as err:
            raise CheckpointError(f"checkpoint {data_path} is unreadable: {err}") from None
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
        for key in reversed(self._keys(step)):  # manifest first: the checkpoint stops existing at once
            self.storage.delete(key)


def rollback_target(durable: Mapping[int, Iterable[int]], num_stages: int) -> int:
    """The newest committed step every stage has a durable checkpoint of (0: the seed's initial weights,
    which every stage can rebuild exactly). A pure function of ``stage -> checkpoint steps``."""
    common: set[int] | None = None
    for stage in range(num_stages):
        steps = set(durable.get(stage, ()))
        common = steps if common is None else common & steps
    return max((common or set()) | {0})
