"""The benchmark's pure parts: failure schedules, time to target, live curves."""

from __future__ import annotations

from node.bench.live import curve_from_events
from node.bench.results import CurvePoint, default_target, time_to_target
from node.bench.simulate import failure_schedule


def test_failure_schedule_is_seeded_and_spares_stage_0() -> None:
    a = failure_schedule(0, 0.1, 500, 7)
    assert a == failure_schedule(0, 0.1, 500, 7)
    assert a != failure_schedule(1, 0.1, 500, 7)
    flat = [s for it in a for s in it]
    assert 0 not in flat and set(flat) <= set(range(1, 7))
    assert 0.05 < len(flat) / (500 * 6) < 0.15
    assert failure_schedule(0, 0.0, 50, 7) == [[]] * 50


def _curve(*losses: float) -> list[CurvePoint]:
    return [CurvePoint(iteration=10 * i, step=10 * i, seconds=2.0 * i, val_loss=v) for i, v in enumerate(losses)]


def test_time_to_target_is_the_first_point_at_or_below() -> None:
    curve = _curve(5.0, 4.0, 3.0, 3.5, 2.0)
    assert time_to_target(curve, 3.0) == (20, 4.0)
    assert time_to_target(curve, 1.0) == (None, None)
    # two thirds of 40 iterations is ~26.7: the point at iteration 30
    assert default_target(curve, 40) == 3.5


def test_live_curve_excludes_evaluation_time() -> None:
    events = [
        {"event": "eval", "time": 100.0, "step": 0, "val_loss": 5.0, "seconds": 1.0},
        {"event": "step", "time": 101.0, "step": 1, "seconds": 1.0},
        {"event": "step", "time": 102.0, "step": 2, "seconds": 1.0},
        {"event": "eval", "time": 103.5, "step": 2, "val_loss": 4.0, "seconds": 1.5},
        {"event": "step", "time": 104.5, "step": 3, "seconds": 1.0},
        {"event": "rolled_back", "time": 105.0, "step": 2},
        {"event": "eval", "time": 106.5, "step": 2, "val_loss": 4.0, "seconds": 0.5},
    ]
    curve = curve_from_events(events)
    assert [(p.iteration, p.step) for p in curve] == [(0, 0), (2, 2), (3, 2)]
    assert [p.seconds for p in curve] == [0.0, 2.0, 4.5]


def test_higher_rates_fail_where_lower_rates_do() -> None:
    low, high = failure_schedule(3, 0.01, 400, 7), failure_schedule(3, 0.05, 400, 7)
    assert all(set(a) <= set(b) for a, b in zip(low, high, strict=True))
    assert sum(map(len, low)) < sum(map(len, high))
