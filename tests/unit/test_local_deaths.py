"""``swarm-node local``'s account of node deaths: planned kills and deaths nobody planned (real child processes
killed by real signals), the replacements it asks for, and how the summary and the live table report them."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from rich.console import Console

from node import events as ev
from node.config import build_config
from node.local.children import Child, LocalSwarmError
from node.local.faults import MAX_DEATHS_BEFORE_JOINING, Death, LauncherFaults
from node.local.launcher import LocalOptions, LocalSwarm
from node.local.summary import StageLog, recoveries, run_summary
from node.local.view import progress_table
from node.wire.records import StageRecord, StageState

SLEEP = "import time; time.sleep(60)"


class Kids:
    """Short-lived python children wrapped as the launcher's :class:`Child`; all killed at the end."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.tmp_path = tmp_path
        self.children: list[Child] = []

    def start(self, name: str, code: str = SLEEP) -> Child:
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, start_new_session=True)
        child = Child(name, proc, self.tmp_path / f"{name}.log")
        self.children.append(child)
        return child

    def cleanup(self) -> None:
        for child in self.children:
            child.kill_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=10)


@pytest.fixture
def kids(tmp_path: pathlib.Path) -> Iterator[Kids]:
    k = Kids(tmp_path)
    try:
        yield k
    finally:
        k.cleanup()


def kill(child: Child, sig: int = signal.SIGKILL) -> None:
    os.kill(child.proc.pid, sig)
    child.proc.wait(timeout=10)


def record(pid: int, stage: int | None, peer: str = "peer", state: StageState | None = None) -> StageRecord:
    state = state or (StageState.SPARE if stage is None else StageState.ONLINE)
    return StageRecord(
        stage=stage,
        num_stages=4,
        peer_id=peer,
        grpc_address="127.0.0.1:5000",
        state=state,
        committed_step=3,
        config_fingerprint="f",
        version="0",
        pid=pid,
    )


def faults() -> LauncherFaults:
    return LauncherFaults([], 0.0, 4, seed=0)


def no_events() -> list[ev.Event]:
    return []


def test_a_sigkill_nobody_planned_is_an_unplanned_death_to_replace(kids: Kids) -> None:
    dht, stage1, stage2 = kids.start("dht"), kids.start("stage1"), kids.start("stage2")
    f = faults()
    seen = {stage2.proc.pid: record(stage2.proc.pid, 2, "p2")}
    assert f.new_deaths([], kids.children, no_events, seen=seen) == []  # all alive: last seen alive now
    kill(stage2)
    [death] = f.new_deaths([], kids.children, no_events, seen=seen)
    assert (death.name, death.pid, death.stage, death.peer_id) == ("stage2", stage2.proc.pid, 2, "p2")
    assert (death.exit_code, death.signal, death.planned, death.cause) == (-9, "SIGKILL", False, "unplanned")
    assert death.replaced and death.log == str(kids.tmp_path / "stage2.log")
    assert death.alive_at is not None and death.alive_at <= death.time and death.died_at == death.alive_at
    assert "killed by SIGKILL" in death.describe() and "stage 2" in death.describe()
    assert f.new_deaths([], kids.children, no_events, seen=seen) == []  # reported once
    assert f.deaths == [death] and f.unplanned() == [death]
    assert dht.proc.poll() is None and stage1.proc.poll() is None


@pytest.mark.parametrize(
    ("how", "code", "sig"),
    [
        ("sigterm", -signal.SIGTERM, "SIGTERM"),
        ("traceback", 1, None),
        ("exit 3", 3, None),
    ],
)
def test_sigterm_crash_and_nonzero_exit_are_unplanned(kids: Kids, how: str, code: int, sig: str | None) -> None:
    program = {"traceback": "raise RuntimeError('boom')", "exit 3": "raise SystemExit(3)"}.get(how, SLEEP)
    child = kids.start("node5", program)
    if how == "sigterm":
        kill(child, signal.SIGTERM)
    child.proc.wait(timeout=30)
    [death] = faults().new_deaths([], kids.children, no_events, started_for={})
    assert (death.exit_code, death.signal, death.planned, death.stage, death.replaced) == (code, sig, False, None, True)
    assert death.summary()["exit_code"] == code and death.summary()["signal"] == sig


