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
import contextlib
import logging
import pathlib
import signal

import grpc
import hivemind
import torch

from node import __version__
from node.checkpoint.keeper import CheckpointKeeper
from node.checkpoint.snapshots import SnapshotKeeper, find_resume_source
from node.dht.directory import SwarmDirectory
from node.dht.factory import make_dht, mirror_dht_rejections
from node.events import EventLog, FencedEvent, UnrecoverableEvent
from node.export.io import save_stage_file
from node.metrics import StageMetrics
from node.options import NodeOptions, Placement, PreemptionMode, RecoveryStrategy
from node.preemption.watcher import PreemptionWatcher
from node.recovery.faults import FaultInjector, parse_fault
from node.recovery.handoff import Handoff
from node.recovery.methods import RecoveryContext, RecoveryMethod
from node.recovery.neighbour_snapshots import SnapshotRestore, SnapshotSender
from node.recovery.neighbours import NeighbourRebuild
from node.recovery.replacement import StageBuilder, StageTaken, Unrecoverable, claim_vacant_stage, served_epoch
from node.recovery.replica import ReplicaCopy
from node.recovery.stage0_copies import Stage0Copies
from node.security.authz import MemberInterceptor, ViewCheck
from node.security.keys import NodeCredentials
from node.security.tls import HandshakeLedger, channel_credentials, server_credentials
from node.stage.compute import Background, BlockingIO, Compute
from node.stage.coordinator import CommitCoordinator
from node.stage.driver import Stage0Driver
from node.stage.handover import Notices
from node.stage.participant import PipelineParticipant
from node.stage.peers import GrpcPeers
from node.stage.presence import NodeIdentity, Presence
from node.stage.replicas import ReplicaWatch
from node.stage.runtime import Reject, warm_up
from node.stage.seat import Seat
from node.stage.service import NodeStatus, StageService
from node.storage import open_storage
from node.train.optim import pick_device
from node.transport.channels import ChannelPool
from node.transport.server import ServerLimits, StageServer
from node.wire.records import StageRecord, StageState, current_epochs

logger = logging.getLogger(__name__)
OFFLINE_SECONDS = 5.0  # a clean exit waits this long at most to announce ``offline``


