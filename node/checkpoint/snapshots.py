"""Whole-swarm snapshots (``--snapshot-to``) and resuming from them (``--resume``).

CheckFree rebuilds one lost stage from its neighbours; when every node goes at once (a zone's spot capacity
reclaimed) nothing is left to rebuild from. So every ``--snapshot-every`` committed steps every stage writes
its exact state of that step (weights, AdamW state, lr scale, gradient norm; stage 0's data position) in the
background, as a per-stage checkpoint (:mod:`node.checkpoint.store`) under the snapshot URL. Stage 0 then
waits until every stage's part of the step is durable and writes the step's swarm manifest
(``swarm/step-<N>.json``) last: a snapshot is complete exactly when its manifest exists, so a snapshot
interrupted mid-write is never used.

A swarm of entirely new nodes started with ``--resume`` continues from the newest complete snapshot: each
node finds it (:func:`find_snapshot`), and the planner's ``resume`` method gives every stage its part of
that same step. Snapshots that are incomplete, corrupt or unauthenticated are skipped with a one-line
reason; one taken with another model or training configuration is refused, naming the difference.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from node.checkpoint.keeper import CheckpointKeeper
from node.checkpoint.restore import restore_runtime
from node.checkpoint.store import CheckpointError, CheckpointStore, manifest_key
from node.config import LOCAL_FIELDS, SwarmConfig
from node.events import SnapshotEvent
from node.recovery.methods import Recovered, RecoveryContext, Unrecoverable
from node.recovery.planner import Method, RecoveryPlan
from node.storage import Storage, StorageError, open_storage

logger = logging.getLogger(__name__)
MANIFESTS = "swarm"
_NAME = re.compile(r"^step-(\d{8,})\.json$")
_LABEL = b"swarm-node snapshot manifest v1"
SEAL_PATIENCE_SECONDS = 300.0  # how long stage 0 waits for the other stages' parts of one snapshot
KEEP = 3  # complete snapshots kept (and parts per stage)


class SnapshotError(RuntimeError):
    """No usable snapshot: one line saying why."""


class SnapshotMismatch(SnapshotError):
    """The newest complete snapshot was taken with another model or training configuration."""


class SnapshotPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SnapshotManifest(BaseModel):
    """A complete swarm snapshot: every stage's part of one committed step (written after all of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    step: int = Field(ge=1)
    num_stages: int = Field(ge=1)
    data_position: int = Field(ge=0, description="samples of the training stream consumed before step+1")
    config: dict[str, Any] = Field(description="the swarm's configuration (without the data path)")
    config_fingerprint: str
    parts: dict[int, SnapshotPart]
    created: float
    hmac: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    def signed_bytes(self) -> bytes:
        fields = self.model_dump(mode="json", exclude={"hmac"})
        return _LABEL + b"\0" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @property
    def nbytes(self) -> int:
        return sum(p.size for p in self.parts.values())


def _manifest_name(step: int) -> str:
    return f"{MANIFESTS}/step-{step:08d}.json"


def _comparable(config: SwarmConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude=LOCAL_FIELDS)


