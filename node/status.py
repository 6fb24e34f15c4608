"""``swarm-node status``: the swarm's stage records, from a stage node over gRPC or from the DHT.

Two ways to read the swarm:

- ``--peer HOST:PORT`` (fast: no DHT, no libp2p daemon, no torch): one ``GetStatus(swarm=True)`` call to a
  stage daemon, which answers with the records its presence last read from the DHT (at most one refresh
  period old). With keys the call is mutual TLS with the caller's bundle, like any member's; the server's
  name is learnt from a first TLS handshake checked against the swarm CA, then pinned for the gRPC channel.
  Every record of the reply is validated like a DHT record (:meth:`StageRecord.from_wire`); one that does not
  validate is counted as malformed and left out, and a reply that is not a swarm view at all is an error.
- ``--initial-peers MADDR``: joins the DHT as a client and reads the swarm key. Starting hivemind (it
  imports torch) and its p2p daemon takes seconds, so this is the fallback when no ``--peer`` answers.

When no record matches the swarm name, :class:`SwarmView` says which swarms were seen: the swarm of the
``--peer`` that answered, or, on the DHT (keyed per swarm, with no listing of keys), which of the
well-known names (``default`` and ``local``) hold records.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import socket
import ssl
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from node.wire.records import RecordError, StageRecord

if TYPE_CHECKING:
    import hivemind

    from node.security.keys import NodeCredentials

logger = logging.getLogger(__name__)

DEFAULT_SWARM = "default"  # NodeOptions.swarm's default
LOCAL_SWARM = "local"  # swarm-node local's swarm
WELL_KNOWN_SWARMS = (DEFAULT_SWARM, LOCAL_SWARM)  # what the DHT path looks for when the asked swarm is empty
PEER_TIMEOUT = 2.0  # seconds for one --peer (TLS probe and the call together)
MAX_VIEW_RECORDS = 16384  # a reply with more records is no swarm view
MAX_RECORD_CHARS = 16384  # a record's JSON is well under 2 kB
_SWARM_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
_BUNDLE_FILES = ("ca.pem", "node.pem", "node.key")


class StatusError(Exception):
    """``status`` could not read the swarm (one line for the user)."""


@dataclass
class SwarmView:
    """What ``status`` shows: the records of ``swarm``, where they came from, and the swarms seen."""

    swarm: str
    records: list[StageRecord]
    malformed: int = 0
    source: str = ""  # "peer HOST:PORT" or "dht"
    seen: dict[str, int] = field(default_factory=dict)  # swarm name -> records seen of it

    def to_json(self) -> dict[str, Any]:
        """``status --json``: ``stages`` (each record with its expected ``share`` of its stage's microbatches, null
        for a lone peer) and ``malformed_records`` as always, plus where and what was seen."""
        split = shares(self.records)
        return {
            "stages": [{**r.to_json(), "share": split.get(r.peer_id)} for r in self.records],
            "malformed_records": self.malformed,
            "swarm": self.swarm,
            "source": self.source,
            "swarms_seen": dict(sorted(self.seen.items())),
        }


# ---- the gRPC fast path --------------------------------------------------------------------------------
def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port); :class:`StatusError` when it is not one."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StatusError(f"--peer {address!r} is not HOST:PORT")
    return host, int(port)


def check_bundle(bundle: pathlib.Path) -> None:
    """The files a TLS client needs from a node bundle are there (:class:`StatusError` naming the first missing)."""
    for name in _BUNDLE_FILES:
        if not (bundle / name).is_file():
            raise StatusError(f"--keys {bundle}: no {name} (a bundle made by swarm-node keys issue)")


def _tls_context(bundle: pathlib.Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # certificates name nodes, not addresses: the name is read, then pinned for gRPC
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(bundle / "ca.pem"))
    ctx.load_cert_chain(str(bundle / "node.pem"), str(bundle / "node.key"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


def server_name(address: str, bundle: pathlib.Path, timeout: float) -> str:
    """The node name (certificate CN) of the stage daemon at ``address``, from a TLS handshake that checks its
    certificate against the swarm CA and presents this bundle's certificate."""
    host, port = split_address(address)
    with socket.create_connection((host, port), timeout=timeout) as sock, _tls_context(bundle).wrap_socket(sock) as tls:
        cert = tls.getpeercert() or {}
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    if len(names) != 1 or not _NODE_NAME.match(names[0]):
        raise StatusError(f"{address}: the server certificate names no swarm node ({names!r})")
    return names[0]