def test_the_stage_of_a_node_without_a_record_is_the_one_it_was_started_for(kids: Kids) -> None:
    child = kids.start("stage3")
    kill(child)
    [death] = faults().new_deaths([], kids.children, no_events, started_for={child.proc.pid: 3})
    assert death.stage == 3 and death.peer_id is None


def test_planned_kills_stay_planned(kids: Kids) -> None:
    launcher_killed, self_killed = kids.start("stage1"), kids.start("stage2")
    f = faults()
    f._kill(launcher_killed, 1, "failure-rate", 7)  # the launcher's own kill: logged, then SIGKILL to the group
    launcher_killed.proc.wait(timeout=10)
    # a daemon writes its killed event and dies: the event may be newer than the ones the watch loop read
    late = [ev.KilledEvent(stage=2, step=7, phase="backward", pid=self_killed.proc.pid)]
    kill(self_killed)
    deaths = {d.name: d for d in f.new_deaths([], kids.children, lambda: late)}
    assert (deaths["stage1"].planned, deaths["stage1"].cause, deaths["stage1"].stage) == (True, "failure-rate", 1)
    assert (deaths["stage2"].planned, deaths["stage2"].cause, deaths["stage2"].stage) == (True, "backward", 2)
    assert all(d.replaced and d.exit_code == -9 for d in deaths.values())
    assert "2@7:backward" in f.fired and f.unplanned() == []


def test_the_bootstrap_node_dying_is_an_error(kids: Kids) -> None:
    dht = kids.start("dht")
    kill(dht)
    with pytest.raises(LocalSwarmError, match="bootstrap DHT node exited with code -9"):
        faults().new_deaths([], kids.children, no_events)


def test_an_unrecoverable_stage_stops_the_swarm_even_when_its_node_exits_first(kids: Kids) -> None:
    child = kids.start("node6", "raise SystemExit(3)")
    child.proc.wait(timeout=30)
    lost = [ev.UnrecoverableEvent(stage=0, reason="cannot be rebuilt", pid=child.proc.pid)]
    with pytest.raises(LocalSwarmError, match="stage 0 was lost and cannot be rebuilt"):
        faults().new_deaths([], kids.children, lambda: lost)
    with pytest.raises(LocalSwarmError, match="stage 0 was lost"):
        faults().new_deaths(lost, [], no_events)


def test_exit_0_is_a_death_unless_training_is_over_or_it_handed_over_on_our_notice(kids: Kids) -> None:
    done, noticed, sigtermed, quit_ = (kids.start(n, "pass") for n in ("stage0", "stage1", "stage2", "node5"))
    for child in kids.children:
        child.proc.wait(timeout=30)
    handed = [
        ev.HandedOverEvent(stage=s, step=4, to="x", seconds=1.0, pid=c.proc.pid)
        for s, c in ((1, noticed), (2, sigtermed))
    ]
    f = faults()
    # before the last step: only the node that handed over on the launcher's notice left as planned
    deaths = {
        d.name: d for d in f.new_deaths([], [noticed, sigtermed, quit_], lambda: handed, noticed={noticed.proc.pid})
    }
    assert (deaths["stage1"].planned, deaths["stage1"].cause, deaths["stage1"].replaced) == (True, "handover", False)
    # a SIGTERM from outside is a notice too: the node hands over and exits 0, but nobody started a replacement
    assert (deaths["stage2"].planned, deaths["stage2"].cause, deaths["stage2"].replaced) == (False, "unplanned", True)
    assert (deaths["node5"].planned, deaths["node5"].exit_code, deaths["node5"].replaced) == (False, 0, True)
    # stage 0 leaving after the last step is no death at all
    assert f.new_deaths([], [done], lambda: [ev.DoneEvent(step=30)]) == []


