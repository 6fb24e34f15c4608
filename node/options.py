"""What a node is told to do: one typed model of ``swarm-node run``'s options, every default written once.

``swarm-node run`` fills :class:`NodeOptions` from its flags (``node.cli`` takes each flag's default and
help text from here); ``swarm-node local`` writes one :class:`NodeOptions` per child as a JSON file and
starts the child with ``run --options FILE``. The groups are handed to the parts that need them only:
:class:`TimingOptions` to presence, the participant and the driver; :class:`RecoveryOptions` to the
recovery methods; :class:`EvalOptions` to the stage-0 driver.
"""

from __future__ import annotations

import enum
import pathlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from node.config import SwarmConfig


class RecoveryStrategy(enum.StrEnum):
    """How a lost stage is rebuilt (``--recovery``)."""

    CHECKFREE = "checkfree"  # gradient-norm weighted average of the two neighbouring block stages
    CHECKFREE_PLUS = "checkfree+"  # also edge stages (swap partners) and stage 0 (copies on stages 1, S-1)
    CHECKPOINT = "checkpoint"  # newest checkpoint; the swarm rolls back to the newest common one
    COPY = "copy"  # one neighbour's weights (the paper's ablation baseline)
    RANDOM = "random"  # fresh random weights (ablation baseline)
    NONE = "none"  # the same as random
    LADDER = "ladder"  # also a neighbour's snapshot of the lost stage (<= K steps stale) before checkfree

    @property
    def out_of_order(self) -> bool:
        """CheckFree+ trains with the out-of-order pipeline (it changes the math: part of the config)."""
        return self is RecoveryStrategy.CHECKFREE_PLUS

    @property
    def rebuilds_stage0(self) -> bool:
        """Whether a claim of stage 0 can succeed: from copies (checkfree+), a checkpoint, or a snapshot."""
        return self in (RecoveryStrategy.CHECKFREE_PLUS, RecoveryStrategy.CHECKPOINT, RecoveryStrategy.LADDER)


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimingOptions(_Group):
    """Periods and deadlines (seconds)."""

    refresh_seconds: float = Field(1.0, gt=0, description="DHT refresh period; a record lives twice as long")
    rpc_timeout: float = Field(30.0, gt=0, description="deadline of one RPC")
    step_timeout: float = Field(120.0, gt=0, description="stage 0: abort a step after this")
    heartbeat_interval: float = Field(0.5, gt=0, description="seconds between heartbeats")
    heartbeat_timeout: float = Field(1.0, gt=0, description="a heartbeat slower than this is missed")
    suspect_after: int = Field(
        2, ge=1, description="missed heartbeats in a row before a neighbour is suspected dead (a stall is not a death)"
    )


class RecoveryOptions(_Group):
    """Failure recovery."""

    strategy: RecoveryStrategy = RecoveryStrategy.CHECKFREE
    lr_scale: float = Field(1.1, gt=0, description="learning-rate multiplier of a rebuilt stage's fresh optimizer")
    embed_sync_every: int = Field(
        1, ge=1, description="checkfree+: copy stage 0 to stages 1 and S-1 every K committed steps (1: exact)"
    )
    checkpoint_every: int = Field(100, ge=1, description="checkpoint: write a checkpoint every K committed steps")
    snapshot_neighbour_every: int = Field(
        10, ge=1, description="ladder: send the stage's state to its snapshot neighbour every K committed steps"
    )
    checkpoint_dir: str | None = Field(
        None,
        description="checkpoint: storage shared by the swarm's nodes, a directory or URL (a replacement restores "
        "from it)",
    )

    @model_validator(mode="after")
    def _checkpoint_needs_dir(self) -> RecoveryOptions:
        if self.strategy is RecoveryStrategy.CHECKPOINT and self.checkpoint_dir is None:
            raise ValueError("--recovery checkpoint needs --checkpoint-dir (storage the swarm's nodes share)")
        return self


class DurabilityOptions(_Group):
    """Whole-swarm snapshots on durable storage, for when every node is lost at once."""

    snapshot_to: str | None = Field(
        None, description="write a swarm snapshot here: a directory, file:// or s3://bucket/prefix"
    )
    snapshot_every: int = Field(50, ge=1, description="a snapshot every K committed steps")
    resume: bool = Field(
        False,
        description="start from the newest complete snapshot at --snapshot-to (or --resume-from); "
        "a fresh start when there is none",
    )
    resume_from: str | None = Field(None, description="resume from the snapshots at this URL (implies --resume)")
    storage_endpoint: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="S3 endpoint (MinIO, R2, GCS interoperability); default: AWS_ENDPOINT_URL, else AWS",
    )

    @property
    def resume_url(self) -> str | None:
        """Where to resume from, or None when not resuming."""
        return self.resume_from or (self.snapshot_to if self.resume else None)

    @model_validator(mode="after")
    def _resume_needs_a_source(self) -> DurabilityOptions:
        if self.resume and self.resume_url is None:
            raise ValueError("--resume needs --snapshot-to (or --resume-from URL): where the snapshots are")
        return self


class EvalOptions(_Group):
    """Validation on held-out data (stage 0)."""

    every: int = Field(0, ge=0, description="validation loss every E committed steps (0: never)")
    batches: int = Field(4, ge=1, description="held-out microbatches per evaluation")


