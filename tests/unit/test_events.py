"""Typed events: what a daemon writes is what readers parse, bad lines are skipped, the README table is current."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from node.events import (
    EVENT_TYPES,
    README_BEGIN,
    README_END,
    DoneEvent,
    EventLog,
    KilledEvent,
    StepEvent,
    dump,
    markdown_table,
    of_type,
    parse_event,
    read_events,
)

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_events_round_trip_through_the_file(tmp_path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    step = StepEvent(step=3, loss=2.5, seconds=0.1, tokens=64, attempt=9, grad_norm=1.0, stage_grad_norms=[0.5, 0.5])
    log.emit(step)
    log.emit(KilledEvent(stage=2, step=4, phase="forward"))
    log.emit(DoneEvent(step=4))
    events = read_events(tmp_path / "events.jsonl")
    assert events[0] == step and of_type(events, DoneEvent) == [DoneEvent(step=4, time=events[2].time)]
    assert events[1].pid == os.getpid() and events[1].by is None
    first_line = (tmp_path / "events.jsonl").read_text().splitlines()[0]
    assert dump(step)["event"] == "step" and json.loads(first_line) == dump(step)


def test_half_written_unknown_and_malformed_lines_are_skipped(tmp_path) -> None:
    path = tmp_path / "events.jsonl"
    good = DoneEvent(step=1).model_dump_json()
    path.write_text("\n".join([good, '{"event": "step", "step": "x"}', '{"event": "nope"}', "not json", good[:10]]))
    assert read_events(path) == [parse_event(good)]
    assert read_events(tmp_path / "missing.jsonl") == []
    with pytest.raises(ValueError, match="step"):
        parse_event('{"event": "done"}')


def test_no_event_without_a_kind_and_every_kind_is_unique() -> None:
    kinds = [cls.model_fields["event"].default for cls in EVENT_TYPES]
    assert len(set(kinds)) == len(kinds)


def test_the_readme_shows_the_current_events() -> None:
    text = README.read_text(encoding="utf-8")
    assert README_BEGIN in text and README_END in text, "README.md needs the events markers"
    shown = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert shown == markdown_table() + "\n", "README.md's event table is stale: python -m node.events --write-readme"