def parse_view(swarm: str, records: Sequence[str]) -> tuple[list[StageRecord], int]:
    """Validates a ``GetStatus(swarm=True)`` reply's swarm name and records: (valid records, malformed count).
    A reply that is not a swarm view (no or a bad swarm name, too many records) raises :class:`StatusError`."""
    if not _SWARM_NAME.match(swarm):
        raise StatusError(f"the reply names no swarm ({swarm[:80]!r}): is the peer a swarm-node stage daemon?")
    if len(records) > MAX_VIEW_RECORDS:
        raise StatusError(f"the reply holds {len(records)} records (at most {MAX_VIEW_RECORDS})")
    out: list[StageRecord] = []
    bad = 0
    for text in records:
        try:
            if len(text) > MAX_RECORD_CHARS:
                raise RecordError(f"record of {len(text)} characters")
            out.append(StageRecord.from_wire(json.loads(text)))
        except (RecordError, ValueError) as err:
            bad += 1
            logger.debug("malformed record in a status reply: %s", err)
    if bad:
        logger.warning("ignored %d malformed record(s) in the status reply", bad)
    out.sort(key=lambda r: (-1 if r.stage is None else r.stage, r.peer_id))
    return out, bad


def read_peer(address: str, swarm: str | None, bundle: pathlib.Path | None, timeout: float = PEER_TIMEOUT) -> SwarmView:
    """The swarm view of the stage daemon at ``address`` (``swarm`` None: whichever swarm it belongs to). With
    ``bundle`` over mutual TLS, else cleartext (``--insecure``). :class:`StatusError` when it does not answer."""
    import grpc

    from node.proto import stage_pb2 as pb
    from node.proto import stage_pb2_grpc

    split_address(address)
    deadline = time.monotonic() + timeout
    try:
        if bundle is None:
            channel = grpc.insecure_channel(address)
        else:
            name = server_name(address, bundle, timeout)
            creds = grpc.ssl_channel_credentials(
                root_certificates=(bundle / "ca.pem").read_bytes(),
                private_key=(bundle / "node.key").read_bytes(),
                certificate_chain=(bundle / "node.pem").read_bytes(),
            )
            channel = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", name)])
        with channel:
            stub = stage_pb2_grpc.StageStub(channel)
            reply = stub.GetStatus(pb.StatusRequest(swarm=True), timeout=max(0.1, deadline - time.monotonic()))
    except grpc.RpcError as err:
        hint = (
            " (a swarm with keys? pass --keys)" if bundle is None and err.code() == grpc.StatusCode.UNAVAILABLE else ""
        )
        raise StatusError(f"{address}: {err.code().name} {err.details() or ''}".rstrip() + hint) from None
    except (OSError, ssl.SSLError) as err:
        raise StatusError(f"{address}: {err}") from None
    records, bad = parse_view(reply.swarm, list(reply.records))
    if not records and not bad and reply.peer_id:
        # a live daemon always sees itself; none at all: it did not send its view (an older swarm-node)
        logger.info("%s sent no records", address)
    source = f"peer {address}"
    if swarm is not None and reply.swarm != swarm:
        return SwarmView(swarm, [], 0, source, {reply.swarm: len(records)})
    return SwarmView(reply.swarm, records, bad, source, {reply.swarm: len(records)})


# ---- the DHT path ----------------------------------------------------------------------------------------
def read_swarm(
    initial_peers: list[str], swarm: str, credentials: NodeCredentials | None = None
) -> tuple[list[StageRecord], int]:
    """Joins the DHT as a client (a member's, with ``credentials``), reads every stage record of ``swarm``;
    returns (records, malformed)."""
    from node.dht.factory import make_dht

    dht = make_dht(initial_peers, None, credentials, client_mode=True)
    try:
        view = read_dht(dht, swarm, credentials)
        return view.records, view.malformed
    finally:
        dht.shutdown()