class SecurityOptions(_Group):
    """Swarm membership (see the README's threat model)."""

    keys: pathlib.Path | None = Field(None, description="this node's key bundle (made by swarm-node keys issue)")
    insecure: bool = Field(
        False,
        description="run without keys: cleartext gRPC and an open DHT, so anyone who can reach this node's ports "
        "can stop or poison training",
    )
    reflection: bool = Field(False, description="serve gRPC server reflection (for grpcurl and the like)")
    metrics_tls: bool = Field(
        False, description="serve metrics over HTTPS with the node's certificate, to scrapers with a swarm certificate"
    )


class PreemptionMode(enum.StrEnum):
    """Where preemption notices come from (SIGTERM and SIGINT are notices too, except with ``none``)."""

    AUTO = "auto"  # detect the cloud from its metadata service
    AWS = "aws"
    GCP = "gcp"
    AZURE = "azure"
    SIGNAL = "signal"  # signals only
    NONE = "none"  # no notices: SIGTERM stops the node without a handover


class PreemptionOptions(_Group):
    """Spot preemption notices, and the handover they start."""

    mode: PreemptionMode = Field(PreemptionMode.AUTO, description="where notices come from")
    drain_seconds: float = Field(
        25.0, gt=0, le=3600, description="SIGTERM/SIGINT: the notice's window (below GCP's and Azure's 30 s)"
    )
    metadata_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
        description="metadata service base address (tests, unusual clouds)",
    )


class Placement(enum.StrEnum):
    """Where a ``--stage auto`` node serves."""

    VACANT = "vacant"  # claim vacant stages only; wait as an idle spare otherwise
    THROUGHPUT = "throughput"  # also join (and move to) the block stage with the least throughput, as a replica


class NodeOptions(BaseModel):
    """Everything ``swarm-node run`` configures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: SwarmConfig
    stage: int | None = Field(description="None: --stage auto (take a vacant stage, or wait as a spare)")
    swarm: str = Field("default", description="swarm name (DHT namespace)")
    initial_peers: list[str] = Field(default_factory=list)
    host: str = Field("0.0.0.0", description="address for gRPC and the DHT to listen on")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    announce_host: str | None = Field(None, description="host name/IP that other stages use to reach this one")
    announce_port: int | None = Field(
        None, ge=1, le=65535, description="port other stages use to reach this one (forwarded, mapped or proxied to "
        "--port); default: the port gRPC is bound to"
    )
    dht_port: int = Field(0, ge=0, le=65535, description="DHT port (0 picks a free one)")
    steps: int | None = Field(None, ge=1, description="stage 0: train until this many steps are committed")
    events_file: pathlib.Path | None = Field(None, description="append one JSON line per event here")
    save_dir: pathlib.Path | None = Field(None, description="write this stage's weights here on exit (safetensors)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="compute device")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="serve Prometheus metrics here (0: any)")
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint listens on")
    faults: list[str] = Field(default_factory=list, description="fault injection specs STAGE@STEP[:PHASE] (tests)")
    slowdown: float = Field(
        1.0, ge=1.0, le=100.0, description="benchmark aid: make this node's compute take this many times as long"
    )
    emulate_compute: float = Field(
        0.0,
        ge=0.0,
        le=60.0,
        description="benchmark aid: a block stage also sleeps this long per microbatch and direction on its "
        "compute thread (times --slowdown), so that parallel replicas can be measured on few CPU cores",
    )
    placement: Placement = Field(
        Placement.VACANT,
        description="vacant: a spare claims vacant stages only; throughput: with none vacant it joins the block "
        "stage with the least throughput as a replica, and replicas move to refill a vacant stage or to lift "
        "the slowest one",
    )
    timing: TimingOptions = TimingOptions()
    recovery: RecoveryOptions = RecoveryOptions()
    eval: EvalOptions = EvalOptions()
    security: SecurityOptions = SecurityOptions()
    preemption: PreemptionOptions = PreemptionOptions()
    durability: DurabilityOptions = DurabilityOptions()

    @model_validator(mode="after")
    def _stage_exists(self) -> NodeOptions:
        if self.stage is not None and not 0 <= self.stage < self.config.num_stages:
            raise ValueError(
                f"--stage {self.stage} is outside 0..{self.config.num_stages - 1} "
                f"for --num-stages {self.config.num_stages}"
            )
        if self.security.keys is None and not self.security.insecure:
            raise ValueError(
                "a node needs its keys (--keys BUNDLE, made by swarm-node keys issue); to run without them, "
                "where anyone who can reach its ports can stop or poison training, pass --insecure"
            )
        if self.security.keys is not None and self.security.insecure:
            raise ValueError("--keys and --insecure exclude each other")
        if self.security.metrics_tls and self.security.keys is None:
            raise ValueError("--metrics-tls serves with the node's certificate: it needs --keys")
        snapshots = self.durability.snapshot_to
        if snapshots is not None and snapshots.rstrip("/") == (self.recovery.checkpoint_dir or "").rstrip("/"):
            raise ValueError("--snapshot-to and --checkpoint-dir must be different places")
        if self.config.out_of_order != self.recovery.strategy.out_of_order:
            raise ValueError("the out-of-order pipeline is used by --recovery checkfree+ and only by it")
        return self

    @property
    def num_stages(self) -> int:
        return self.config.num_stages


def default(model: type[BaseModel], name: str) -> Any:
    """The default of ``model.name``, for a flag's help text (so a default is written only here)."""
    return model.model_fields[name].get_default(call_default_factory=True)


def describe(model: type[BaseModel], name: str) -> str:
    """``model.name``'s description, for a flag's help text."""
    return model.model_fields[name].description or ""
