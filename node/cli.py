"""The ``swarm-node`` command line: ``dht``, ``run``, ``local``, ``status``.

Every flag is validated before anything starts; a bad value ends the program with one line
``swarm-node: error: <what is wrong>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from typing import Any

from node import __version__


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _port(text: str) -> int:
    value = _non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def _maddr(text: str) -> str:
    if not text.startswith("/") or "/p2p/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiaddr like /ip4/1.2.3.4/tcp/31337/p2p/<peer id>")
    return text


def _swarm_name(text: str) -> str:
    if not text or len(text) > 64 or not all(c.isalnum() or c in "-_." for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: swarm names use letters, digits, '-', '_', '.' (at most 64)")
    return text


def _stage_arg(text: str) -> int | None:
    return None if text == "auto" else _non_negative_int(text)


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return value


def _strategies(text: str) -> list[str]:
    from node.bench import STRATEGIES

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {unknown[0] if unknown else text!r}; choose from {', '.join(STRATEGIES)}"
        )
    return list(dict.fromkeys(names))


def _probabilities(text: str) -> list[float]:
    values = [_probability(v.strip()) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("no failure rate given")
    return values


def _add_recovery_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("failure detection and recovery")
    g.add_argument(
        "--recovery",
        choices=["checkfree", "checkfree+", "checkpoint", "copy", "random", "none"],
        default="checkfree",
        help="how a lost stage is rebuilt: checkfree (neighbour average), checkfree+ (also edge stages and "
        "stage 0, with the out-of-order pipeline; needs S >= 5), checkpoint (every stage writes checkpoints; "
        "the swarm rolls back to the last common one), copy (one neighbour's weights) or random (fresh random "
        "weights; 'none' is the same)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=100,
        help="checkpoint: write a checkpoint every K committed steps (default 100)",
    )
    g.add_argument(
        "--embed-sync-every",
        type=_positive_int,
        default=1,
        help="checkfree+: copy stage 0 to stages 1 and S-1 every K committed steps (default 1: exact)",
    )
    g.add_argument(
        "--lr-scale",
        type=_positive_float,
        default=1.1,
        help="learning-rate multiplier of a rebuilt stage's fresh optimizer (default 1.1)",
    )
    g.add_argument("--heartbeat-interval", type=_positive_float, default=0.5, help="seconds between heartbeats")
    g.add_argument(
        "--heartbeat-timeout",
        type=_positive_float,
        default=1.0,
        help="a heartbeat slower than this marks the neighbour dead (seconds)",
    )


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (stage 0)")
    g.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=0,
        help="validation loss on held-out data every E committed steps (default 0: never)",
    )
    g.add_argument("--eval-batches", type=_positive_int, default=4, help="held-out microbatches per evaluation")


def _check_checkpoint_dir(path: pathlib.Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"--checkpoint-dir {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"--checkpoint-dir {path} is not writable")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training (must be the same on every stage)")
    g.add_argument("--preset", default="tiny", help="model/training preset: tiny (default), small, medium, 1b")
    g.add_argument("--config", type=pathlib.Path, help="TOML or JSON file overriding the preset")
    g.add_argument("--data", help="a .txt or .jsonl file (or a directory of them); default: built-in corpus")
    g.add_argument("--seed", type=_non_negative_int, help="training seed (initial weights and batches)")
    g.add_argument("--microbatches", type=_positive_int, help="microbatches per step")
    g.add_argument("--microbatch-size", type=_positive_int, help="sequences per microbatch")
    g.add_argument("--lr", type=_positive_float, help="AdamW learning rate")


def _build_config(args: argparse.Namespace, num_stages: int) -> Any:
    from node.config import build_config

    overrides: dict[str, Any] = {"num_stages": num_stages, "out_of_order": args.recovery == "checkfree+"}
    train: dict[str, Any] = {}
    for flag, key in (
        ("seed", "seed"),
        ("microbatches", "microbatches_per_step"),
        ("microbatch_size", "microbatch_size"),
        ("lr", "lr"),
    ):
        if getattr(args, flag) is not None:
            train[key] = getattr(args, flag)
    if train:
        overrides["train"] = train
    if args.data is not None:
        overrides["data"] = args.data
    return build_config(preset=args.preset, config_file=args.config, overrides=overrides)


def _parser() -> argparse.ArgumentParser:
    from node.bench import PAPER_REDUNDANT_FACTOR

    parser = argparse.ArgumentParser(prog="swarm-node", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"swarm-node {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dht", help="run a bootstrap DHT node; prints its multiaddr")
    p.add_argument("--host", default="0.0.0.0", help="IPv4 address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=_port, default=31337, help="TCP port (default 31337; 0 picks one)")
    p.add_argument(
        "--identity",
        type=pathlib.Path,
        default=pathlib.Path.home() / ".swarm-node" / "dht.key",
        help="private key file; created on first start, reused after (keeps the multiaddr stable)",
    )
    p.add_argument("--announce-maddr", action="append", default=[], help="multiaddr to announce (public address)")
    p.add_argument("--json", action="store_true", help="print {peer_id, maddrs} as JSON")
    p.add_argument(
        "--maddr-file",
        type=pathlib.Path,
        help="also write the multiaddrs here, one per line (for --initial-peers-file)",
    )

    p = sub.add_parser("run", help="run one stage daemon")
    p.add_argument(
        "--stage",
        type=_stage_arg,
        required=True,
        help="pipeline stage (0 = embedding + head), or 'auto': take a vacant stage or wait as a spare",
    )
    p.add_argument("--num-stages", type=_positive_int, required=True, help="number of pipeline stages S")
    p.add_argument("--initial-peers", type=_maddr, action="append", default=[], help="bootstrap multiaddr (repeatable)")
    p.add_argument(
        "--initial-peers-file",
        type=pathlib.Path,
        help="read bootstrap multiaddrs from this file (written by `dht --maddr-file`), waiting for it to appear",
    )
    p.add_argument("--swarm", type=_swarm_name, default="default", help="swarm name (DHT namespace)")
    p.add_argument("--host", default="0.0.0.0", help="address for gRPC and the DHT to listen on")
    p.add_argument("--port", type=_port, default=0, help="gRPC port (0 picks a free one)")
    p.add_argument("--announce-host", help="host name/IP that other stages use to reach this one")
    p.add_argument("--dht-port", type=_port, default=0, help="DHT port (0 picks a free one)")
    p.add_argument("--steps", type=_positive_int, help="stage 0: train until this many steps are committed")
    p.add_argument("--events-file", type=pathlib.Path, help="stage 0: append one JSON line per step here")
    p.add_argument("--save-dir", type=pathlib.Path, help="write this stage's weights here on exit (safetensors)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    p.add_argument("--refresh", type=_positive_float, default=1.0, help="DHT refresh period, seconds")
    p.add_argument("--rpc-timeout", type=_positive_float, default=30.0, help="deadline of one RPC, seconds")
    p.add_argument("--step-timeout", type=_positive_float, default=120.0, help="stage 0: abort a step after this")
    p.add_argument("--metrics-port", type=_port, help="serve Prometheus metrics here (0 picks a free port)")
    _add_recovery_flags(p)
    p.add_argument(
        "--checkpoint-dir",
        type=pathlib.Path,
        help="checkpoint: storage shared by the swarm's nodes (a replacement restores from it); required then",
    )
    _add_eval_flags(p)
    p.add_argument("--fault", action="append", default=[], help=argparse.SUPPRESS)  # tests: STAGE@STEP[:PHASE]
    _add_model_flags(p)

    p = sub.add_parser("local", help="run a whole swarm on this machine")
    p.add_argument("--stages", type=_positive_int, default=4, help="pipeline stages (default 4)")
    p.add_argument("--steps", type=_positive_int, default=300, help="training steps (default 300)")
    p.add_argument("--json-out", type=pathlib.Path, help="write the run summary here")
    p.add_argument(
        "--check-reference", action="store_true", help="also train in one process and report reference_max_abs_diff"
    )
    p.add_argument("--workdir", type=pathlib.Path, help="keep logs, events and weights here")
    p.add_argument("--threads", type=_positive_int, help="torch threads per stage (default: cores / stages)")
    p.add_argument("--refresh", type=_positive_float, default=1.0, help="DHT refresh period, seconds")
    p.add_argument("--step-timeout", type=_positive_float, default=120.0, help="abort a step after this")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument(
        "--metrics", action=argparse.BooleanOptionalAction, default=True, help="serve Prometheus metrics (default on)"
    )
    _add_recovery_flags(p)
    p.add_argument("--checkpoint-dir", type=pathlib.Path, help="checkpoint: where (default WORKDIR/checkpoints)")
    p.add_argument(
        "--prometheus-dir",
        type=pathlib.Path,
        help="write prometheus.yml (the docker compose job, with file discovery) and keep targets.json current "
        "here: prometheus --config.file DIR/prometheus.yml scrapes this swarm",
    )
    _add_eval_flags(p)
    g = p.add_argument_group("fault injection")
    g.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="STAGE@STEP[:PHASE]",
        help="SIGKILL that stage's node during that step (phase forward|backward|fetch; "
        "spare@STEP kills an idle spare); repeatable",
    )
    g.add_argument(
        "--failure-rate",
        type=_probability,
        default=0.0,
        help="each block stage fails independently with this probability per step",
    )
    g.add_argument(
        "--respawn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restart a killed node as --stage auto, like a spot replacement (default on)",
    )
    g.add_argument("--spares", type=_non_negative_int, default=0, help="extra --stage auto nodes waiting as spares")
    _add_model_flags(p)

    p = sub.add_parser("bench", help="compare recovery strategies by wall-clock time to a target validation loss")
    p.add_argument("--mode", choices=["simulate", "live"], default="simulate", help="one process, or a real swarm")
    p.add_argument(
        "--strategies",
        type=_strategies,
        default="none,checkfree,checkfree+,checkpoint,copy,random,redundant",
        help="comma-separated: none, checkfree, checkfree+, checkpoint, copy, random, redundant (default all)",
    )
    p.add_argument(
        "--failure-rates",
        type=_probabilities,
        default="0.001,0.003,0.01",
        help="comma-separated per-stage per-iteration failure probabilities (default 0.001,0.003,0.01)",
    )
    p.add_argument("--iterations", type=_positive_int, help="iterations per run (default 300 simulate, 60 live)")
    p.add_argument("--target-loss", type=_positive_float, help="default: the no-failure run's at ~2/3 of the run")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"), help="results directory")
    p.add_argument("--stages", type=_positive_int, default=7, help="pipeline stages (default 7: 6 block stages)")
    p.add_argument("--seq-len", type=_positive_int, default=64, help="sequence length (default 64)")
    p.add_argument(
        "--checkpoint-every", type=_positive_int, default=10, help="checkpoint strategy: every K steps (default 10)"
    )
    p.add_argument(
        "--redundant-factor",
        type=_positive_float,
        default=PAPER_REDUNDANT_FACTOR,
        help="redundant computation: time per iteration × this (default 1.653, the paper's measured ratio)",
    )
    p.add_argument(
        "--failure-overhead-seconds",
        type=_non_negative_float,
        default=0.0,
        help="simulate: seconds added to every failure (detection and replacement start, e.g. from --mode live)",
    )
    p.add_argument("--lr-scale", type=_positive_float, default=1.1, help="lr multiplier of a rebuilt stage")
    p.add_argument("--eval-every", type=_positive_int, help="validation every E iterations (default: ~30 points)")
    p.add_argument("--eval-batches", type=_positive_int, default=4, help="held-out microbatches per evaluation")
    p.add_argument("--spares", type=_non_negative_int, default=1, help="live: spare nodes per run (default 1)")
    p.add_argument("--threads", type=_positive_int, help="torch threads (simulate) or per stage (live)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout")
    g = p.add_argument_group("model and training")
    g.add_argument("--preset", default="tiny", help="model/training preset (default tiny)")
    g.add_argument("--config", type=pathlib.Path, help="TOML or JSON file overriding the preset")
    g.add_argument("--data", help="a .txt or .jsonl file (or a directory of them); default: built-in corpus")
    g.add_argument("--seed", type=_non_negative_int, default=0, help="seed of weights, batches and failures")
    g.add_argument("--microbatches", type=_positive_int, default=2, help="microbatches per step (default 2)")
    g.add_argument("--microbatch-size", type=_positive_int, default=4, help="sequences per microbatch (default 4)")
    g.add_argument("--lr", type=_positive_float, help="AdamW learning rate")

    p = sub.add_parser("status", help="show the swarm as the DHT sees it")
    p.add_argument("--initial-peers", type=_maddr, action="append", required=True, help="bootstrap multiaddr")
    p.add_argument("--swarm", type=_swarm_name, default="default", help="swarm name (local swarms use 'local')")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(max(level, logging.WARNING))


def _parse_faults(specs: list[str], num_stages: int) -> list:
    from node.recovery.faults import parse_fault

    try:
        return [parse_fault(spec, num_stages) for spec in specs]
    except ValueError as err:
        raise CliError(f"--kill/--fault {err}") from None


def _read_initial_peers(path: pathlib.Path, timeout: float = 120.0) -> list[str]:
    """Multiaddrs from ``path`` (one per line), waiting up to ``timeout`` for the bootstrap node to write it.
    Loopback addresses are dropped when others exist: in a container they name the container itself."""
    import time

    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise CliError(f"--initial-peers-file {path} did not appear within {timeout:.0f}s")
        time.sleep(0.5)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"--initial-peers-file {path}: {err}") from None
    maddrs = []
    for line in lines:
        try:
            maddrs.append(_maddr(line))
        except argparse.ArgumentTypeError as err:
            raise CliError(f"--initial-peers-file {path}: {err}") from None
    if not maddrs:
        raise CliError(f"--initial-peers-file {path} holds no multiaddr")
    remote = [m for m in maddrs if not m.startswith(("/ip4/127.", "/ip6/::1/"))]
    return remote or maddrs


def cmd_run(args: argparse.Namespace) -> int:
    from node.stage.daemon import run_daemon

    if args.stage is not None and args.stage >= args.num_stages:
        raise CliError(f"--stage {args.stage} is outside 0..{args.num_stages - 1} for --num-stages {args.num_stages}")
    cfg = _build_config(args, args.num_stages)
    faults = _parse_faults(args.fault, args.num_stages)
    initial_peers = list(args.initial_peers)
    if args.initial_peers_file is not None:
        initial_peers += _read_initial_peers(args.initial_peers_file)
    if args.recovery == "checkpoint":
        if args.checkpoint_dir is None:
            raise CliError("--recovery checkpoint needs --checkpoint-dir (storage the swarm's nodes share)")
        _check_checkpoint_dir(args.checkpoint_dir)
    if args.stage in (0, None) and cfg.data is not None:
        from node.data import load_corpus

        load_corpus(cfg.data).check_fits(cfg.train.seq_len)  # fail now, with the file named
    from node.options import NodeOptions

    opts = NodeOptions.model_validate(
        {
            "config": cfg,
            "stage": args.stage,
            "swarm": args.swarm,
            "initial_peers": initial_peers,
            "host": args.host,
            "port": args.port,
            "announce_host": args.announce_host,
            "dht_port": args.dht_port,
            "steps": args.steps,
            "events_file": args.events_file,
            "save_dir": args.save_dir,
            "device": args.device,
            "threads": args.threads,
            "metrics_port": args.metrics_port,
            "faults": [str(f) for f in faults],
            "timing": {
                "refresh_seconds": args.refresh,
                "rpc_timeout": args.rpc_timeout,
                "step_timeout": args.step_timeout,
                "heartbeat_interval": args.heartbeat_interval,
                "heartbeat_timeout": args.heartbeat_timeout,
            },
            "recovery": {
                "strategy": args.recovery,
                "lr_scale": args.lr_scale,
                "embed_sync_every": args.embed_sync_every,
                "checkpoint_every": args.checkpoint_every,
                "checkpoint_dir": args.checkpoint_dir,
            },
            "eval": {"every": args.eval_every, "batches": args.eval_batches},
        }
    )
    return run_daemon(opts)


def cmd_local(args: argparse.Namespace) -> int:
    import signal

    from node.data import load_corpus
    from node.local.launcher import LocalOptions, LocalSwarm

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt  # runs the launcher's clean-up, like Ctrl-C

    signal.signal(signal.SIGTERM, _terminate)
    cfg = _build_config(args, args.stages)

    load_corpus(cfg.data).check_fits(cfg.train.seq_len)
    if args.recovery == "checkpoint" and args.checkpoint_dir is not None:
        _check_checkpoint_dir(args.checkpoint_dir)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.stages)
    swarm = LocalSwarm(
        LocalOptions(
            config=cfg,
            steps=args.steps,
            workdir=args.workdir,
            json_out=args.json_out,
            check_reference=args.check_reference,
            threads=threads,
            refresh_seconds=args.refresh,
            step_timeout=args.step_timeout,
            quiet=args.quiet,
            recovery=args.recovery,
            lr_scale=args.lr_scale,
            kills=_parse_faults(args.kill, args.stages),
            failure_rate=args.failure_rate,
            respawn=args.respawn,
            spares=args.spares,
            seed=cfg.train.seed,
            extra_run_args=[
                "--heartbeat-interval",
                str(args.heartbeat_interval),
                "--heartbeat-timeout",
                str(args.heartbeat_timeout),
                "--embed-sync-every",
                str(args.embed_sync_every),
                "--checkpoint-every",
                str(args.checkpoint_every),
                "--eval-every",
                str(args.eval_every),
                "--eval-batches",
                str(args.eval_batches),
            ],
            checkpoint_dir=args.checkpoint_dir,
            prometheus_dir=args.prometheus_dir,
            metrics=args.metrics,
        )
    )
    try:
        summary = swarm.run()
    finally:
        if args.workdir is None:
            swarm.cleanup()
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    loss = summary["loss"]
    line = (
        (
            f"done: {summary['steps']} steps, loss {loss[0]:.4f} -> {loss[-1]:.4f}, "
            f"{summary['tokens_per_second']:,.0f} tokens/s"
        )
        if loss
        else "done: no steps"
    )
    if "reference_max_abs_diff" in summary:
        line += f", reference_max_abs_diff {summary['reference_max_abs_diff']:.3g}"
    swarm.console.print(line)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from node.bench.results import write_results
    from node.config import build_config

    train: dict[str, Any] = {
        "seed": args.seed,
        "microbatches_per_step": args.microbatches,
        "microbatch_size": args.microbatch_size,
        "seq_len": args.seq_len,
    }
    if args.lr is not None:
        train["lr"] = args.lr
    overrides: dict[str, Any] = {"num_stages": args.stages, "train": train}
    if args.data is not None:
        overrides["data"] = args.data
    cfg = build_config(preset=args.preset, config_file=args.config, overrides=overrides)
    if "checkfree+" in args.strategies:
        build_config(preset=args.preset, config_file=args.config, overrides={**overrides, "out_of_order": True})
    iterations = args.iterations or (300 if args.mode == "simulate" else 60)
    eval_every = args.eval_every or max(1, iterations // 30)
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        common: dict[str, Any] = {
            "config": cfg,
            "strategies": args.strategies,
            "failure_rates": args.failure_rates,
            "iterations": iterations,
            "seed": args.seed,
            "target_loss": args.target_loss,
            "checkpoint_every": args.checkpoint_every,
            "redundant_factor": args.redundant_factor,
            "lr_scale": args.lr_scale,
            "eval_every": eval_every,
            "eval_batches": args.eval_batches,
        }
        if args.mode == "simulate":
            import torch

            from node.bench.simulate import SimulateOptions, run_simulation

            if args.threads:
                torch.set_num_threads(args.threads)
            opts = SimulateOptions(**common, failure_overhead_seconds=args.failure_overhead_seconds)
            results = run_simulation(opts, progress)
        else:
            from node.bench.live import LiveOptions, run_live

            live = LiveOptions(**common, out=args.out, spares=args.spares, threads=args.threads)
            results = run_live(live, progress)
    json_path, png_path = write_results(results, args.out)
    if args.json:
        print(json_path.read_text(encoding="utf-8"))
        return 0
    table = Table(title=f"time to validation loss {results.target_loss:.3f} ({args.mode})")
    for col in ("strategy", "failure rate", "failures", "iterations", "minutes", "final val loss", "recover s"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for r in results.runs:
        table.add_row(
            r.strategy,
            f"{r.failure_rate:g}",
            str(r.failures),
            "-" if r.iterations_to_target is None else str(r.iterations_to_target),
            "never" if r.seconds_to_target is None else f"{r.seconds_to_target / 60:.2f}",
            "-" if r.final_val_loss is None else f"{r.final_val_loss:.3f}",
            f"{sum(r.recover_seconds) / len(r.recover_seconds):.2f}" if r.recover_seconds else "-",
        )
    Console().print(table)
    Console().print(f"wrote {json_path} and {png_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    from node.config import ConfigError
    from node.data import DataError
    from node.local.launcher import LocalSwarmError

    try:
        if args.command == "dht":
            from node.dht.bootstrap import run_bootstrap

            return run_bootstrap(
                args.host, args.port, args.identity, args.json, args.announce_maddr, maddr_file=args.maddr_file
            )
        if args.command == "run":
            return cmd_run(args)
        if args.command == "local":
            return cmd_local(args)
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "status":
            from node.status import print_status, read_swarm

            records, malformed = read_swarm(args.initial_peers, args.swarm)
            print_status(records, malformed, args.json)
            return 0
    except (CliError, ConfigError, DataError) as err:
        print(f"swarm-node: error: {err}", file=sys.stderr)
        return 2
    except LocalSwarmError as err:
        print(f"swarm-node: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("swarm-node: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2
