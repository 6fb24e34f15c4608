"""Where a local swarm's CPU goes: per-thread CPU time of a process tree, read from Linux's ``/proc``.

The benchmark samples the tree of ``swarm-node local`` twice (after warm-up, at the end of its steady state)
and divides each class's CPU seconds by the steps committed in between:

- ``stage compute``: the stage daemons' compute threads (named ``compute`` at OS level), where all torch work runs;
- ``stage loop and gRPC``: every other thread of the daemons (asyncio loop, gRPC's threads, metrics);
- ``DHT helpers``: the hivemind DHT child each daemon forks, and its ``p2pd``;
- ``launcher``: ``swarm-node local`` itself (its progress view, its own DHT peer and ``p2pd``).
"""

from __future__ import annotations

import os
import pathlib

CLK = os.sysconf("SC_CLK_TCK")
CLASSES = ("stage compute", "stage loop and gRPC", "DHT helpers", "launcher")


def _stat(path: pathlib.Path) -> tuple[str, int, float]:
    """(command name, parent pid, user + system CPU seconds) of one /proc stat file."""
    text = path.read_text()
    name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    return name, int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK


def _tree(root: int) -> dict[int, int]:
    """pid -> parent pid of ``root`` and all its descendants."""
    parents = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = _stat(entry / "stat")[1]
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root: parents.get(root, 0)}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree[child] = pid
                frontier.append(child)
    return tree


def sample(root: int) -> dict[str, float]:
    """CPU seconds used so far by each class of the tree under ``root`` (processes that already exited
    are not counted: sample while the swarm runs)."""
    tree = _tree(root)
    daemons = {pid for pid in tree if tree[pid] == root and _runs_node(pid)}
    totals = dict.fromkeys(CLASSES, 0.0)
    for pid, parent in tree.items():
        if pid in daemons:
            for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
                try:
                    name, _, seconds = _stat(task / "stat")
                except (OSError, ValueError, IndexError):
                    continue
                totals["stage compute" if name == "compute" else "stage loop and gRPC"] += seconds
            continue
        try:
            _, _, seconds = _stat(pathlib.Path(f"/proc/{pid}/stat"))
        except (OSError, ValueError, IndexError):
            continue
        above = parent
        while above in tree and above not in daemons and above != root:
            above = tree[above]
        totals["DHT helpers" if above in daemons else "launcher"] += seconds
    return totals


def _runs_node(pid: int) -> bool:
    """Whether ``pid`` is a stage daemon (``python -m node run ...``)."""
    try:
        return b"run" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / CLK, sum(fields) / CLK
