"""``swarm-node dht``: a bootstrap-only DHT node with a persistent identity (so its multiaddr is stable)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import threading

from node.dht.factory import make_dht
from node.security.keys import NodeCredentials

logger = logging.getLogger(__name__)


def run_bootstrap(
    host: str,
    port: int,
    identity: pathlib.Path,
    as_json: bool,
    announce: list[str],
    maddr_file: pathlib.Path | None = None,
    credentials: NodeCredentials | None = None,
) -> int:
    """Starts the node, prints its multiaddrs (first line of stdout), also writes them to ``maddr_file`` (one per
    line, atomically), and serves until SIGINT/SIGTERM.

    With ``credentials`` (a bundle issued for the bootstrap node) it answers token holders only and keeps only
    signed swarm records, like every member (:func:`node.dht.factory.make_dht`); its peer id still comes from
    ``identity``."""
    identity.parent.mkdir(parents=True, exist_ok=True)
    if maddr_file is not None:
        # a file left by an earlier run may name addresses that are gone (a container's new IP): nodes
        # waiting for it must see the new one only
        maddr_file.unlink(missing_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    dht = make_dht(
        None,
        [f"/ip4/{host}/tcp/{port}"],
        credentials,
        announce_maddrs=announce or None,
        identity_path=str(identity),
    )
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    if maddr_file is not None:
        maddr_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = maddr_file.with_name(maddr_file.name + ".tmp")
        tmp.write_text("".join(f"{m}\n" for m in maddrs), encoding="utf-8")
        os.replace(tmp, maddr_file)
    if as_json:
        print(json.dumps({"peer_id": str(dht.peer_id), "maddrs": maddrs}), flush=True)
    else:
        print(" ".join(maddrs), flush=True)
    logger.info("bootstrap DHT node %s listening on %s", dht.peer_id, maddrs)
    stop.wait()
    dht.shutdown()
    return 0