def config_difference(taken: dict[str, Any], ours: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: snapshot value != ours`` for every differing leaf of two configuration dicts."""
    out = []
    for key in sorted(set(taken) | set(ours)):
        a, b = taken.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_difference(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: snapshot {a!r}, this node {b!r}")
    return out


def _sign(manifest: SnapshotManifest, secret: bytes | None) -> SnapshotManifest:
    if secret is None:
        return manifest
    digest = hmac.new(manifest_key(secret), manifest.signed_bytes(), hashlib.sha256).hexdigest()
    return manifest.model_copy(update={"hmac": digest})


def seal(storage: Storage, step: int, config: SwarmConfig, secret: bytes | None = None) -> SnapshotManifest:
    """Writes the swarm manifest of ``step`` from every stage's durable part; raises CheckpointError when a
    part is missing or does not verify."""
    fingerprint = config.fingerprint()
    parts = {}
    for stage in range(config.num_stages):
        info = CheckpointStore(storage, stage, fingerprint, secret=secret).manifest(step)
        parts[stage] = SnapshotPart(size=info.size, sha256=info.sha256)
    t = config.train
    manifest = SnapshotManifest(
        step=step,
        num_stages=config.num_stages,
        data_position=step * t.microbatches_per_step * t.microbatch_size,
        config=_comparable(config),
        config_fingerprint=fingerprint,
        parts=parts,
        created=time.time(),
    )
    manifest = _sign(manifest, secret)
    storage.put(_manifest_name(step), manifest.model_dump_json().encode())
    return manifest


def snapshot_steps(storage: Storage) -> list[int]:
    """Steps with a swarm manifest, oldest first (whether they verify is checked on reading)."""
    return sorted(int(m.group(1)) for name in storage.list(MANIFESTS) if (m := _NAME.match(name)))


def read_manifest(storage: Storage, step: int, secret: bytes | None = None) -> SnapshotManifest:
    """The swarm manifest of ``step``, authenticated with ``secret``; raises SnapshotError."""
    name = _manifest_name(step)
    try:
        manifest = SnapshotManifest.model_validate_json(storage.get(name))
    except FileNotFoundError:
        raise SnapshotError(f"{name} is missing") from None
    except (OSError, ValidationError) as err:
        raise SnapshotError(f"{name} is unreadable: {str(err).splitlines()[0]}") from None
    if manifest.step != step:
        raise SnapshotError(f"{name} describes step {manifest.step}")
    if secret is not None:
        expected = _sign(manifest.model_copy(update={"hmac": None}), secret).hmac
        if manifest.hmac is None or not hmac.compare_digest(manifest.hmac, expected or ""):
            raise SnapshotError(f"{name} fails its HMAC check (another swarm's secret, or altered)")
    return manifest


def find_snapshot(
    storage: Storage, config: SwarmConfig, secret: bytes | None = None
) -> tuple[SnapshotManifest | None, list[str]]:
    """The newest complete snapshot (manifest authentic, every part present with its recorded size and
    hash), and a one-line reason for each newer one skipped. Raises :class:`SnapshotMismatch` when the newest
    complete snapshot was taken with another configuration."""
    skipped: list[str] = []
    fingerprint = config.fingerprint()
    for step in reversed(snapshot_steps(storage)):
        try:
            manifest = read_manifest(storage, step, secret)
        except SnapshotError as err:
            skipped.append(f"snapshot of step {step} skipped: {err}")
            continue
        if manifest.config_fingerprint != fingerprint or manifest.num_stages != config.num_stages:
            diff = config_difference(manifest.config, _comparable(config)) or ["the configuration fingerprint"]
            raise SnapshotMismatch(
                f"the snapshot of step {step} at {storage.url} was taken with another configuration ({'; '.join(diff)})"
            )
        problem = _missing_part(storage, manifest, fingerprint, secret)
        if problem is not None:
            skipped.append(f"snapshot of step {step} skipped: {problem}")
            continue
        return manifest, skipped
    return None, skipped


def _missing_part(storage: Storage, manifest: SnapshotManifest, fingerprint: str, secret: bytes | None) -> str | None:
    if set(manifest.parts) != set(range(manifest.num_stages)):
        return f"it has parts of stages {sorted(manifest.parts)}"
    for stage, part in manifest.parts.items():
        try:
            info = CheckpointStore(storage, stage, fingerprint, secret=secret).manifest(manifest.step)
        except CheckpointError as err:
            return f"stage {stage}'s part: {err}"
        if (info.size, info.sha256) != (part.size, part.sha256):
            return f"stage {stage}'s part was replaced after the snapshot was sealed"
    return None


class SnapshotKeeper(CheckpointKeeper):
    """``--snapshot-to``: writes this stage's part every ``every`` committed steps (as a checkpoint, off the
    training path); on stage 0 it also seals each snapshot once every stage's part is durable."""

    methods = frozenset()  # resuming is SnapshotResume's; a snapshot never replaces a live recovery

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sealer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="snapshot-seal")
        self._sealing: concurrent.futures.Future[None] | None = None
        self._closing = False
        self._committed_at: dict[int, float] = {}

    def after_commit(self, committed: int) -> None:
        if committed % self.every == 0:
            self._committed_at[committed] = time.monotonic()
        super().after_commit(committed)

    def _on_durable(self, step: int, seconds: float, nbytes: int) -> None:  # on the writer thread
        assert self.store is not None
        if self.store.stage == 0:
            self._sealing = self._sealer.submit(self._seal, step, self._committed_at.pop(step, time.monotonic()))

    def _seal(self, step: int, committed_at: float) -> None:
        """Waits for every stage's part of ``step``, then writes the swarm manifest and prunes old ones."""
        deadline = time.monotonic() + SEAL_PATIENCE_SECONDS
        while True:
            try:
                manifest = seal(self.storage, step, self.config, self.secret)
                break
            except CheckpointError as err:
                if self._closing or time.monotonic() > deadline:
                    self.metrics.snapshot_seals.labels(result="failed").inc()
                    logger.error("snapshot of step %d not sealed: %s", step, err)
                    return
            except OSError as err:
                self.metrics.snapshot_seals.labels(result="failed").inc()
                logger.error("snapshot of step %d not sealed: %s", step, err)
                return
            time.sleep(0.5)
        self.metrics.snapshot_seals.labels(result="ok").inc()
        self.metrics.snapshot_step.set(step)
        seconds = time.monotonic() - committed_at
        self.events.emit(SnapshotEvent(step=step, bytes=manifest.nbytes, seconds=seconds))
        logger.info("snapshot of step %d sealed (%d bytes, %.2fs after the commit)", step, manifest.nbytes, seconds)
        for old in snapshot_steps(self.storage)[:-KEEP]:
            self.storage.delete(_manifest_name(old))

    async def close(self) -> None:
        """Finishes the write in progress, gives the seal of the last snapshot a moment to complete (the other
        stages write their parts as they stop too), then stops."""
        await super().close()
        if self._sealing is not None:
            with contextlib.suppress(Exception):  # a seal that failed or timed out was logged and counted
                await asyncio.wait_for(asyncio.wrap_future(self._sealing), timeout=30.0)
        self._closing = True
        await asyncio.to_thread(self._sealer.shutdown, True)


