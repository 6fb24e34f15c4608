"""The live progress table of ``swarm-node local``: the last step, its loss and throughput, each stage's
state as the DHT reports it, and the deaths nobody planned (with the log to read)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text

from node import events as ev
from node.local.faults import Death
from node.wire.records import StageRecord

SHOWN_DEATHS = 3  # the newest unplanned deaths listed under the table; older ones are only counted


def progress_table(
    events: list[ev.Event],
    records: list[StageRecord],
    *,
    num_stages: int,
    steps: int,
    bootstrap: str,
    deaths: Sequence[Death] = (),
) -> Table:
    """One row: step, loss, tokens/s and the state of every stage (``online×2`` for two replicas, ``a+b`` for
    peers in different states); under it,
    the newest of ``deaths`` that were not planned: who, which stage, the exit code or signal, and the log."""
    done = ev.of_type(events, ev.StepEvent)
    table = Table(title=f"swarm-node local: {num_stages} stages, bootstrap {bootstrap}")
    table.add_column("step")
    table.add_column("loss")
    table.add_column("tokens/s")
    for s in range(num_stages):
        table.add_column(f"stage {s}")
    if done:
        last = done[-1]
        tps = last.tokens / max(last.seconds, 1e-9)
        row = [f"{last.step}/{steps}", f"{last.loss:.4f}", f"{tps:,.0f}"]
    else:
        row = [f"0/{steps}", "-", "-"]
    states: dict[int, list[str]] = {}
    for r in records:
        if r.stage is not None:
            states.setdefault(r.stage, []).append(r.state.value)
    row += [_peers(states[s]) if s in states else "starting" for s in range(num_stages)]
    table.add_row(*row)
    unplanned = [d for d in deaths if not d.planned]
    if unplanned:
        # Text, not markup: a log path may hold brackets
        caption = Text(f"unplanned deaths: {len(unplanned)}", style="bold red")
        for d in unplanned[-SHOWN_DEATHS:]:
            caption.append("\n")
            caption.append(d.describe() + (", replaced" if d.replaced else ""), style="red")
            caption.append(f": see {d.log}")
        table.caption = caption
        table.caption_justify = "left"
    return table


def _peers(states: list[str]) -> str:
    """The states of one stage's peers: ``online``, ``online×2``, ``online×2+joining``."""
    counts = {state: states.count(state) for state in dict.fromkeys(states)}
    return "+".join(state if n == 1 else f"{state}×{n}" for state, n in counts.items())