def test_without_respawn_nothing_is_replaced(kids: Kids) -> None:
    kill(kids.start("stage2"))
    [death] = faults().new_deaths([], kids.children, no_events, respawn=False)
    assert not death.planned and not death.replaced


def test_nodes_that_keep_dying_before_joining_stop_the_swarm(kids: Kids) -> None:
    f = faults()
    joined = kids.start("stage1")
    seen = {joined.proc.pid: record(joined.proc.pid, 1)}
    for i in range(MAX_DEATHS_BEFORE_JOINING - 1):
        kill(kids.start(f"node{i}"))
        f.new_deaths([], kids.children, no_events, seen=seen)
    # a node joining the swarm shows replacements can start: the count starts again
    newcomer = kids.start("node8")
    seen = {**seen, newcomer.proc.pid: record(newcomer.proc.pid, None, "p8")}
    kill(kids.start("node9"))
    f.new_deaths([], kids.children, no_events, seen=seen)
    kill(joined)  # a node that had joined: a failure to recover from, not a failure to start
    f.new_deaths([], kids.children, no_events, seen=seen)
    for i in range(MAX_DEATHS_BEFORE_JOINING - 2):
        kill(kids.start(f"node1{i}"))
        f.new_deaths([], kids.children, no_events, seen=seen)
    kill(kids.start("node20"))
    with pytest.raises(LocalSwarmError, match=f"{MAX_DEATHS_BEFORE_JOINING} nodes in a row died before joining"):
        f.new_deaths([], kids.children, no_events, seen=seen)


def death(pid: int, stage: int | None, at: float, planned: bool = False, peer: str | None = None) -> Death:
    return Death(
        name=f"node{pid}",
        pid=pid,
        stage=stage,
        exit_code=-9,
        planned=planned,
        cause="unplanned" if not planned else "failure-rate",
        log=f"/tmp/node{pid}.log",
        time=at + 0.3,
        alive_at=at,
        peer_id=peer,
        replaced=True,
    )


def step(n: int, at: float, loss: float = 2.0) -> ev.StepEvent:
    return ev.StepEvent(
        step=n, loss=loss, seconds=0.5, tokens=64, attempt=0, grad_norm=1.0, stage_grad_norms=[1.0] * 4, time=at
    )


def recovery(stage: int, at: float, method: str = "checkfree") -> ev.RecoveryEvent:
    return ev.RecoveryEvent(
        stage=stage, step=4, method=method, sources=[stage - 1, stage + 1], source_grad_norms=[1.0, 1.0],
        bytes_fetched=10, rebuild_seconds=0.1, fetch_seconds=0.1, lr_scale=1.0, time=at,
    )  # fmt: skip


def test_recoveries_are_matched_to_unplanned_deaths_and_planned_kills_alike() -> None:
    events: list[ev.Event] = [
        step(4, 100.0, loss=3.0),
        ev.FailureDetectedEvent(stage=2, peer="p2", by=1, why="rpc", time=100.5),
        ev.KilledEvent(stage=1, step=9, phase="forward", time=110.0),
        recovery(2, 103.0),
        step(5, 104.0, loss=2.5),
        recovery(1, 112.0),
        recovery(3, 122.0),
        step(10, 113.0),
    ]
    deaths = [
        death(501, 2, 100.2),
        death(502, 1, 110.0, planned=True),  # the daemon's own kill: matched through its killed event
        death(503, None, 120.0, peer="p3"),  # a spare that had just taken stage 3: its peers say which
        death(504, 3, 90.0, planned=False),  # an older death of stage 3, already recovered from (none logged)
    ]
    events.append(ev.FailureDetectedEvent(stage=3, peer="p3", by=2, why="heartbeat", time=120.4))
    out = {r["stage"]: r for r in recoveries(events, [], deaths)}
    assert out[2]["killed_in"] == "unplanned"
    assert out[2]["detect_seconds"] == pytest.approx(0.3) and out[2]["recover_seconds"] == pytest.approx(3.8)
    assert (out[2]["loss_before"], out[2]["loss_after"]) == (3.0, 2.5)
    assert out[1]["killed_in"] == "forward"
    assert out[3]["killed_in"] == "unplanned" and out[3]["detect_seconds"] == pytest.approx(0.4)
    # without the launcher's deaths (the old call), an unplanned death explains nothing
    assert {r["stage"] for r in recoveries(events, [])} == {1}