def read_dht(dht: hivemind.DHT, swarm: str, credentials: NodeCredentials | None) -> SwarmView:
    """The records of ``swarm`` in ``dht``; when there are none, also which well-known swarms hold records."""
    from node.dht.directory import SwarmDirectory

    directory = SwarmDirectory(dht, swarm, credentials)
    records = directory.records()
    seen = {swarm: len(records)} if records else {}
    if not records:
        for other in WELL_KNOWN_SWARMS:
            if other != swarm and (found := SwarmDirectory(dht, other, credentials).records()):
                seen[other] = len(found)
    return SwarmView(swarm, records, directory.malformed_seen, "dht", seen)


class SwarmReader:
    """Reads the swarm again and again (``--watch``): from the first ``--peer`` that answers, else from the DHT
    (joined on first use and kept). ``bundle``: the node bundle (None: ``--insecure``)."""

    def __init__(
        self, peers: Sequence[str], initial_peers: Sequence[str], swarm: str | None, bundle: pathlib.Path | None
    ) -> None:
        self.peers, self.initial_peers, self.swarm, self.bundle = list(peers), list(initial_peers), swarm, bundle
        self._dht: hivemind.DHT | None = None
        self._credentials: NodeCredentials | None = None

    def read(self) -> SwarmView:
        """One reading; :class:`StatusError` when neither a peer nor the DHT gives one."""
        failures = []
        if self._dht is None:
            for address in self.peers:
                try:
                    return read_peer(address, self.swarm, self.bundle)
                except StatusError as err:
                    failures.append(str(err))
            if not self.initial_peers:
                raise StatusError("no --peer answered: " + "; ".join(failures))
            if failures:
                logger.warning("no --peer answered (%s); reading the DHT", "; ".join(failures))
            self._join()
        assert self._dht is not None
        return read_dht(self._dht, self.swarm or DEFAULT_SWARM, self._credentials)

    def _join(self) -> None:
        from node.dht.factory import make_dht

        if self.bundle is not None:
            from node.security.keys import CredentialsError, NodeCredentials

            try:
                self._credentials = NodeCredentials.load(self.bundle)
            except CredentialsError as err:
                raise StatusError(f"--keys {err}") from None
        try:
            self._dht = make_dht(self.initial_peers, None, self._credentials, client_mode=True)
        except Exception as err:  # hivemind raises RuntimeError and others when no initial peer answers
            raise StatusError(f"could not join the DHT at {', '.join(self.initial_peers)}: {err}") from None

    def close(self) -> None:
        """Leaves the DHT, if it was joined."""
        if self._dht is not None:
            self._dht.shutdown()
            self._dht = None


# ---- showing it ----------------------------------------------------------------------------------------
def swarms_hint(asked: str, seen: dict[str, int], searched: Iterable[str] = WELL_KNOWN_SWARMS) -> str:
    """The line shown when no record of swarm ``asked`` was found: the swarms that were seen instead (and the
    flag to pass), or which names were looked at."""
    others = {name: n for name, n in sorted(seen.items()) if name != asked and n > 0}
    if others:
        listed = ", ".join(f"{name!r} ({n} record{'s' if n != 1 else ''})" for name, n in others.items())
        first = next(iter(others))
        return f"no stage records of swarm {asked!r}; seen: {listed}: pass --swarm {first}"
    names = ", ".join(repr(n) for n in dict.fromkeys([asked, *searched]))
    return f"no stage records of swarm {asked!r} (none of swarms {names} holds any)"


def _recovery(r: StageRecord, wide: bool) -> str:
    rec = r.last_recovery
    if rec is None:
        return "-"
    return f"{rec.method} @ step {rec.step} ({rec.seconds:.1f}s)" if wide else f"{rec.method}@{rec.step}"


NARROW_COLUMNS = ("stage", "state", "committed", "address", "pid", "share", "recovery")
WIDE_COLUMNS = (
    "stage", "node", "peer", "address", "state", "committed", "epoch", "pid", "mb/s", "share", "metrics",
    "last recovery", "swap partner", "stage-0 copy",
)  # fmt: skip


def shares(records: Sequence[StageRecord]) -> dict[str, float]:
    """Peer id -> its expected share of its stage's microbatches (serving peers of stages with several; stage 0
    and lone peers take everything and are left out): its throughput over its stage's, as stage 0 routes."""
    from node.stage.routing import Replica, expected_shares
    from node.wire.records import SERVING_STATES

    by_stage: dict[int, list[Replica]] = {}
    for r in records:
        if r.stage and r.state in SERVING_STATES:
            by_stage.setdefault(r.stage, []).append(Replica(r.peer_id, r.throughput))
    return {p: f for peers in by_stage.values() if len(peers) > 1 for p, f in expected_shares(peers).items()}