class StageDaemon:
    """One node: builds its parts, takes a stage (or waits as a spare for one), serves it until stopped."""

    def __init__(self, opts: NodeOptions, dht: hivemind.DHT, credentials: NodeCredentials | None = None) -> None:
        self.opts, cfg = opts, opts.config
        self.stopping = asyncio.Event()
        self.fenced = asyncio.Event()  # another peer claimed this node's stage with a newer epoch
        self.newer_claim: StageRecord | None = None
        self.metrics = StageMetrics()
        self.events = EventLog(opts.events_file)
        self.device = pick_device(opts.device)
        self.seat = Seat(opts.stage)
        self.credentials = creds = credentials
        self.dht = dht
        self.compute, self.io = Compute(), BlockingIO()
        self.channels = ChannelPool(channel_credentials(creds) if creds is not None else None)
        self.background = Background()
        self.me = NodeIdentity(
            peer_id=str(dht.peer_id),
            fingerprint=cfg.fingerprint(),
            num_stages=cfg.num_stages,
            out_of_order=cfg.out_of_order,
            node=creds.name if creds is not None else str(dht.peer_id),
        )
        timing, strategy = opts.timing, opts.recovery.strategy
        self.presence = Presence(
            SwarmDirectory(dht, opts.swarm, creds), self.io, self.seat, self.me, timing, self.channels, self.metrics,
            self.events, replica_step=lambda: self.copies.replica_step, parked=lambda: self.service.handoffs.parked_at,
            soft_notice=lambda: self.service.handoffs.prestaging,
            stage0_rebuildable=strategy.rebuilds_stage0,
            throughput=lambda: self.participant.throughput(),
            snapshots=lambda: self.service.snapshots.steps(),
        )  # fmt: skip
        self.presence.on_fenced.append(self._on_fenced)
        self.faults = FaultInjector(
            [parse_fault(spec, cfg.num_stages) for spec in opts.faults],
            self.events,
            cfg.train.microbatches_per_step,
            recovered_at=lambda: self.seat.last_recovery.step if self.seat.last_recovery else None,
        )
        self.participant = PipelineParticipant(
            self.seat, self.compute, self.presence, self.channels, cfg, timing, self.metrics, self.faults,
            self.stopping, slowdown=opts.slowdown, emulate_compute=opts.emulate_compute,
        )  # fmt: skip
        self.replicas = ReplicaWatch(self.seat, self.presence, self.participant, self._context, timing.refresh_seconds)
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
        self.checkpoints, self.snapshots, self.neighbour_snapshots = _keepers(self, creds)
        for keeper in (self.checkpoints, self.snapshots, self.neighbour_snapshots):
            if keeper is not None:
                self.participant.after_commit.append(keeper.after_commit)
        self.resume_step: int | None = None  # the snapshot a --resume start takes (found in run())
        self.methods: list[RecoveryMethod] = [
            NeighbourRebuild(opts.recovery.lr_scale), self.copies, Handoff(), ReplicaCopy(), SnapshotRestore()
        ]
        if self.checkpoints is not None:
            self.methods.append(self.checkpoints)
        self.watcher = PreemptionWatcher(
            opts.preemption.mode.value, opts.preemption.metadata_url, opts.preemption.drain_seconds,
            lambda notice: self.notices.on_notice(notice),
            on_error=lambda provider: self.metrics.metadata_errors.labels(provider=provider).inc(),
        )  # fmt: skip
        self.service = service = StageService(
            self.participant, self.copies, self.checkpoints, self.status, self.metrics,
            superseded=lambda epoch: self.background.spawn(self.presence.try_refresh()),  # fences via on_fenced
            nudged=self.presence.nudges.nudged,
        )  # fmt: skip
        self.notices = Notices(
            self.seat, self.presence, service.handoffs, self.metrics, self.events, self.background, self.stopping
        )
        self.leaving = self.notices.leaving  # a hard notice: hand the stage over, then exit
        interceptors: tuple[MemberInterceptor, ...] = ()
        ledger = None
        if creds is not None:
            check = ViewCheck(
                self.presence.members_lately, self.presence.try_refresh, lambda: self.seat.stage,
                cfg.num_stages, cfg.out_of_order,
            )  # fmt: skip
            ledger = HandshakeLedger(lambda n: service.refusals.count(Reject.TLS_HANDSHAKE, "a connection", n))
            interceptors = (MemberInterceptor(check, self._refused, ledger.authenticated),)
        self.server = StageServer(
            service,
            server_credentials(creds, ledger) if creds is not None else None,
            interceptors,
            ServerLimits(call_seconds=timing.step_timeout + timing.rpc_timeout),
            with_reflection=opts.security.reflection,
            on_refused=lambda reason, text: service.refusals.count(Reject(reason), text),
        )

    def _refused(self, code: grpc.StatusCode, rpc: str) -> None:
        reason = Reject.UNAUTHENTICATED if code == grpc.StatusCode.UNAUTHENTICATED else Reject.PERMISSION_DENIED
        self.service.refusals.count(reason, f"a {rpc} call")

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

    def _context(self, stage: int) -> RecoveryContext:
        """What a recovery (or a replica's copy) of ``stage`` works with."""
        return RecoveryContext(
            stage, self.opts.config, self.device, self.compute, self.presence, self.channels, self.opts.timing,
            self.faults,
        )  # fmt: skip

    async def take_stage(self) -> None:
        """Waits as a spare for a vacant stage when it has none, then builds the stage's state."""
        warmed = False
        while True:
            replica = claimed = False  # a served block stage is joined (never a claimed vacancy: see StageBuilder)
            if self.seat.stage is None:
                if not warmed:
                    await self.compute.run(warm_up, self.opts.config, self.device)
                    warmed = True
                self.publish_identity()
                await self.presence.announce(StageState.SPARE)
                logger.info("spare node %s waiting for a vacant stage", self.me.peer_id)
                join = self.opts.placement is Placement.THROUGHPUT
                claimed = not await claim_vacant_stage(self.presence, self.seat, self.stopping, join=join)
            if not claimed:  # an explicit --stage N, or a stage chosen to join by throughput
                # a replica of a served stage holds it by the same claim as the others; any other start is a claim
                serving = await served_epoch(self.presence, self.seat.stage, self.stopping)
                replica = serving is not None and self.seat.stage != 0
                self.seat.epoch = serving if replica else self.presence.claim_epoch(self.seat.stage)
                await self.presence.announce(StageState.JOINING)
            assert self.seat.stage is not None
            builder = StageBuilder(
                self._context(self.seat.stage), self.seat, self.opts.recovery.strategy, self.methods, self.metrics,
                self.events, self.stopping, resume_step=self.resume_step, join_served=replica,
                snapshot_every=self.opts.recovery.snapshot_neighbour_every,
            )  # fmt: skip
            try:
                recovered = await builder.build()
            except StageTaken as err:  # our view had missed its serving peer
                logger.warning("%s; waiting as a spare", err)
                self.seat.stage = None
                continue
            if self.checkpoints is not None:
                await self.checkpoints.attach(self.seat.stage)
            if recovered is not None and recovered.audit and self.opts.save_dir is not None:
                # what was built, for audit and tests
                name = f"stage{self.seat.stage}.recovered-step{recovered.step}.safetensors"
                await self._save(self.opts.save_dir / name)
            return

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        opts = self.opts
        if opts.preemption.mode is PreemptionMode.NONE:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stopping.set)
        else:
            self.watcher.install_signal_handlers(loop)
            self.background.spawn(self.watcher.run(self.stopping))
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if opts.security.insecure:
            logger.warning(
                "--insecure: this node's gRPC port is cleartext and unauthenticated and its DHT is open; anyone who "
                "can reach them can stop or poison training. Use --keys on any network you do not fully trust."
            )
        if opts.metrics_port is not None:
            bundle = opts.security.keys if opts.security.metrics_tls else None
            self.me.metrics_port = self.metrics.serve(
                opts.metrics_port,
                host=opts.metrics_host,
                certfile=bundle / "node.pem" if bundle else None,
                keyfile=bundle / "node.key" if bundle else None,
                client_cafile=bundle / "ca.pem" if bundle else None,
            )
        self.me.grpc_address = await self.server.start(opts.host, opts.port, opts.announce_host, opts.announce_port)
        periodic = self.background.spawn(self.presence.run_periodic(self.stopping))
        self.background.spawn(self.presence.run_heartbeats(self.stopping))
        rejected, period = self.metrics.dht_rejected, opts.timing.refresh_seconds
        self.background.spawn(mirror_dht_rejections(self.dht, rejected, self.stopping, period))
        self.background.spawn(self.service.handoffs.release_parked(self.presence, self.stopping))
        exit_code = 0
        try:
            if opts.durability.resume_url is not None:
                secret = self.credentials.secret if self.credentials is not None else None
                found = await find_resume_source(opts.durability, opts.config, secret)
                if found is False:
                    return 2
                if found is not None:
                    self.resume_step = found.manifest.step
                    self.methods.append(found)
            stage = self.seat.stage
            if stage is not None and (holder := await self.presence.serving_peer(stage)) is not None:
                if stage == 0:  # stage 0 has one peer: e.g. a restarted container whose stage a spare took over
                    logger.warning("stage 0 is already served by %s; waiting as a spare", holder)
                    self.seat.stage = None
                else:
                    logger.info("stage %d is served by %s: joining it as another replica", stage, holder)
            while not self.stopping.is_set():
                await self.take_stage()
                exit_code = await self._serve()
                if self.leaving.is_set():
                    if not self.stopping.is_set():  # a second signal: stop at once
                        await self.notices.hand_over(self.participant, self.channels, self.watcher)
                    break
                if self.replicas.moving.is_set():
                    await self._move()
                    continue
                if not self.fenced.is_set():
                    break
                await self._step_down()
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

    async def _serve(self) -> int:
        """Serves the stage until the daemon stops or the stage is claimed by a newer epoch; stage 0 with
        ``--steps`` trains meanwhile. Returns the exit code (1 if the training driver failed)."""
        opts = self.opts
        self.publish_identity()
        self.metrics.committed_step.set(self.seat.committed_step)
        logger.info(
            "stage %d serving on %s (peer %s, device %s)",
            self.seat.stage, self.me.grpc_address, self.me.peer_id, self.device,
        )  # fmt: skip
        await self.presence.announce(StageState.ONLINE if self.seat.stage else StageState.WAITING)
        if self.seat.stage is not None:  # who waits for it (stage 0, the neighbours, a leaving owner) sees it now
            self.background.spawn(self.presence.nudge(self.presence.waiting_on(self.seat.stage)))
        watch = self.replicas
        waits = {self.background.spawn(e.wait()) for e in (self.stopping, self.fenced, self.leaving, watch.moving)}
        helpers = [self.background.spawn(watch.keep_up())] if self.seat.stage else []
        if self.seat.stage and self.opts.placement is Placement.THROUGHPUT:
            helpers.append(self.background.spawn(watch.watch_placement()))
        drive = None
        if self.seat.stage == 0 and opts.steps is not None:
            driver = Stage0Driver(
                opts.config, self.compute, self.participant, self.coordinator, self.presence, self.copies,
                self.checkpoints, opts.timing, opts.recovery, opts.eval, self.metrics, self.events, self.stopping,
                self.leaving,
            )  # fmt: skip
            drive = self.background.spawn(driver.drive(opts.steps))
            waits.add(drive)
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if self.leaving.is_set() and drive is not None and not drive.done():
            # the driver finishes the step in flight (committed or aborted everywhere) and starts no other
            with contextlib.suppress(TimeoutError):
                await asyncio.wait({drive}, timeout=opts.timing.step_timeout + opts.timing.rpc_timeout)
        for task in waits:
            task.cancel()
        for task in helpers:
            task.cancel()
        if drive is not None and drive.done() and not drive.cancelled() and drive.exception() is not None:
            logger.error("training driver failed", exc_info=drive.exception())
            return 1
        return 0

    def _on_fenced(self, newer: StageRecord) -> None:
        if not self.fenced.is_set():
            self.fenced.set()
            self.newer_claim = newer

    async def _step_down(self) -> None:
        """Fenced: another peer holds this node's stage by a newer claim. Stop serving it, wait as a spare."""
        seat, newer = self.seat, self.newer_claim
        logger.warning(
            "stage %s was taken over by %s (epoch %d > %d): no longer serving it; waiting as a spare",
            seat.stage, newer.peer_id, newer.epoch, seat.epoch,
        )  # fmt: skip
        self.events.emit(FencedEvent(stage=seat.stage, epoch=seat.epoch, by=newer.peer_id, by_epoch=newer.epoch))
        seat.runtime, seat.stage, seat.epoch, seat.last_recovery = None, None, 0, None
        await self.participant.order.reset()
        self.fenced.clear()

    async def _move(self) -> None:
        """``--placement throughput``: leave this stage (between steps) for ``replicas.move_to``: join it if it is
        served, else wait as a spare and claim it."""
        seat, watch = self.seat, self.replicas
        target, watch.move_to = watch.move_to, None
        watch.moving.clear()
        timeout = self.opts.timing.step_timeout
        with contextlib.suppress(TimeoutError):  # a prepared step is committed or aborted first
            async with asyncio.timeout(timeout):
                while seat.runtime is not None and seat.runtime.prepared:
                    await asyncio.sleep(0.05)
        served = target is not None and current_epochs(self.presence.members()).get(target) is not None
        logger.warning("moving from stage %s to stage %s (%s)", seat.stage, target, "join" if served else "claim")
        seat.runtime, seat.last_recovery, seat.epoch = None, None, 0
        seat.stage = target if served else None
        await self.participant.order.reset()

    async def _save(self, path: pathlib.Path) -> None:
        """``--save-dir``: the committed weights (see :func:`node.export.io.save_stage_file`)."""
        step, norm, state = await self.participant.snapshot_committed()
        await self.compute.run(save_stage_file, path, self.seat.stage, step, norm, state, self.me.fingerprint)

    async def shutdown(self) -> None:
        """Clean exit: save the committed weights, announce ``offline`` (so nobody waits for a record to
        expire), finish checkpoint writes, then stop serving."""
        await self.server.set_serving(False)
        if self.opts.save_dir is not None and self.seat.ready:
            await self._save(self.opts.save_dir / f"stage{self.seat.stage}.safetensors")
        try:
            await asyncio.wait_for(self.presence.announce(StageState.OFFLINE), timeout=OFFLINE_SECONDS)
        except TimeoutError:
            logger.warning("could not announce offline within %.0f s", OFFLINE_SECONDS)
        for keeper in (self.checkpoints, self.snapshots, self.neighbour_snapshots):
            if keeper is not None:
                await keeper.close()
        self.background.cancel_all()
        self.participant.close()
        self.presence.close()
        await self.server.stop(grace=1.0)
        await self.channels.close()
        self.compute.close()
        self.io.close()
        self.metrics.close()


