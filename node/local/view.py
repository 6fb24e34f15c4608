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
    """One row: step, loss, tokens/s and the state of every stage (``a+b`` when two nodes claim one); under it,
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
    by_stage: dict[int, str] = {}
    for r in records:
        by_stage[r.stage] = r.state.value if r.stage not in by_stage else by_stage[r.stage] + "+" + r.state.value
    row += [by_stage.get(s, "starting") for s in range(num_stages)]
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