def test_a_handoff_after_a_sigterm_from_outside_is_unplanned() -> None:
    notice = ev.NoticeEvent(stage=2, provider="signal", kind="terminate", seconds_left=30.0, pid=700, time=50.0)
    events: list[ev.Event] = [notice, recovery(2, 52.0, method="handoff"), step(6, 53.0)]
    [r] = recoveries(events, [], [death(700, 2, 52.5)])
    assert r["killed_in"] == "unplanned" and r["handoff_seconds"] == pytest.approx(2.0)
    [r] = recoveries(events, [])
    assert r["killed_in"] == "preempt"


def test_the_summary_lists_every_death_and_keeps_its_other_keys(tmp_path: pathlib.Path) -> None:
    cfg = build_config(overrides={"num_stages": 4})
    events: list[ev.Event] = [step(1, 10.0), recovery(2, 12.0), step(2, 13.0)]
    common = dict(
        stages=[],
        wall=1.0,
        launcher_kills=[],
        committed_samples=[],
        config=cfg,
        threads=1,
        bootstrap=[],
        workdir=tmp_path,
    )
    before = run_summary(events, **common)  # the old call: no deaths
    summary = run_summary(events, deaths=[death(42, 2, 11.0)], **common)
    assert set(summary) == set(before) and before["deaths"] == []
    assert summary["kills"] == [] and summary["recoveries"][0]["killed_in"] == "unplanned"
    [d] = summary["deaths"]
    assert d == {
        "name": "node42", "stage": 2, "pid": 42, "peer_id": None, "exit_code": -9, "signal": "SIGKILL",
        "log": "/tmp/node42.log", "time": 11.3, "alive_at": 11.0, "planned": False, "cause": "unplanned",
        "replaced": True,
    }  # fmt: skip


def test_the_live_table_names_the_unplanned_deaths_and_their_logs() -> None:
    console = Console(width=200, record=True)
    deaths = [death(i, 2, float(i)) for i in range(5)] + [death(99, 1, 1.0, planned=True)]
    console.print(progress_table([], [], num_stages=4, steps=30, bootstrap="/ip4/x", deaths=deaths))
    text = console.export_text()
    assert "unplanned deaths: 5" in text and "node4 (pid 4, stage 2) killed by SIGKILL" in text
    assert "/tmp/node4.log" in text and "node0 " not in text and "node99" not in text  # the newest few, unplanned
    console = Console(width=200, record=True)
    console.print(progress_table([], [], num_stages=4, steps=30, bootstrap="/ip4/x"))
    assert "unplanned" not in console.export_text()


def test_the_stage_log_keeps_the_newest_record_of_each_node() -> None:
    log = StageLog()
    log.observe([record(10, 2, "a"), record(11, None, "b")])
    log.observe([record(11, 3, "b"), record(10, 2, "a", state=StageState.OFFLINE)])
    assert log.by_pid[10].stage == 2 and log.by_pid[11].stage == 3  # offline records do not overwrite


