"""``swarm-node status``: the swarm as the DHT shows it (reads the DHT only, never a daemon)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from node.dht.directory import SwarmDirectory
from node.dht.factory import make_dht
from node.security.keys import NodeCredentials
from node.wire.records import StageRecord


def read_swarm(
    initial_peers: list[str], swarm: str, credentials: NodeCredentials | None = None
) -> tuple[list[StageRecord], int]:
    """Joins the DHT as a client (a member's, with ``credentials``), reads every stage record of ``swarm``;
    returns (records, malformed)."""
    dht = make_dht(initial_peers, None, credentials, client_mode=True)
    try:
        directory = SwarmDirectory(dht, swarm, credentials)
        records = directory.records()
        return records, directory.malformed_seen
    finally:
        dht.shutdown()


def records_table(records: list[StageRecord], title: str = "swarm") -> Table:
    table = Table(title=title)
    for col in (
        "stage",
        "peer",
        "address",
        "state",
        "committed",
        "pid",
        "metrics",
        "last recovery",
        "swap partner",
        "stage-0 copy",
    ):
        table.add_column(col)
    for r in records:
        rec = (
            f"{r.last_recovery.method} @ step {r.last_recovery.step} ({r.last_recovery.seconds:.1f}s)"
            if r.last_recovery
            else "-"
        )
        table.add_row(
            "spare" if r.stage is None else str(r.stage),
            r.peer_id[-12:],
            r.grpc_address,
            r.state.value,
            str(r.committed_step),
            str(r.pid or "-"),
            "-" if r.metrics_port is None else f":{r.metrics_port}",
            rec,
            "-" if r.swap_partner is None else str(r.swap_partner),
            "-" if r.replica_step is None else f"step {r.replica_step}",
        )
    return table


def print_status(records: list[StageRecord], malformed: int, as_json: bool) -> None:
    if as_json:
        out: dict[str, Any] = {"stages": [r.to_json() for r in records], "malformed_records": malformed}
        print(json.dumps(out, indent=2))
        return
    console = Console()
    if not records:
        console.print("no stage records found in the DHT")
        return
    console.print(records_table(records))