def _cells(r: StageRecord, wide: bool, share: float | None = None) -> dict[str, str]:
    return {
        "mb/s": "-" if r.throughput is None else f"{r.throughput:.1f}",
        "share": "-" if share is None else f"{share:.0%}",
        "stage": "spare" if r.stage is None else str(r.stage),
        "node": r.node,
        "peer": r.peer_id[-12:],
        "address": r.grpc_address,
        "state": r.state.value,
        "committed": str(r.committed_step),
        "epoch": str(r.epoch),
        "pid": str(r.pid or "-"),
        "metrics": "-" if r.metrics_port is None else f":{r.metrics_port}",
        "recovery": _recovery(r, wide),
        "last recovery": _recovery(r, wide),
        "swap partner": "-" if r.swap_partner is None else str(r.swap_partner),
        "stage-0 copy": "-" if r.replica_step is None else f"step {r.replica_step}",
    }


def records_table(records: Sequence[StageRecord], title: str = "swarm", wide: bool = False) -> Table:
    """One row per record. The default columns fit 80 columns (a long address folds, nothing is cut);
    ``wide``: every column (show it on a console wide enough, see :func:`render_width`)."""
    columns = WIDE_COLUMNS if wide else NARROW_COLUMNS
    table = Table(title=title, box=box.HEAVY_HEAD) if wide else Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        table.add_column(
            col, no_wrap=col != "address", overflow="fold", justify="right" if col == "committed" else "left"
        )
    split = shares(records)
    for r in records:
        cells = _cells(r, wide, split.get(r.peer_id))
        table.add_row(*(cells[c] for c in columns))
    return table


def view_title(view: SwarmView, at: float | None = None) -> str:
    """The table's title: swarm, how many records, where from (and when, under ``--watch``)."""
    n = len(view.records)
    title = f"swarm {view.swarm}: {n} record{'s' if n != 1 else ''} via {view.source}"
    if view.malformed:
        title += f", {view.malformed} malformed"
    if at is not None:
        title += time.strftime(" at %H:%M:%S", time.localtime(at))
    return title


def render(view: SwarmView, wide: bool = False, at: float | None = None) -> RenderableType:
    """The table, or the "swarms seen" line when no record matched."""
    if not view.records:
        line = Text(swarms_hint(view.swarm, view.seen))
        return line if at is None else Group(Text(view_title(view, at)), line)
    return records_table(view.records, view_title(view, at), wide)


def render_width(renderable: RenderableType, console: Console) -> int:
    """The width ``renderable`` needs unshrunk (``--wide`` prints at it, even past the terminal)."""
    return max(console.width, console.measure(renderable, options=console.options.update(width=10_000)).maximum)


def print_view(view: SwarmView, as_json: bool, wide: bool = False) -> None:
    """Prints one reading (``status`` without ``--watch``)."""
    if as_json:
        print(json.dumps(view.to_json(), indent=2))
        if not view.records:
            print(swarms_hint(view.swarm, view.seen), file=sys.stderr)
        return
    console = Console()
    shown = render(view, wide)
    if wide:
        console = Console(width=render_width(shown, console))
    console.print(shown, soft_wrap=isinstance(shown, Text))


def watch(reader: SwarmReader, interval: float, as_json: bool, wide: bool = False) -> None:
    """``--watch``: reads every ``interval`` seconds and redraws the table in place (``--json``: one line per
    reading) until Ctrl-C. A failed reading is shown, and the next one tried."""
    from rich.live import Live

    console = Console()

    def reading() -> RenderableType:
        try:
            view = reader.read()
        except StatusError as err:
            line = f"{time.strftime('%H:%M:%S')} {err}"
            if as_json:
                print(line, file=sys.stderr, flush=True)
            return Text(line)
        if as_json:
            print(json.dumps(view.to_json()), flush=True)
        return render(view, wide, at=time.time())

    if as_json:
        while True:
            reading()
            time.sleep(interval)
    with Live(reading(), console=console, auto_refresh=False, transient=False) as live:
        while True:
            time.sleep(interval)
            live.update(reading(), refresh=True)