def test_check_children_replaces_every_dead_node(kids: Kids, tmp_path: pathlib.Path) -> None:
    opts = LocalOptions(config=build_config(overrides={"num_stages": 4}), steps=30, workdir=tmp_path / "w", quiet=True)
    swarm = LocalSwarm(opts)
    started: list[int | None] = []
    swarm.start_stage = started.append  # type: ignore[method-assign]  # no real daemons here
    swarm.children = [kids.start("dht"), *(kids.start(f"stage{s}") for s in range(4))]
    swarm.stage_children = {s: swarm.children[s + 1] for s in range(4)}
    swarm.check_children([])
    kill(swarm.stage_children[2])
    swarm.check_children([])
    assert started == [None]
    [d] = swarm.faults.unplanned()
    assert (d.name, d.stage, d.exit_code) == ("stage2", 2, -9)
    swarm.opts.respawn = False
    kill(swarm.stage_children[1], signal.SIGTERM)
    swarm.check_children([])
    assert started == [None] and [d.exit_code for d in swarm.faults.unplanned()] == [-9, -15]


def test_each_kill_of_a_replicated_stage_goes_to_one_replica() -> None:
    from node.recovery.faults import parse_fault

    kills = [parse_fault(s, 4) for s in ("2@90:backward", "2@70", "1@5", "3@1:start")]
    f = LauncherFaults(kills, 0.0, 4, seed=0)
    # one peer per stage: every node carries every node-side kill (each acts only on its own stage)
    assert f.node_faults(2) == ["2@90:backward", "2@70:forward", "1@5:forward"]
    # replicas of stage 2: the first kill (by step) to replica 0, the second to replica 1, none to replica 2
    assert f.node_faults(2, 0) == ["1@5:forward", "2@70:forward"]
    assert f.node_faults(2, 1) == ["1@5:forward", "2@90:backward"]
    assert f.node_faults(2, 2) == ["1@5:forward"]
    f.fired.add("2@70:forward")  # a node started after that kill only gets what has not happened
    assert f.node_faults(2, 0) == ["1@5:forward", "2@90:backward"]


def test_stage0_failures_are_drawn_from_a_stream_of_their_own() -> None:
    """``--stage0-failures``: the launcher's ``--failure-rate`` and ``--preemption-rate`` draws hit stage 0 too,
    and the block stages' draws stay exactly where they were without it."""
    from node.local.preemptions import Preemptions

    attempts: list[ev.Event] = [ev.AttemptEvent(step=s, attempt=0) for s in range(1, 41)]

    def kills(stage0: bool) -> list[tuple[int, int]]:
        f = LauncherFaults([], 0.2, 4, seed=3, stage0=stage0)
        f.inject(attempts, [], [], [])  # nothing serves a stage here: the kills are only due (0.1-0.5 s later)
        return sorted((step, stage) for _, stage, step, _ in f._due_kills)

    blocks, every = kills(False), kills(True)
    assert all(stage != 0 for _, stage in blocks) and blocks  # --failure-rate alone: block stages only
    assert [k for k in every if k[1] != 0] == blocks
    assert 0 < sum(stage == 0 for _, stage in every) < 40

    class Node:  # stands in for a node: the notice (SIGTERM) is only recorded
        def __init__(self, stage: int) -> None:
            self.stage, self.pid = stage, 1000 + stage
            self.proc = self
            self.signals: list[int] = []

        def poll(self) -> None:
            return None

        def send_signal(self, sig: int) -> None:
            self.signals.append(sig)

    def notices(stage0: bool) -> list[tuple[int, int]]:
        p = Preemptions([], [], rate=0.2, num_stages=4, seed=3, stage0=stage0)
        nodes = {s: Node(s) for s in range(4)}
        p.inject(attempts, {}, serving=nodes.get)  # type: ignore[arg-type]
        # every node given a notice is known, so its exit 0 after handing over counts as planned
        assert p.noticed == {1000 + stage for _, stage, _, _ in p._due}
        return sorted((step, stage) for _, stage, step, _ in p._due)

    assert [n for n in notices(True) if n[1] != 0] == notices(False)
    assert any(stage == 0 for _, stage in notices(True)) and all(stage for _, stage in notices(False))
