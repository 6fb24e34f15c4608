"""Data at scale: tokenizer throughput, and stage 0's peak memory while training from prepared shards.

For each corpus size (default 100 MiB and 1 GiB) it generates a text corpus (the built-in grammar, varied
per block), prepares it with ``swarm-node data prepare`` (byte-level: the default tokenizer) and trains
``--steps`` steps from the prepared directory with ``swarm-node local --stages 2``, recording the stage 0
daemon's peak RSS (``VmHWM``, read from /proc while it runs). It also measures a trained byte-level BPE tokenizer's
throughput on a sample. Goal: peak RSS independent of corpus size (within 10 % between the sizes).

    python benchmarks/data.py [--sizes 100M,1G] [--steps 20] [--bpe-sample-mb 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import REPO, RESULTS, local_swarm, write_results


def stage0_pid(launcher: int) -> int | None:
    """The pid of the launcher's stage 0 daemon (``swarm-node run --options .../stage0.json``), if it runs yet
    (not its DHT helper, a fork with the same command line, which is the daemon's child)."""
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"run" in argv and any(a.endswith(b"options/stage0.json") for a in argv):
                return int(entry.name)
    return None


def peak_rss_mib(pid: int) -> float | None:
    """The peak resident set (VmHWM) of process ``pid`` so far, in MiB."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in (pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()) if x.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    return None


def train_from(prepared: pathlib.Path, steps: int) -> dict[str, Any]:
    """``swarm-node local --stages 2`` trained from ``prepared``: stage 0 daemon's peak RSS (read from /proc
    while it runs), the run's wall time and final loss."""
    args = ["--stages", "2", "--steps", str(steps), "--data", str(prepared), "--threads", "1",
            "--microbatches", "2"]  # fmt: skip
    peak, started = 0.0, time.perf_counter()
    with local_swarm(args) as swarm:
        pid = None
        while swarm.running():
            pid = pid or stage0_pid(swarm.process.pid)
            if pid is not None:
                peak = max(peak, peak_rss_mib(pid) or 0.0)
            time.sleep(0.2)
        summary = swarm.summary()
    if not peak:
        raise RuntimeError("never saw stage 0's daemon")
    return {"peak_rss_mib": peak, "run_seconds": time.perf_counter() - started,
            "steps": summary["steps"], "final_loss": summary["loss"][-1]}  # fmt: skip


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def generate_corpus(path: pathlib.Path, nbytes: int) -> None:
    """``nbytes`` of English-like text: 8 MiB blocks of the built-in grammar, each from its own seed."""
    from node.data import builtin_text

    block = 8 << 20
    with open(path, "w", encoding="utf-8") as f:
        written, seed = 0, 0
        base = [builtin_text(block, seed=s) for s in range(4)]
        while written < nbytes:
            text = base[seed % 4]
            text = text[(seed * 7919) % 1000 :][: min(block, nbytes - written)]  # vary the block boundaries
            f.write(text)
            written += len(text)
            seed += 1


def run_size(nbytes: int, steps: int, tmp: pathlib.Path) -> dict[str, Any]:
    corpus, prepared = tmp / f"corpus-{nbytes}.txt", tmp / f"prepared-{nbytes}"
    started = time.perf_counter()
    generate_corpus(corpus, nbytes)
    generated = time.perf_counter() - started
    out = subprocess.run(
        [sys.executable, "-m", "node", "data", "prepare", "--data", str(corpus), "--out", str(prepared), "--json"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    prep = json.loads(out.splitlines()[-1])
    corpus.unlink()
    train = train_from(prepared, steps)
    for shard in prepared.glob("shard-*.bin"):
        shard.unlink()
    return {
        "corpus_bytes": nbytes,
        "generate_seconds": generated,
        "prepare_seconds": prep["seconds"],
        "byte_tokenizer_mchars_per_second": prep["mchars_per_second"],
        "shards": len(prep["shards"]),
        **train,
    }


def bpe_throughput(tmp: pathlib.Path, sample_mb: int) -> dict[str, Any]:
    """A 4096-token byte-level BPE trained on 8 MiB, then timed on ``sample_mb`` MiB (batched encoding)."""
    from node.data import builtin_text
    from node.data.shards import prepare
    from node.data.tokenizer import train_tokenizer

    started = time.perf_counter()
    tok = train_tokenizer(iter([builtin_text(8 << 20, seed=9)]), 4096, tmp / "tokenizer.json")
    trained = time.perf_counter() - started
    docs = [builtin_text(1 << 20, seed=100 + i) for i in range(sample_mb)]
    result = prepare(iter(docs), tok, tmp / "bpe-prepared")
    return {
        "vocab_size": 4096,
        "train_seconds_8mib": trained,
        "sample_mib": sample_mb,
        "mchars_per_second": result["chars"] / result["seconds"] / 1e6,
        "tokens_per_char": result["total_tokens"] / result["chars"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100M,1G", help="corpus sizes (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per size (default %(default)s)")
    parser.add_argument("--bpe-sample-mb", type=int, default=32, help="BPE throughput sample (default %(default)s)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "data.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory(prefix="swarm-node-data-bench-") as tmp:
        runs = [run_size(_size(s), args.steps, pathlib.Path(tmp)) for s in args.sizes.split(",")]
        bpe = bpe_throughput(pathlib.Path(tmp), args.bpe_sample_mb)
    rss = [r["peak_rss_mib"] for r in runs]
    payload = {
        "runs": runs,
        "bpe": bpe,
        "peak_rss_spread": (max(rss) - min(rss)) / min(rss),
        "goal": "peak RSS of stage 0 within 10 % across corpus sizes",
    }
    payload["goal_met"] = payload["peak_rss_spread"] <= 0.10
    write_results(args.out, payload)
    print(json.dumps(payload, indent=2))
    return 0 if payload["goal_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