def _keepers(
    d: StageDaemon, creds: NodeCredentials | None
) -> tuple[CheckpointKeeper | None, SnapshotKeeper | None, SnapshotSender | None]:
    """The parts that keep state after commits, by the options: checkpoints (``--recovery checkpoint``), swarm
    snapshots (``--snapshot-to``) and neighbour snapshots (``--recovery ladder``)."""
    opts, cfg, secret = d.opts, d.opts.config, creds.secret if creds is not None else None
    recovery, durability = opts.recovery, opts.durability
    checkpoints = snapshots = neighbour = None
    if recovery.strategy is RecoveryStrategy.CHECKPOINT:
        assert recovery.checkpoint_dir is not None  # NodeOptions checks it
        checkpoints = CheckpointKeeper(
            open_storage(recovery.checkpoint_dir, durability.storage_endpoint), recovery.checkpoint_every, d.seat,
            cfg, d.device, d.compute, d.participant.install, d.metrics, d.events, secret=secret,
        )  # fmt: skip
    if durability.snapshot_to is not None:
        snapshots = SnapshotKeeper(
            open_storage(durability.snapshot_to, durability.storage_endpoint), durability.snapshot_every, d.seat,
            cfg, d.device, d.compute, d.participant.install, d.metrics, d.events, secret=secret,
        )  # fmt: skip
    if recovery.strategy is RecoveryStrategy.LADDER:
        neighbour = SnapshotSender(
            cfg, recovery.snapshot_neighbour_every, d.seat, d.compute, d.presence, d.channels, opts.timing,
            d.metrics, d.events,
        )  # fmt: skip
    return checkpoints, snapshots, neighbour


def run_daemon(opts: NodeOptions) -> int:
    """Entry point of ``swarm-node run``: DHT first (it forks), then the uvloop event loop and gRPC."""
    import uvloop

    creds = NodeCredentials.load(opts.security.keys) if opts.security.keys is not None else None
    dht = make_dht(opts.initial_peers, [f"/ip4/{_dht_bind(opts.host)}/tcp/{opts.dht_port}"], creds)
    try:
        return uvloop.run(StageDaemon(opts, dht, creds).run())
    finally:
        dht.shutdown()


def _dht_bind(host: str) -> str:
    return host if host.replace(".", "").isdigit() else "0.0.0.0"
