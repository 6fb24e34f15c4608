"""The argparse tree of the ``swarm-node`` command line: one builder per subcommand.

Every flag's type is a validator from :mod:`node.cli.flags`, so a bad value ends the program before anything
starts; the flags that configure a node take their defaults and help text from :mod:`node.options`.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

from node import __version__
from node.cli.flags import (
    _add_durability_flags,
    _add_eval_flags,
    _add_model_flags,
    _add_preemption_flags,
    _add_recovery_flags,
    _add_timing_flags,
    _checkpoint_intervals,
    _dataclass_default,
    _flag_of_field,
    _maddr,
    _non_negative_float,
    _non_negative_int,
    _option,
    _peer,
    _port,
    _positive_float,
    _positive_int,
    _probabilities,
    _probability,
    _snapshot_intervals,
    _stage_arg,
    _strategies,
    _swarm_name,
)
from node.cli.model import add_local_model_flags, add_model_source_flags
from node.cli.model import add_parsers as add_model_parsers
from node.options import NodeOptions, Placement, SecurityOptions, default, describe

DESCRIPTION = (
    "The ``swarm-node`` command line: ``dht``, ``run``, ``local``, ``status``; ``export``, ``generate``, "
    "``tokenizer``, ``data``."
)
_BENCH_ITERATIONS = {"simulate": 300, "live": 60}  # default --iterations of each mode
_BENCH_EVAL_POINTS = 30  # default --eval-every: about this many validation points per run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm-node", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"swarm-node {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_keys, _add_dht, _add_run, _add_local, _add_bench, _add_status):
        add(sub)
    add_model_parsers(sub)  # export, generate, tokenizer, data
    return parser


def _add_keys(sub: Any) -> None:
    """``keys``: the swarm authority and node bundles."""
    p = sub.add_parser("keys", help="create a swarm authority, or issue a node's certificate, key and DHT token")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("init", help="create a swarm authority (CA, token signing key, swarm secret) in DIR")
    k.add_argument("dir", type=pathlib.Path, help="directory for the authority; keep it off the nodes")
    k.add_argument("--nodes", help="also issue these nodes' bundles (comma-separated names) into DIR/nodes")
    k.add_argument("--if-missing", action="store_true", help="keep an authority (and bundles) that DIR already holds")
    k = keys.add_parser("issue", help="issue node NAME's bundle (certificate, key, DHT token) from the authority")
    k.add_argument("dir", type=pathlib.Path, help="the authority's directory (from keys init)")
    k.add_argument("name", help="node name: lowercase letters, digits, '.' and '-' (it is the certificate's CN)")
    k.add_argument("--out", type=pathlib.Path, help="bundle directory (default DIR/nodes/NAME)")
    k.add_argument("--json", action="store_true", help="print {name, bundle, fingerprint} as JSON")


def _add_security_flags(p: Any, *, node_flags: bool = True) -> None:
    """--keys and --insecure (every command that joins a swarm), and for a node also --reflection."""
    g = p.add_argument_group("security")
    if node_flags:
        _option(g, "--keys", "security.keys", type=pathlib.Path)
        _option(g, "--insecure", "security.insecure", action="store_const", const=True)
        _option(g, "--reflection", "security.reflection", action="store_const", const=True)
        _option(g, "--metrics-tls", "security.metrics_tls", action="store_const", const=True)
    else:
        g.add_argument("--keys", type=pathlib.Path, help=describe(SecurityOptions, "keys"))
        g.add_argument("--insecure", action="store_true", help=describe(SecurityOptions, "insecure"))


def _add_dht(sub: Any) -> None:
    """``dht``: a bootstrap DHT node."""
    p = sub.add_parser("dht", help="run a bootstrap DHT node; prints its multiaddr")
    p.add_argument(
        "--host", default=default(NodeOptions, "host"), help="IPv4 address to listen on (default %(default)s)"
    )
    p.add_argument("--port", type=_port, default=31337, help="TCP port (default %(default)s; 0 picks one)")
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
    _add_security_flags(p, node_flags=False)


def _add_run(sub: Any) -> None:
    """``run``: one stage daemon, its flags filling NodeOptions."""
    p = sub.add_parser("run", help="run one stage daemon")
    p.add_argument(
        "--options",
        type=pathlib.Path,
        help="take every option from this JSON file (NodeOptions, as `local` writes one for each of its nodes); "
        "then no other option flag is given",
    )
    _option(
        p,
        "--stage",
        "stage",
        type=_stage_arg,
        help="pipeline stage (0 = embedding + head), or 'auto': take a vacant stage or wait as a spare "
        "(required without --options)",
    )
    p.add_argument(
        "--num-stages",
        type=_positive_int,
        default=argparse.SUPPRESS,
        help="number of pipeline stages S (required without --options)",
    )
    _option(
        p, "--initial-peers", "initial_peers", type=_maddr, action="append", help="bootstrap multiaddr (repeatable)"
    )
    p.add_argument(
        "--initial-peers-file",
        type=pathlib.Path,
        help="read bootstrap multiaddrs from this file (written by `dht --maddr-file`), waiting for it to appear",
    )
    _option(p, "--swarm", "swarm", type=_swarm_name)
    _option(p, "--host", "host")
    _option(p, "--port", "port", type=_port)
    _option(p, "--announce-host", "announce_host")
    _option(p, "--announce-port", "announce_port", type=_port)
    _option(p, "--dht-port", "dht_port", type=_port)
    _option(p, "--steps", "steps", type=_positive_int)
    _option(p, "--events-file", "events_file", type=pathlib.Path)
    _option(p, "--save-dir", "save_dir", type=pathlib.Path)
    _option(p, "--device", "device", choices=["auto", "cpu", "cuda"])
    _option(p, "--placement", "placement", choices=[p.value for p in Placement])
    _option(p, "--threads", "threads", type=_positive_int)
    _add_timing_flags(p)
    _option(p, "--rpc-timeout", "timing.rpc_timeout", type=_positive_float)
    _option(p, "--metrics-port", "metrics_port", type=_port)
    _option(p, "--metrics-host", "metrics_host")
    _add_security_flags(p)
    _add_recovery_flags(p)
    _option(p, "--checkpoint-dir", "recovery.checkpoint_dir", metavar="URL")
    _add_durability_flags(p)
    _add_eval_flags(p)
    _add_preemption_flags(p)
    _option(p, "--fault", "faults", action="append", help=argparse.SUPPRESS)  # tests: STAGE@STEP[:PHASE]
    _add_model_flags(p)
    add_model_source_flags(p)


def _add_local(sub: Any) -> None:
    """``local``: a whole swarm on this machine."""
    from node.local.launcher import LocalOptions

    p = sub.add_parser("local", help="run a whole swarm on this machine")
    p.add_argument("--stages", type=_positive_int, default=4, help="pipeline stages (default %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=300, help="training steps (default %(default)s)")
    p.add_argument("--json-out", type=pathlib.Path, help="write the run summary here")
    p.add_argument(
        "--check-reference", action="store_true", help="also train in one process and report reference_max_abs_diff"
    )
    p.add_argument("--workdir", type=pathlib.Path, help="keep logs, events and weights here")
    p.add_argument("--threads", type=_positive_int, help="torch threads per stage (default: cores / stages)")
    _add_timing_flags(p)
    p.add_argument("--quiet", action="store_true", help="no live progress")
    _flag_of_field(
        p,
        "--metrics",
        LocalOptions,
        action=argparse.BooleanOptionalAction,
        help="serve Prometheus metrics (default on)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="run without keys (by default local makes a throw-away swarm authority in WORKDIR/keys)",
    )
    _add_recovery_flags(p)
    _option(p, "--checkpoint-dir", "recovery.checkpoint_dir", help="checkpoint: where (default WORKDIR/checkpoints)",
            metavar="URL")  # fmt: skip
    _add_durability_flags(p)
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
        "spare@STEP kills an idle spare); repeatable (with --replicas: one replica per kill)",
    )
    g.add_argument(
        "--preempt",
        action="append",
        default=[],
        metavar="STAGE@STEP[:NOTICE_SECONDS][:PROVIDER][:soft@SOFT_STEP]",
        help="once that step starts, a local metadata server (aws, gcp, azure) announces the preemption of that "
        "stage's node, or it gets SIGTERM (signal); SIGKILL when the notice ends (default 30 s, aws); soft@N: "
        "a soft notice (aws rebalance, gcp migration) once step N starts; repeatable",
    )
    _flag_of_field(
        g,
        "--preemption-rate",
        LocalOptions,
        type=_probability,
        help="each block stage's node gets a preemption notice (SIGTERM) with this probability per step",
    )
    _flag_of_field(
        g, "--notice-seconds", LocalOptions, type=_positive_float, help="--preemption-rate: the notice's window"
    )
    _flag_of_field(
        g,
        "--failure-rate",
        LocalOptions,
        type=_probability,
        help="each block stage fails independently with this probability per step",
    )
    _flag_of_field(
        g,
        "--stage0-failures",
        LocalOptions,
        action=argparse.BooleanOptionalAction,
        help="--failure-rate and --preemption-rate hit stage 0 too (data, embedding, head: checkfree+, ladder "
        "and checkpoint rebuild it; default off)",
    )
    _flag_of_field(
        g,
        "--respawn",
        LocalOptions,
        action=argparse.BooleanOptionalAction,
        help="restart a killed node as --stage auto, like a spot replacement (default on)",
    )
    _flag_of_field(
        g, "--spares", LocalOptions, type=_non_negative_int, help="extra --stage auto nodes waiting as spares"
    )
    _flag_of_field(
        g, "--placement", LocalOptions, choices=[p.value for p in Placement],
        help="vacant: spares claim vacant stages only; throughput: with none vacant they join the block stage "
        "with the least throughput as replicas, and replicas move to refill a vacant stage (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--replicas",
        metavar="R|R0,R1,...",
        help="peers per stage: R for every block stage, or one count per stage (stage 0 always has one); the "
        "extra replicas join once the swarm trains, each with an exact copy of a live replica",
    )
    p.add_argument(
        "--replica-slowdown",
        type=_positive_float,
        default=1.0,
        help="benchmark aid: every extra replica computes this many times slower (default %(default)s)",
    )
    p.add_argument(
        "--emulate-compute",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="benchmark aid: block stages also sleep this long per microbatch and direction, so that replica "
        "parallelism can be measured on few cores (never used by tests to pass)",
    )
    p.add_argument(
        "--link-rtt-ms",
        type=_non_negative_float,
        default=0.0,
        metavar="MS",
        help="benchmark aid: every node's gRPC traffic crosses an emulated link with this round-trip time "
        "(a userspace proxy in front of each node)",
    )
    p.add_argument(
        "--link-mbit",
        type=_non_negative_float,
        default=0.0,
        metavar="MBIT",
        help="benchmark aid: the emulated link's rate in each direction, in Mbit/s (default: unlimited)",
    )
    _add_model_flags(p)
    add_model_source_flags(p)
    add_local_model_flags(p)


def _add_bench(sub: Any) -> None:
    """``bench``: recovery strategies compared by time to a target validation loss."""
    from node.bench import PAPER_STEP_SECONDS, STRATEGIES, BenchOptions, SimulateOptions
    from node.bench.live import LiveOptions

    p = sub.add_parser("bench", help="compare recovery strategies by wall-clock time to a target validation loss")
    p.add_argument("--mode", choices=list(_BENCH_ITERATIONS), default="simulate", help="one process, or a real swarm")
    p.add_argument(
        "--strategies",
        type=_strategies,
        default=",".join(STRATEGIES),
        help=f"comma-separated: {', '.join(STRATEGIES)} (default all)",
    )
    p.add_argument(
        "--failure-rates",
        type=_probabilities,
        default="0.001,0.003,0.01",
        help="comma-separated per-stage per-iteration failure probabilities (default %(default)s)",
    )
    p.add_argument(
        "--failures-per-hour",
        type=_probabilities,
        help="instead of --failure-rates: per-stage probabilities of failing within an hour (the paper's 0.05,0.1,"
        "0.16), each turned into a per-iteration rate for iterations of --hour-step-seconds",
    )
    p.add_argument(
        "--hour-step-seconds",
        type=_positive_float,
        default=PAPER_STEP_SECONDS,
        help="--failures-per-hour: the stated seconds per iteration (default %(default)s, the paper's)",
    )
    p.add_argument(
        "--iterations",
        type=_positive_int,
        help="iterations per run (default " + ", ".join(f"{n} {mode}" for mode, n in _BENCH_ITERATIONS.items()) + ")",
    )
    p.add_argument("--target-loss", type=_positive_float, help="default: the no-failure run's at ~2/3 of the run")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"), help="results directory")
    _flag_of_field(
        p, "--seeds", BenchOptions, type=_positive_int,
        help="runs per strategy and rate, seeds --seed, --seed+1, ...: tables give mean ± sd (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--stages", type=_positive_int, default=7, help="pipeline stages (default %(default)s: 6 block stages)"
    )
    p.add_argument("--seq-len", type=_positive_int, default=64, help="sequence length (default %(default)s)")
    p.add_argument(
        "--checkpoint-every",
        type=_checkpoint_intervals,
        default=",".join(map(str, _dataclass_default(BenchOptions, "checkpoint_every"))),
        help="checkpoint strategy: comma-separated intervals K in steps, each a run of its own; 'auto' picks K by "
        "Young–Daly from the measured costs (simulate; default %(default)s)",
    )
    p.add_argument(
        "--snapshot-neighbour-every",
        type=_snapshot_intervals,
        default=",".join(map(str, _dataclass_default(BenchOptions, "snapshot_neighbour_every"))),
        help="ladder: comma-separated intervals K in steps of every stage's neighbour snapshot, each a run of its "
        "own (default %(default)s)",
    )
    _flag_of_field(
        p,
        "--notice-fraction",
        BenchOptions,
        type=_probability,
        help="the share of failures that come with a preemption notice and are handed over (default %(default)s)",
    )
    _flag_of_field(
        p, "--notice-seconds", BenchOptions, type=_positive_float, help="live: the notice window (default %(default)s)"
    )
    sim = p.add_argument_group("simulate mode: the regime on the clock")
    for flag, kind, text in (
        ("--failure-overhead-seconds", _non_negative_float, "seconds added to every failure: detection, claim, "
         "replacement start-up (e.g. from --mode live; default %(default)s)"),
        ("--step-seconds", _positive_float, "seconds per iteration (default: the no-failure run's measured median)"),
        ("--stage-mib", _positive_float, "a block stage's weights in MiB: every byte count and state copy is "
         "scaled to it (default: the trained model's own)"),
        ("--storage-bandwidth", _positive_float, "MB/s of one node's checkpoint writes and reads to off-node "
         "storage (default %(default)s)"),
        ("--storage-latency", _non_negative_float, "seconds per storage request (default %(default)s)"),
        ("--link-bandwidth", _positive_float, "MB/s of one node's network link: rebuild fetches, snapshot sends, "
         "stage-0 copies (default %(default)s)"),
    ):  # fmt: skip
        _flag_of_field(sim, flag, SimulateOptions, type=kind, help=text)
    sim.add_argument(
        "--failure-overhead-from", type=pathlib.Path, metavar="RESULTS_JSON",
        help="instead of --failure-overhead-seconds: the median death -> next commit of a --mode live bench",
    )  # fmt: skip
    _flag_of_field(
        p, "--stage0-failures", BenchOptions, action=argparse.BooleanOptionalAction,
        help="stage 0 fails like the others (default %(default)s; the paper's CheckFree runs spare it)",
    )  # fmt: skip
    _flag_of_field(
        p,
        "--lr-scale",
        BenchOptions,
        type=_positive_float,
        help="lr multiplier of a rebuilt stage (default %(default)s)",
    )
    p.add_argument(
        "--eval-every",
        type=_positive_int,
        help=f"validation every E committed steps (default: ~{_BENCH_EVAL_POINTS} points)",
    )
    _flag_of_field(
        p,
        "--eval-batches",
        BenchOptions,
        type=_positive_int,
        help="held-out microbatches per evaluation (default %(default)s)",
    )
    _flag_of_field(
        p, "--spares", LiveOptions, type=_non_negative_int, help="live: spare nodes per run (default %(default)s)"
    )
    p.add_argument(
        "--checkpoint-to", metavar="URL",
        help="live: where checkpoint runs store their checkpoints (a path, or s3://bucket/prefix: off the nodes, "
        "as on spot VMs; default each run's workdir)",
    )  # fmt: skip
    p.add_argument("--storage-endpoint", metavar="URL", help="live: the S3 endpoint of --checkpoint-to")
    p.add_argument("--threads", type=_positive_int, help="torch threads (simulate) or per stage (live)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout")
    _add_model_flags(
        p,
        "model and training",
        seed=_dataclass_default(BenchOptions, "seed"),
        microbatches=2,
        microbatch_size=4,
    )


def _add_status(sub: Any) -> None:
    """``status``: the swarm's stage records, from a stage daemon (``--peer``) or the DHT."""
    from node.status import LOCAL_SWARM

    p = sub.add_parser(
        "status",
        help="show the swarm's stages (fast with --peer: one gRPC call to a stage daemon; else from the DHT)",
        description="Needs --peer or --initial-peers (or both: the DHT is read when no --peer answers). "
        f"swarm-node local prints the command for its swarm ({LOCAL_SWARM!r}).",
    )
    p.add_argument(
        "--peer", type=_peer, action="append", default=[],
        help="a stage daemon's gRPC HOST:PORT (status's address column): ask it for its view of the swarm, "
        "which answers in well under a second; repeat for fallbacks",
    )  # fmt: skip
    p.add_argument(
        "--initial-peers", type=_maddr, action="append", default=[],
        help="bootstrap multiaddr: read the DHT (takes seconds: starts a DHT client)",
    )  # fmt: skip
    p.add_argument(
        "--swarm",
        type=_swarm_name,
        help=f"swarm name (default: the --peer's swarm, else {default(NodeOptions, 'swarm')!r}; "
        f"local swarms use {LOCAL_SWARM!r})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--wide", action="store_true", help="every column (node, peer, epoch, metrics port, CheckFree+)")
    p.add_argument(
        "--watch", type=_positive_float, nargs="?", const=2.0, metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C; with --json, one line per reading",
    )  # fmt: skip
    _add_security_flags(p, node_flags=False)
