"""The stage daemon: one pipeline stage as an asyncio (uvloop) program. It only wires the parts together,
starts them and shuts them down:

- :class:`~node.stage.presence.Presence`: its DHT record, the swarm view, suspicion and heartbeats;
- :class:`~node.stage.participant.PipelineParticipant`: the Forward/Backward handlers, pushes, the local
  prepare/commit/abort;
- :class:`~node.stage.coordinator.CommitCoordinator` and, on stage 0, :class:`~node.stage.driver.Stage0Driver`;
- the recovery methods (:mod:`node.recovery.neighbours`, :mod:`node.recovery.stage0_copies`,
  :mod:`node.checkpoint.keeper`) and :class:`~node.recovery.replacement.StageBuilder`;
- :class:`~node.stage.service.StageService` behind :class:`~node.transport.server.StageServer`.

The step protocol is described in ``docs/PROTOCOL.md``, the recovery paths in ``docs/RECOVERY.md``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal

import hivemind
import torch
from safetensors.torch import save_file

from node import __version__
from node.checkpoint.keeper import CheckpointKeeper
from node.dht.directory import SwarmDirectory
from node.events import EventLog, UnrecoverableEvent
from node.metrics import StageMetrics
from node.options import NodeOptions, RecoveryStrategy
from node.recovery.faults import FaultInjector, parse_fault
from node.recovery.methods import RecoveryContext, RecoveryMethod
from node.recovery.neighbours import NeighbourRebuild
from node.recovery.replacement import StageBuilder, StageTaken, Unrecoverable, claim_vacant_stage
from node.recovery.stage0_copies import Stage0Copies
from node.stage.compute import Background, BlockingIO, Compute
from node.stage.coordinator import CommitCoordinator
from node.stage.driver import Stage0Driver
from node.stage.participant import PipelineParticipant
from node.stage.peers import GrpcPeers
from node.stage.presence import NodeIdentity, Presence
from node.stage.runtime import warm_up
from node.stage.seat import Seat
from node.stage.service import NodeStatus, StageService
from node.train.optim import pick_device
from node.transport.channels import ChannelPool
from node.transport.server import StageServer
from node.wire.records import StageState

logger = logging.getLogger(__name__)
OFFLINE_SECONDS = 5.0  # a clean exit waits this long at most to announce ``offline``


class StageDaemon:
    """One node: builds its parts, takes a stage (or waits as a spare for one), serves it until stopped."""

    def __init__(self, opts: NodeOptions, dht: hivemind.DHT) -> None:
        self.opts, cfg = opts, opts.config
        self.stopping = asyncio.Event()
        self.metrics = StageMetrics()
        self.events = EventLog(opts.events_file)
        self.device = pick_device(opts.device)
        self.seat = Seat(opts.stage)
        self.compute, self.io, self.channels = Compute(), BlockingIO(), ChannelPool()
        self.background = Background()
        self.me = NodeIdentity(
            peer_id=str(dht.peer_id),
            fingerprint=cfg.fingerprint(),
            num_stages=cfg.num_stages,
            out_of_order=cfg.out_of_order,
        )
        timing, strategy = opts.timing, opts.recovery.strategy
        self.presence = Presence(
            SwarmDirectory(dht, opts.swarm), self.io, self.seat, self.me, timing, self.channels, self.metrics,
            self.events, replica_step=lambda: self.copies.replica_step,
        )  # fmt: skip
        self.faults = FaultInjector(
            [parse_fault(spec, cfg.num_stages) for spec in opts.faults],
            self.events,
            cfg.train.microbatches_per_step,
            recovered_at=lambda: self.seat.last_recovery.step if self.seat.last_recovery else None,
        )
        self.participant = PipelineParticipant(
            self.seat, self.compute, self.presence, self.channels, cfg, timing, self.metrics, self.faults,
            self.stopping,
        )  # fmt: skip
        self.coordinator = CommitCoordinator(
            cfg.num_stages,
            GrpcPeers(self.presence, self.channels, timing),
            self.participant,
            cfg.train.grad_clip,
            self.events,
            self.stopping,
            refused_commit_is_final=strategy is RecoveryStrategy.CHECKPOINT,
        )
        self.copies = Stage0Copies(
            cfg, self.compute, self.presence, self.channels, timing, self.metrics, self.coordinator.commit_remote
        )
        self.checkpoints: CheckpointKeeper | None = None
        if strategy is RecoveryStrategy.CHECKPOINT:
            assert opts.recovery.checkpoint_dir is not None  # NodeOptions checks it
            self.checkpoints = CheckpointKeeper(
                opts.recovery.checkpoint_dir, opts.recovery.checkpoint_every, self.seat, cfg, self.device,
                self.compute, self.participant.install, self.metrics, self.events,
            )  # fmt: skip
            self.participant.after_commit.append(self.checkpoints.after_commit)
        self.methods: list[RecoveryMethod] = [NeighbourRebuild(opts.recovery.lr_scale), self.copies]
        if self.checkpoints is not None:
            self.methods.append(self.checkpoints)
        service = StageService(self.participant, self.copies, self.checkpoints, self.status, self.metrics)
        self.server = StageServer(service)

    def status(self) -> NodeStatus:
        return NodeStatus(self.seat.stage, self.me.peer_id, self.presence.state.value, self.me.pid)

    def publish_identity(self) -> None:
        """``swarm_node_stage_info``: which stage this node serves (empty and role ``spare`` while it waits), so
        dashboards can put a stage on every per-node series."""
        stage = self.seat.stage
        self.metrics.info.info(
            {
                "stage": "" if stage is None else str(stage),
                "role": "spare" if stage is None else "embedding" if stage == 0 else "blocks",
                "version": __version__,
                "recovery": self.opts.recovery.strategy.value,
                "device": self.device.type,
            }
        )

    async def take_stage(self) -> None:
        """Waits as a spare for a vacant stage when it has none, then builds the stage's state."""
        warmed = False
        while True:
            if self.seat.stage is None:
                if not warmed:
                    await self.compute.run(warm_up, self.opts.config, self.device)
                    warmed = True
                self.publish_identity()
                await self.presence.announce(StageState.SPARE)
                logger.info("spare node %s waiting for a vacant stage", self.me.peer_id)
                await claim_vacant_stage(self.presence, self.seat, self.stopping)
            else:
                await self.presence.announce(StageState.JOINING)
            assert self.seat.stage is not None
            ctx = RecoveryContext(
                self.seat.stage, self.opts.config, self.device, self.compute, self.presence, self.channels,
                self.opts.timing, self.faults,
            )  # fmt: skip
            builder = StageBuilder(
                ctx, self.seat, self.opts.recovery.strategy, self.methods, self.metrics, self.events, self.stopping
            )
            try:
                recovered = await builder.build()
            except StageTaken as err:  # our view had missed its serving peer
                logger.warning("%s; waiting as a spare", err)
                self.seat.stage = None
                continue
            if recovered is not None and recovered.audit and self.opts.save_dir is not None:
                # what was built, for audit and tests
                name = f"stage{self.seat.stage}.recovered-step{recovered.step}.safetensors"
                await self.save_weights(self.opts.save_dir / name)
            return

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        opts = self.opts
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.metrics_port is not None:
            # on the gRPC server's interface: a loopback daemon does not expose its metrics to the network
            self.me.metrics_port = self.metrics.serve(opts.metrics_port, host=opts.host)
        self.me.grpc_address = await self.server.start(opts.host, opts.port, opts.announce_host)
        periodic = self.background.spawn(self.presence.run_periodic(self.stopping))
        self.background.spawn(self.presence.run_heartbeats(self.stopping))
        exit_code = 0
        try:
            stage = self.seat.stage
            if stage is not None and (holder := await self.presence.serving_peer(stage)) is not None:
                # e.g. a restarted container whose stage a spare took over meanwhile: become the spare
                logger.warning("stage %d is already served by %s; waiting as a spare", stage, holder)
                self.seat.stage = None
            await self.take_stage()
            self.publish_identity()
            self.metrics.committed_step.set(self.seat.committed_step)
            logger.info(
                "stage %d serving on %s (peer %s, device %s)",
                self.seat.stage, self.me.grpc_address, self.me.peer_id, self.device,
            )  # fmt: skip
            await self.presence.announce(StageState.ONLINE if self.seat.stage else StageState.WAITING)
            if self.seat.stage == 0 and opts.steps is not None:
                exit_code = await self._drive(opts.steps)
            else:
                await self.stopping.wait()
        except Unrecoverable as err:
            logger.error("%s; training cannot continue", err)
            self.events.emit(UnrecoverableEvent(stage=self.seat.stage, reason=str(err)))
            exit_code = 3
        except asyncio.CancelledError:
            pass
        finally:
            self.stopping.set()
            periodic.cancel()
            await self.shutdown()
        return exit_code

    async def _drive(self, steps: int) -> int:
        """Stage 0: trains until ``steps`` are committed or the daemon is stopped; 1 if the driver failed."""
        opts = self.opts
        driver = Stage0Driver(
            opts.config, self.compute, self.participant, self.coordinator, self.presence, self.copies,
            self.checkpoints, opts.timing, opts.recovery, opts.eval, self.metrics, self.events, self.stopping,
        )  # fmt: skip
        drive = self.background.spawn(driver.drive(steps))
        stop = self.background.spawn(self.stopping.wait())
        await asyncio.wait({drive, stop}, return_when=asyncio.FIRST_COMPLETED)
        if drive.done() and drive.exception() is not None:
            logger.error("training driver failed", exc_info=drive.exception())
            return 1
        return 0

    async def shutdown(self) -> None:
        """Clean exit: save the committed weights, announce ``offline`` (so nobody waits for a record to
        expire), finish checkpoint writes, then stop serving."""
        await self.server.set_serving(False)
        if self.opts.save_dir is not None and self.seat.ready:
            await self.save_weights(self.opts.save_dir / f"stage{self.seat.stage}.safetensors")
        try:
            await asyncio.wait_for(self.presence.announce(StageState.OFFLINE), timeout=OFFLINE_SECONDS)
        except TimeoutError:
            logger.warning("could not announce offline within %.0f s", OFFLINE_SECONDS)
        if self.checkpoints is not None:
            await self.checkpoints.close()
        self.background.cancel_all()
        self.participant.close()
        self.presence.close()
        await self.server.stop(grace=1.0)
        await self.channels.close()
        self.compute.close()
        self.io.close()

    async def save_weights(self, path: pathlib.Path) -> None:
        """The committed weights as safetensors, with the committed step and gradient norm as metadata."""
        step, norm, state = await self.participant.snapshot_committed()
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "stage": str(self.seat.stage),
            "committed_step": str(step),
            "grad_norm": repr(norm),
            "config_fingerprint": self.me.fingerprint,
        }
        tmp = path.with_suffix(".tmp")
        await self.compute.run(save_file, {k: v.contiguous() for k, v in state.items()}, str(tmp), meta)
        os.replace(tmp, path)


def run_daemon(opts: NodeOptions) -> int:
    """Entry point of ``swarm-node run``: DHT first (it forks), then the uvloop event loop and gRPC."""
    import uvloop

    dht = hivemind.DHT(
        initial_peers=opts.initial_peers,
        host_maddrs=[f"/ip4/{_dht_bind(opts.host)}/tcp/{opts.dht_port}"],
        start=True,
        await_ready=True,
    )
    try:
        return uvloop.run(StageDaemon(opts, dht).run())
    finally:
        dht.shutdown()


def _dht_bind(host: str) -> str:
    return host if host.replace(".", "").isdigit() else "0.0.0.0"

