"""Where a node serves, by throughput (``--placement throughput``): pure, deterministic functions over records.

In the way of Petals' block selection, a swarm runs at the speed of its slowest stage, so extra nodes go where
throughput is lowest. A block stage's throughput is the sum of its peers' measured throughputs (microbatches
per second, announced in their records); a peer that has not measured yet (it just joined) counts as the
swarm's average peer, or 1.0 when nobody has measured. Stage 0 has exactly one peer and is never joined.

- :func:`join_stage`: a spare with no vacant stage to claim joins the block stage with the least throughput,
  as a replica. Spares waiting at the same time spread out: each computes the same greedy fill over the
  spares in peer-id order (every pick adds an average peer to the stage it picks) and takes its own pick.
- :func:`move_stage`: a replica leaves its stage (never its last peer, and never while a peer joins or
  rebuilds a stage: its view is about to change) when
  - a block stage is vacant and no spare waits to claim it: one replica, the lowest peer id of the stage with
    the most peers (the lowest such stage), moves to claim it (the stage is then rebuilt as after any death);
  - or moving to the stage with the least throughput raises the swarm's minimum stage throughput by more
    than ``margin`` (hysteresis, so that noise in the measurements moves nobody): the lowest peer id of the
    richest stage that has a peer to spare moves, one node per round.

  A peer to spare is an in-sync one: a stage is never left to replicas that lag behind it.
"""

from __future__ import annotations

from collections.abc import Iterable

from node.stage.routing import DEFAULT_THROUGHPUT
from node.wire.records import CLAIMING_STATES, SERVING_STATES, StageRecord, StageState

MOVE_MARGIN = 0.2  # a move must raise the swarm's slowest stage by more than this fraction
OCCUPYING = SERVING_STATES | CLAIMING_STATES  # a peer serving a stage, or taking it (joiners count at once)


def average_throughput(records: Iterable[StageRecord]) -> float:
    """The average measured throughput of the swarm's peers (DEFAULT_THROUGHPUT when none has measured)."""
    measured = [r.throughput for r in records if r.throughput]
    return sum(measured) / len(measured) if measured else DEFAULT_THROUGHPUT


def stage_throughputs(records: Iterable[StageRecord], num_stages: int) -> dict[int, float]:
    """Block stage -> the sum of its peers' throughputs (0.0: nobody serves or takes it)."""
    records = list(records)
    average = average_throughput(records)
    totals = dict.fromkeys(range(1, num_stages), 0.0)
    for r in records:
        if r.stage in totals and r.state in OCCUPYING:
            totals[r.stage] += r.throughput or average
    return totals


def _slowest(totals: dict[int, float]) -> int:
    return min(totals, key=lambda s: (totals[s], s))


def join_stage(records: Iterable[StageRecord], me: str, num_stages: int) -> int | None:
    """The block stage spare ``me`` joins as a replica when no stage is vacant (None: no block stage is served
    yet, so there is nothing to copy from). ``records``: the swarm's records, spares included."""
    records = list(records)
    totals = stage_throughputs(records, num_stages)
    if not any(totals.values()):
        return None
    average = average_throughput(records)
    spares = sorted({r.peer_id for r in records if r.state == StageState.SPARE} | {me})
    for spare in spares:
        pick = _slowest({s: t for s, t in totals.items() if t > 0})  # served stages only: a vacancy is claimed
        if spare == me:
            return pick
        totals[pick] += average
    return None


def in_sync(records: Iterable[StageRecord], stage: int, step: int) -> list[str]:
    """The peer ids serving ``stage`` whose records are at most one step behind ``step`` (a record is up to a
    refresh period old): replicas that can carry the stage on. A replica that lags further is catching up,
    and a stage left to it alone would wait for a state that has gone."""
    return sorted(r.peer_id for r in records if r.stage == stage and r.state in SERVING_STATES
                  and r.committed_step >= step - 1)  # fmt: skip


def move_stage(
    records: Iterable[StageRecord], me: StageRecord, num_stages: int, margin: float = MOVE_MARGIN
) -> int | None:
    """The stage replica ``me`` should move to now (None: stay). ``records``: the swarm's records (``me``'s
    committed step is compared with theirs, so pass ``me`` as the DHT shows it, not fresher)."""
    records = [r for r in records if r.peer_id != me.peer_id] + [me]
    if me.stage is None or me.stage == 0 or me.state not in SERVING_STATES:
        return None
    mates = in_sync(records, me.stage, me.committed_step)
    if len(mates) < 2:
        return None  # never leave a stage without another peer that holds its current state
    if any(r.state in CLAIMING_STATES for r in records if r.stage is not None):
        return None  # a join or rebuild under way changes the stages' peers and throughputs: decide after it
    totals = stage_throughputs(records, num_stages)
    vacant = [s for s, t in totals.items() if t == 0]
    if vacant:
        if any(r.state == StageState.SPARE for r in records):
            return None  # a spare claims it
        # the donor is chosen by peer count, not measured throughput: every replica must name the same donor
        # from its own view, and two stages of near-equal throughput would each see themselves as the richest
        served = {s: sum(r.stage == s and r.state in SERVING_STATES for r in records) for s in totals}
        donor = max((s for s in served if served[s] > 1), key=lambda s: (served[s], -s))
        return vacant[0] if me.stage == donor and mates[0] == me.peer_id else None
    if mates[0] != me.peer_id:
        return None  # one move per round: the lowest peer id ...
    # ... of one stage, the richest of those with a peer to spare: two stages moving at once overshoot
    donors = {s: t for s, t in totals.items() if len(in_sync(records, s, me.committed_step)) > 1}
    if me.stage != max(donors, key=lambda s: (donors[s], -s)):
        return None
    target = _slowest({s: t for s, t in totals.items() if s != me.stage})
    mine = me.throughput or average_throughput(records)
    after = dict(totals)
    after[me.stage] -= mine
    after[target] += mine
    return target if min(after.values()) > (1 + margin) * min(totals.values()) else None
