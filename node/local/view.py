"""The live progress table of ``swarm-node local``: the last step, its loss and throughput, and each stage's
state as the DHT reports it."""

from __future__ import annotations

from rich.table import Table

from node import events as ev
from node.wire.records import StageRecord


def progress_table(
    events: list[ev.Event], records: list[StageRecord], *, num_stages: int, steps: int, bootstrap: str
) -> Table:
    """One row: step, loss, tokens/s and the state of every stage (``a+b`` when two nodes claim one)."""
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
    by_stage: dict[int, str] = {}
    for r in records:
        by_stage[r.stage] = r.state.value if r.stage not in by_stage else by_stage[r.stage] + "+" + r.state.value
    row += [by_stage.get(s, "starting") for s in range(num_stages)]
    table.add_row(*row)
    return table
