"""``local --preempt`` specs, and what the node first started for a preempted stage is told to watch."""

from __future__ import annotations

import pytest

from node.local.preemptions import Preemptions, PreemptSpec, parse_preempt
from node.options import PreemptionMode, PreemptionOptions


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("2@10", PreemptSpec(2, 10, 30.0, "aws")),
        ("0@3:5", PreemptSpec(0, 3, 5.0, "aws")),
        ("3@7:1.5:azure", PreemptSpec(3, 7, 1.5, "azure")),
        ("1@1:30:signal", PreemptSpec(1, 1, 30.0, "signal")),
        ("2@10:gcp", PreemptSpec(2, 10, 30.0, "gcp")),
        ("2@10:0:signal", PreemptSpec(2, 10, 0.0, "signal")),  # SIGKILL right after the notice
    ],
)
def test_preempt_specs(text: str, spec: PreemptSpec) -> None:
    assert parse_preempt(text, 4) == spec


@pytest.mark.parametrize("bad", ["4@10", "2@0", "2", "x@1", "2@10:9999", "2@10:30:ibm"])
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
