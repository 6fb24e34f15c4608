"""``swarm-node local``: a whole swarm on one machine, as separate processes.

The command lines here are shared by everything that starts ``swarm-node`` processes: the launcher's
children, the tests and the benchmark scripts.
"""

from __future__ import annotations

import pathlib
import sys


def node_argv(*args: str) -> list[str]:
    """``swarm-node ARGS``, run by this interpreter (so a child runs the same code in the same environment)."""
    return [sys.executable, "-m", "node", *args]


def local_argv(*flags: str, workdir: pathlib.Path, json_out: pathlib.Path) -> list[str]:
    """``swarm-node local FLAGS --quiet``, keeping its files in ``workdir`` and its run summary in ``json_out``."""
    return node_argv("local", *flags, "--quiet", "--workdir", str(workdir), "--json-out", str(json_out))
