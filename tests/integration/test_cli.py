"""The command line: one-line errors for bad input, and a bootstrap node whose address survives restarts."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, Procs

pytestmark = pytest.mark.integration


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--stage", "4", "--num-stages", "4"], "--stage 4 is outside 0..3"),
        (["run", "--stage", "0", "--num-stages", "4", "--insecure", "--data", "/nonexistent/corpus.txt"],
         "/nonexistent/corpus.txt"),
        (["run", "--stage", "0", "--num-stages", "4"], "needs its keys"),
        (["run", "--stage", "0", "--num-stages", "4", "--keys", "/nonexistent"], "--keys /nonexistent"),
        (["run", "--stage", "1", "--num-stages", "5"], "cannot be split evenly"),
        (["run", "--stage", "1", "--num-stages", "4", "--preset", "huge"], "unknown preset 'huge'"),
        (["run", "--stage", "1", "--num-stages", "4", "--initial-peers", "localhost:80"], "is not a multiaddr"),
        (["local", "--stages", "0"], "must be positive"),
        (["local", "--steps", "ten"], "is not an integer"),
        (["local", "--config", "/nonexistent.toml"], "config file does not exist"),
    ],
)
def test_bad_flags_give_one_line_errors(args: list[str], needle: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_empty_and_bad_data_files(tmp_path: pathlib.Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_cli("local", "--data", str(empty))
    assert proc.returncode == 2 and str(empty) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    proc = run_cli("local", "--data", str(bad))
    assert proc.returncode == 2 and str(bad) in proc.stderr


def test_bad_config_file(tmp_path: pathlib.Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nd_model = -3\n")
    proc = run_cli("local", "--config", str(cfg))
    assert proc.returncode == 2 and "model.d_model" in proc.stderr and str(cfg) in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_bootstrap_identity_keeps_multiaddr_across_restarts(tmp_path: pathlib.Path, procs: Procs) -> None:
    identity = tmp_path / "id" / "dht.key"
    port = str(_free_port())
    seen = []
    for _ in range(2):
        proc = procs.start("dht", "--host", "127.0.0.1", "--port", port, "--identity", str(identity), "--insecure")
        line = proc.stdout.readline().decode().strip()
        assert line.startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/"), line
        seen.append(line)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    assert seen[0] == seen[1]
    assert identity.exists()
