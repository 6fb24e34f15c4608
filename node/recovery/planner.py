"""Recovery planning as pure, deterministic functions over what the DHT shows (no network here).

A *vacant* stage has no peer serving or rebuilding it. A spare node takes the lowest vacant stage, and when
two spares claim the same stage the lower peer id wins. The method that rebuilds a block stage depends on
which block stages are still alive:

==============  ===========================================================================
method          when
==============  ===========================================================================
``fresh``       the swarm has not committed any step yet: the seed's initial weights are exact
``checkfree``   live block stages on both sides: W = (g₊·W₊ + g₋·W₋)/(g₊ + g₋), ε = 1e-4 on each g
``copy``        a live block stage on one side only (first/last block stage, or a lost run at an edge)
``random``      ``--recovery random`` (or ``none``), or no live block stage at all: fresh random weights
``partner_copy``  checkfree+: an edge block stage (1, 2, S-2, S-1) copies its live swap partner
``embedding_replica``  checkfree+: stage 0 from the freshest copy of its embedding, final norm, LM head
                (and AdamW state) held by stages 1 and S-1
``checkpoint``  ``--recovery checkpoint`` (any stage, also at start-up: a restarted swarm resumes): the
                stage's newest checkpoint; stage 0 then rolls the whole swarm back to the newest
                checkpoint every stage has
``replica``     the stage is served by another live peer: this node joins it as one more replica, with an
                exact copy of a live replica's state (block stages; stage 0 has one peer)
``resume``      ``--resume``: the swarm has not moved past the newest complete swarm snapshot (a swarm of
                new nodes after the whole swarm was lost): the stage's exact part of that snapshot
``handoff``     the stage's owner got a preemption notice and is handing over: its exact state (weights,
                AdamW state, lr scale, committed step), under every strategy and for every stage; or,
                with nobody to hand over to in time, the state it left on a route neighbour
``snapshot``    ``--recovery ladder`` (any stage): the full state the stage last sent its snapshot holder
                (every ``--snapshot-neighbour-every`` K committed steps), at most K steps stale and never
                from a step the swarm has not committed; the stage then joins at the swarm's step. Before
                its first snapshot arrives (at most K steps in): the seed's initial state, built locally
==============  ===========================================================================

Under ``--recovery ladder`` the methods form a ladder, best rung first: a live replica, a handoff (or a parked
state), a neighbour snapshot, then CheckFree (or a copy at an edge), then random weights.

Stage 0 (data, embedding, final norm, LM head) cannot be rebuilt from block stages; plain CheckFree reports
it as ``unrecoverable`` and training stops with that message.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from node.options import RecoveryStrategy
from node.topology import nearest_live_block_stages, neighbour_stages, swap_partner
from node.wire.records import CLAIMING_STATES, SERVING_STATES, StageRecord, StageState, same_swarm

OCCUPYING_STATES = SERVING_STATES | {StageState.RECOVERING}
EPSILON = 1e-4
LONE_CLAIM_SETTLE_SECONDS = 0.2  # a lone spare's wait after its claim is stored (see claim_settle_seconds)


class Method(enum.StrEnum):
    FRESH = "fresh"
    CHECKFREE = "checkfree"
    COPY = "copy"
    RANDOM = "random"
    PARTNER_COPY = "partner_copy"
    EMBEDDING_REPLICA = "embedding_replica"
    CHECKPOINT = "checkpoint"
    HANDOFF = "handoff"
    RESUME = "resume"
    REPLICA = "replica"
    SNAPSHOT = "snapshot"
    UNRECOVERABLE = "unrecoverable"


# methods that set the stage back (or start it afresh) against ones that continue it exactly
LOSSY = frozenset(
    {Method.CHECKFREE, Method.COPY, Method.RANDOM, Method.PARTNER_COPY, Method.EMBEDDING_REPLICA, Method.SNAPSHOT}
)
EXACT = frozenset({Method.HANDOFF, Method.REPLICA, Method.RESUME})


@dataclass(frozen=True)
class RecoveryPlan:
    stage: int
    method: Method
    sources: tuple[int, ...]  # stages whose committed weights are fetched (empty for fresh/random)
    reason: str


def live_stages(
    records: Iterable[StageRecord], *, fingerprint: str, num_stages: int, suspects: frozenset[str] = frozenset()
) -> frozenset[int]:
    """Stages with at least one serving peer not under suspicion."""
    return frozenset(
        r.stage
        for r in same_swarm(
            records, fingerprint=fingerprint, num_stages=num_stages, states=SERVING_STATES, exclude=suspects
        )
        if r.stage is not None
    )


def vacant_stages(
    records: Iterable[StageRecord], *, fingerprint: str, num_stages: int, suspects: frozenset[str] = frozenset()
) -> list[int]:
    """Stages that nobody serves or is rebuilding, lowest first."""
    occupied = {
        r.stage
        for r in same_swarm(
            records, fingerprint=fingerprint, num_stages=num_stages, states=OCCUPYING_STATES, exclude=suspects
        )
        if r.stage is not None
    }
    return [s for s in range(num_stages) if s not in occupied]


def declared_dead(
    records: Iterable[StageRecord], suspicions: Mapping[str, set[str]], num_stages: int
) -> frozenset[str]:
    """Peers that a live route neighbour reports dead (stage 0 watches every stage): their records are
    ignored until they expire, so a spare sees the vacancy without waiting for that."""
    by_peer = {r.peer_id: r for r in records}
    dead = set()
    for peer, observers in suspicions.items():
        suspect = by_peer.get(peer)
        if suspect is None or suspect.stage is None:
            continue
        for observer in observers:
            o = by_peer.get(observer)
            if (
                o is not None
                and o.state in SERVING_STATES
                and o.stage is not None
                and o.peer_id not in suspicions
                and suspect.stage in neighbour_stages(o.stage, num_stages)
            ):
                dead.add(peer)
                break
    return frozenset(dead)


def claim_winner(records: Iterable[StageRecord], stage: int, *, fingerprint: str, num_stages: int) -> str | None:
    """The peer that owns ``stage`` among claimants: a live peer if any, else the lowest-id rebuilder."""
    same = [r for r in same_swarm(records, fingerprint=fingerprint, num_stages=num_stages) if r.stage == stage]
    live = sorted(r.peer_id for r in same if r.state in SERVING_STATES)
    if live:
        return live[0]
    rebuilding = sorted(r.peer_id for r in same if r.state == StageState.RECOVERING)
    return rebuilding[0] if rebuilding else None


def claim_settle_seconds(records: Iterable[StageRecord], me: str, refresh_seconds: float) -> float:
    """How long a spare that just stored its claim of a vacant stage waits before :func:`claim_winner` decides:
    one refresh period while its view holds another spare or claimant (a rival nudged at the same moment
    stores its claim within it, and one that missed the nudge polls within half of it); with no rival in view
    (a swarm with one spare) only ``LONE_CLAIM_SETTLE_SECONDS``. A spare its view missed can still claim: it
    waits the full period, by when this claim is stored and usually serving, which :func:`claim_winner`
    prefers; if both still build the stage, the newer claim fences the older one."""
    rivals = any(r.peer_id != me and (r.state == StageState.SPARE or r.state in CLAIMING_STATES) for r in records)
    return refresh_seconds if rivals else min(refresh_seconds, LONE_CLAIM_SETTLE_SECONDS)


def usable_snapshot(
    stage: int,
    live: frozenset[int],
    committed_step: int,
    snapshots: Mapping[int, tuple[int, int]] | None,
    max_stale: int,
) -> tuple[int, int] | None:
    """(holder stage, step) of ``stage``'s neighbour snapshot if a live stage holds one that the swarm has
    committed (never one from the future) and that is at most ``max_stale`` steps behind it; else None."""
    holder, step = (snapshots or {}).get(stage, (None, 0))
    if holder is None or holder not in live or holder == stage:
        return None
    return (holder, step) if 0 < step <= committed_step and committed_step - step <= max_stale else None


def plan_recovery(
    stage: int,
    num_stages: int,
    live: frozenset[int],
    committed_step: int,
    strategy: RecoveryStrategy = RecoveryStrategy.CHECKFREE,
    replicas: Mapping[int, int] | None = None,
    handing_over: frozenset[int] = frozenset(),
    parked: Mapping[int, tuple[int, int]] | None = None,
    resume_step: int | None = None,
    served: bool = False,
    snapshots: Mapping[int, tuple[int, int]] | None = None,
    max_stale: int = 0,
) -> RecoveryPlan:
    """How to rebuild ``stage`` given the live stages and the swarm's committed step.

    ``replicas`` maps each live stage holding a copy of stage 0 to that copy's committed step (checkfree+);
    ``handing_over`` are the stages whose preempted owner is handing its state over; ``parked`` maps a stage to
    (the live stage holding the state its preempted owner left there, that state's committed step);
    ``resume_step`` is the step of the newest complete swarm snapshot when resuming (``--resume``);
    ``served``: another live peer serves ``stage`` (this node joins it as a replica);
    ``snapshots`` maps a stage to (the live stage holding its newest neighbour snapshot, that snapshot's
    committed step), used under ``--recovery ladder`` when at most ``max_stale`` steps behind ``committed_step``.
    """
    strategy = RecoveryStrategy(strategy)
    if served and stage != 0:  # exact, and nothing is lost: no rebuild at all
        return RecoveryPlan(stage, Method.REPLICA, (stage,), "another live replica of the stage: an exact copy")
    if stage in handing_over:  # exact, so it beats every rebuild, whatever the strategy
        return RecoveryPlan(stage, Method.HANDOFF, (stage,), "the preempted owner hands its exact state over")
    holder, step = (parked or {}).get(stage, (None, 0))
    if holder is not None and holder in live:
        why = f"the state its preempted owner left on stage {holder} at step {step} ({committed_step - step} stale)"
        return RecoveryPlan(stage, Method.HANDOFF, (holder,), why)
    if resume_step is not None and committed_step in (0, resume_step):
        # the swarm is (re)starting from the snapshot: every stage must take its part of the same step
        return RecoveryPlan(stage, Method.RESUME, (), f"the swarm snapshot of step {resume_step}")
    if strategy is RecoveryStrategy.CHECKPOINT:
        return RecoveryPlan(
            stage, Method.CHECKPOINT, (), "the stage's newest checkpoint; the swarm rolls back to a common one"
        )
    if committed_step == 0:
        return RecoveryPlan(stage, Method.FRESH, (), "no step committed yet: the seed's initial weights are exact")
    if strategy is RecoveryStrategy.LADDER and (snapshot := usable_snapshot(stage, live, committed_step,
                                                                             snapshots, max_stale)):  # fmt: skip
        holder, step = snapshot
        why = f"the snapshot of step {step} held by stage {holder} ({committed_step - step} stale)"
        return RecoveryPlan(stage, Method.SNAPSHOT, (holder,), why)
    if strategy is RecoveryStrategy.LADDER and committed_step <= max_stale:
        # before its first snapshot arrives, a stage's snapshot is the seed's initial state, which every node
        # can build: stage 0 is not lost, and a block stage gets its own weights, not an average of others
        why = f"the seed's initial state (step 0, {committed_step} stale): no snapshot of it arrived yet"
        return RecoveryPlan(stage, Method.SNAPSHOT, (), why)
    if strategy in (RecoveryStrategy.NONE, RecoveryStrategy.RANDOM):
        return RecoveryPlan(stage, Method.RANDOM, (), f"--recovery {strategy}: fresh random weights")
    if stage == 0:
        holders = {s: step for s, step in (replicas or {}).items() if s in live}
        if strategy is RecoveryStrategy.CHECKFREE_PLUS and holders:
            src = min(holders, key=lambda s: (-holders[s], s))
            return RecoveryPlan(
                0, Method.EMBEDDING_REPLICA, (src,), f"copy of stage 0 held by stage {src} (step {holders[src]})"
            )
        if strategy is RecoveryStrategy.CHECKFREE_PLUS:
            why = "no live stage holds a copy of stage 0"
        elif strategy is RecoveryStrategy.LADDER:
            why = f"no live stage holds a snapshot of it at most {max_stale} steps stale"
        else:
            why = "plain CheckFree cannot rebuild it from block stages (use --recovery checkfree+ or ladder)"
        return RecoveryPlan(0, Method.UNRECOVERABLE, (), f"stage 0 holds the data, embedding and LM head; {why}")
    below, above = nearest_live_block_stages(stage, num_stages, live)
    if strategy is RecoveryStrategy.COPY and (below is not None or above is not None):  # the ablation baseline
        src = below if below is not None else above
        return RecoveryPlan(stage, Method.COPY, (src,), f"--recovery copy: copy of stage {src}")
    partner = swap_partner(stage, num_stages, strategy.out_of_order)
    if partner is not None and partner in live:
        return RecoveryPlan(
            stage, Method.PARTNER_COPY, (partner,), f"copy of swap partner {partner}, trained on the same positions"
        )
    if below is not None and above is not None:
        return RecoveryPlan(
            stage, Method.CHECKFREE, (below, above), f"gradient-norm weighted average of stages {below} and {above}"
        )
    if below is not None or above is not None:
        src = below if below is not None else above
        return RecoveryPlan(stage, Method.COPY, (src,), f"only one live block neighbour: copy of stage {src}")
    return RecoveryPlan(stage, Method.RANDOM, (), "no live block stage to rebuild from")