class SnapshotResume:
    """The ``resume`` recovery method: this stage's exact part of the snapshot found at start-up."""

    methods = frozenset({Method.RESUME})

    def __init__(self, storage: Storage, manifest: SnapshotManifest, secret: bytes | None = None) -> None:
        self.storage, self.manifest, self.secret = storage, manifest, secret

    async def recover(self, plan: RecoveryPlan, ctx: RecoveryContext, committed: int) -> Recovered:
        started, step = time.monotonic(), self.manifest.step
        store = CheckpointStore(self.storage, ctx.stage, ctx.config.fingerprint(), secret=self.secret)
        try:
            info, tensors = await asyncio.to_thread(store.load, step)
        except (CheckpointError, OSError) as err:
            # the snapshot broke after it was chosen (deleted, bit rot): no exact state for this stage, and
            # anything else would not match the other stages' parts
            raise Unrecoverable(f"stage {ctx.stage}'s part of the snapshot of step {step}: {err}") from None
        if info.sha256 != self.manifest.parts[ctx.stage].sha256:
            raise Unrecoverable(f"stage {ctx.stage}'s part of step {step} changed after the snapshot was sealed")
        runtime = await ctx.compute.run(restore_runtime, ctx.config, ctx.stage, ctx.device, (info, tensors))
        return Recovered(
            runtime, step, runtime.lr_scale, nbytes=info.size, fetch_seconds=time.monotonic() - started, audit=False
        )


async def find_resume_source(
    durability: Any, config: SwarmConfig, secret: bytes | None
) -> SnapshotResume | bool | None:
    """``--resume``: the ``resume`` method over the newest complete snapshot at ``durability.resume_url``; None
    when there is none (the swarm starts from the seed's weights); False (the node exits) when the storage
    cannot be read or the snapshot was taken with another configuration. Says which in the log."""
    url = durability.resume_url
    try:
        storage = open_storage(url, durability.storage_endpoint)
        found, skipped = await asyncio.to_thread(find_snapshot, storage, config, secret)
    except (SnapshotMismatch, StorageError) as err:
        logger.error("cannot resume: %s", err)
        return False
    except OSError as err:
        logger.error("cannot resume from %s: %s", url, err)
        return False
    for reason in skipped:
        logger.warning("%s", reason)
    if found is None:
        logger.warning("--resume: no complete snapshot at %s; starting from the seed's initial weights", url)
        return None
    logger.info("--resume: the snapshot of step %d at %s (%d bytes)", found.step, url, found.nbytes)
    return SnapshotResume(storage, found, secret)
