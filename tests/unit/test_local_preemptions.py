"""``local --preempt`` specs, and what the node first started for a preempted stage is told to watch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from node import events as ev
from node.local.metadata import AwsMetadataServer, GcpMetadataServer
from node.local.preemptions import Preemptions, PreemptSpec, parse_preempt
from node.options import PreemptionMode, PreemptionOptions
from node.wire.records import StageRecord, StageState


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("2@10", PreemptSpec(2, 10, 30.0, "aws")),
        ("0@3:5", PreemptSpec(0, 3, 5.0, "aws")),
        ("3@7:1.5:azure", PreemptSpec(3, 7, 1.5, "azure")),
        ("1@1:30:signal", PreemptSpec(1, 1, 30.0, "signal")),
        ("2@10:gcp", PreemptSpec(2, 10, 30.0, "gcp")),
        ("2@10:0:signal", PreemptSpec(2, 10, 0.0, "signal")),  # SIGKILL right after the notice
        ("2@10:30:aws:soft@4", PreemptSpec(2, 10, 30.0, "aws", 4)),  # a rebalance recommendation at step 4
        ("2@10:gcp:soft@9", PreemptSpec(2, 10, 30.0, "gcp", 9)),  # a live migration at step 9
        ("1@3:soft@1", PreemptSpec(1, 3, 30.0, "aws", 1)),
    ],
)
def test_preempt_specs(text: str, spec: PreemptSpec) -> None:
    assert parse_preempt(text, 4) == spec


@pytest.mark.parametrize(
    "bad",
    [
        "4@10", "2@0", "2", "x@1", "2@10:9999", "2@10:30:ibm",
        "2@10:30:signal:soft@4", "2@10:30:azure:soft@4",  # no soft notices from signals or Azure
        "2@10:soft@10", "2@10:soft@0", "2@10:soft@", "2@10:soft",  # the soft notice comes first, from step 1
    ],
)  # fmt: skip
def test_bad_preempt_specs(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_preempt(bad, 4)


def test_only_the_first_node_of_a_preempted_stage_watches_its_server() -> None:
    default = PreemptionOptions(mode=PreemptionMode.SIGNAL)
    pre = Preemptions([PreemptSpec(2, 5, 30.0, "gcp"), PreemptSpec(1, 5, 30.0, "signal")], kill_log=[])
    pre.start()
    try:
        first = pre.options_for(2, default)
        assert first.mode is PreemptionMode.GCP and first.metadata_url == pre.servers[2].url
        assert pre.options_for(1, default).mode is PreemptionMode.SIGNAL and 1 not in pre.servers
        assert pre.options_for(3, default) == default and pre.options_for(None, default) == default
        pre.fired.add(2)  # once the notice is out, a replacement watches nothing special
        assert pre.options_for(2, default) == default
    finally:
        pre.stop()
    with pytest.raises(ValueError):
        Preemptions([PreemptSpec(2, 5), PreemptSpec(2, 9)], kill_log=[])


def test_str_round_trips() -> None:
    for spec in (PreemptSpec(2, 10, 30.0, "aws", 4), PreemptSpec(0, 3, 1.5, "signal")):
        assert parse_preempt(str(spec), 4) == spec


def _spare(peer: str) -> StageRecord:
    return StageRecord(
        stage=None, num_stages=4, peer_id=peer, grpc_address="127.0.0.1:9", state=StageState.SPARE,
        committed_step=0, config_fingerprint="f", version="1",
    )  # fmt: skip


def _attempts(step: int) -> list[ev.Event]:
    return [ev.AttemptEvent(step=s, attempt=1) for s in range(1, step + 1)]


def test_a_soft_notice_comes_first_and_brings_a_replacement_only_when_no_spare_waits() -> None:
    pre = Preemptions([PreemptSpec(2, 6, 30.0, "aws", 3), PreemptSpec(1, 6, 30.0, "gcp", 4)], kill_log=[])
    pre.start()
    nodes = {s: SimpleNamespace(proc=SimpleNamespace(pid=100 + s, poll=lambda: None)) for s in range(4)}
    aws, gcp = pre.servers[2], pre.servers[1]
    assert isinstance(aws, AwsMetadataServer) and isinstance(gcp, GcpMetadataServer)
    try:
        assert pre.inject(_attempts(2), nodes, records=[]) == 0  # nothing due yet
        assert aws._rebalance is None and aws._action is None
        # step 3: stage 2's rebalance recommendation; no spare waits, so a replacement starts with it
        assert pre.inject(_attempts(3), nodes, records=[]) == 1
        assert aws._rebalance is not None and aws._action is None and pre.soft_fired == {2}
        assert pre.inject(_attempts(3), nodes, records=[]) == 0  # once only
        # step 4: stage 1's live migration, with a spare waiting (it stands by): no replacement
        assert pre.inject(_attempts(4), nodes, records=[_spare("s")]) == 0
        assert gcp._values["instance/maintenance-event"] == "MIGRATE_ON_HOST_MAINTENANCE" and pre.soft_fired == {1, 2}
        assert gcp._values["instance/preempted"] == "FALSE"
        # step 6: the hard notices; stage 2 got its replacement with the soft notice, stage 1 gets one now
        assert pre.inject(_attempts(6), nodes, records=[_spare("s")]) == 1
        assert aws._action is not None and gcp._values["instance/preempted"] == "TRUE" and pre.fired == {1, 2}
    finally:
        pre.stop()
