"""The ``swarm-node`` command line: ``dht``, ``run``, ``local``, ``status``.

Every flag is validated before anything starts; a bad value ends the program with one line
``swarm-node: error: <what is wrong>`` and exit code 2.

The flags that configure a node fill :class:`node.options.NodeOptions` (``run``; ``local`` hands the
same model to each of its nodes as a file): each such flag takes its default and help text from the
model, and a flag not given leaves the model's default in place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from node import __version__
from node.config import PRESETS, SwarmConfig
from node.options import EvalOptions, NodeOptions, RecoveryOptions, RecoveryStrategy, TimingOptions, default, describe

if TYPE_CHECKING:
    from node.local.launcher import LocalOptions

M = TypeVar("M", bound=BaseModel)


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def _number(
    kind: type[int] | type[float],
    *,
    low: float,
    high: float = math.inf,
    above: bool = False,
    message: str,
    high_message: str | None = None,
) -> Callable[[str], Any]:
    """A flag type: a finite ``kind`` number at least ``low`` (above it, with ``above``) and at most ``high``.
    A value out of range is rejected with ``message`` (``high_message`` above ``high``)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value > high:
            raise argparse.ArgumentTypeError(f"{text} {high_message or message}")
        if not (value > low if above else value >= low) or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text} {message}")
        return value

    return parse


_positive_int = _number(int, low=1, message="must be positive")
_non_negative_int = _number(int, low=0, message="must be >= 0")
_port = _number(int, low=0, message="must be >= 0", high=65535, high_message="is not a TCP port")
_positive_float = _number(float, low=0, above=True, message="must be a positive number")
_non_negative_float = _number(float, low=0, message="must be a finite number >= 0")
_probability = _number(float, low=0, high=1, message="is not a probability in [0, 1]")


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


# ---- flags that fill NodeOptions ------------------------------------------------------------------
_NODE = "node:"  # dest prefix of a flag that fills NodeOptions: the dotted path of its field follows
_FLAG_OF: dict[str, str] = {}  # NodeOptions path -> its flag, to name the flag in an error


def _field(path: str) -> tuple[type[BaseModel], str]:
    """The model and field name of a dotted NodeOptions path (``timing.refresh_seconds``)."""
    model: type[BaseModel] = NodeOptions
    *groups, name = path.split(".")
    for group in groups:
        model = model.model_fields[group].annotation  # type: ignore[assignment]
    return model, name


def _option(group: Any, flag: str, path: str, *, help: str | None = None, **kw: Any) -> None:
    """A flag that fills ``NodeOptions`` at ``path``, its default and help text from the model. A flag not
    given is absent from the parsed namespace, so the model's default applies."""
    model, name = _field(path)
    if help != argparse.SUPPRESS:
        help = help or describe(model, name)
        if not model.model_fields[name].is_required() and (value := default(model, name)) not in (None, []):
            help += f" (default {value})"
        help = help.replace("%", "%%")
    if "choices" not in kw:
        kw.setdefault("metavar", flag.removeprefix("--").replace("-", "_").upper())
    _FLAG_OF[path] = flag
    group.add_argument(flag, dest=_NODE + path, default=argparse.SUPPRESS, help=help, **kw)


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The NodeOptions fields given as flags, nested like the model (``{"timing": {"refresh_seconds": 2.0}}``)."""
    tree: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(_NODE):
            *groups, name = dest.removeprefix(_NODE).split(".")
            node = tree
            for group in groups:
                node = node.setdefault(group, {})
            node[name] = value
    return tree


def _strategy(given: dict[str, Any]) -> RecoveryStrategy:
    return RecoveryStrategy(given.get("recovery", {}).get("strategy", default(RecoveryOptions, "strategy")))


def _one_line(err: ValidationError, at: str = "", flags: bool = True) -> str:
    """The first error of ``err`` as one line, naming the flag (or with ``flags=False``, the field)."""
    first = err.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":  # a check across fields: its message names the flags
        return message
    path = ".".join(str(p) for p in ((at,) if at else ()) + tuple(first["loc"]))
    where = _FLAG_OF.get(path, path) if flags else path
    return f"{where}: {message}" if where else message


def _validate(model: type[M], data: dict[str, Any], at: str = "") -> M:
    """``model`` from flag values; a ValidationError becomes one line (``at``: the model's path in NodeOptions)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise CliError(_one_line(err, at)) from None


def _add_timing_flags(g: Any) -> None:
    _option(g, "--refresh", "timing.refresh_seconds", type=_positive_float)
    _option(g, "--step-timeout", "timing.step_timeout", type=_positive_float)


def _add_recovery_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("failure detection and recovery")
    _option(
        g,
        "--recovery",
        "recovery.strategy",
        choices=[s.value for s in RecoveryStrategy],
        help="how a lost stage is rebuilt: checkfree (neighbour average), checkfree+ (also edge stages and "
        "stage 0, with the out-of-order pipeline; needs S >= 5), checkpoint (every stage writes checkpoints; "
        "the swarm rolls back to the last common one), copy (one neighbour's weights) or random (fresh random "
        "weights; 'none' is the same)",
    )
    _option(g, "--checkpoint-every", "recovery.checkpoint_every", type=_positive_int)
    _option(g, "--embed-sync-every", "recovery.embed_sync_every", type=_positive_int)
    _option(g, "--lr-scale", "recovery.lr_scale", type=_positive_float)
    _option(g, "--heartbeat-interval", "timing.heartbeat_interval", type=_positive_float)
    _option(g, "--heartbeat-timeout", "timing.heartbeat_timeout", type=_positive_float)


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (stage 0)")
    _option(g, "--eval-every", "eval.every", type=_non_negative_int)
    _option(g, "--eval-batches", "eval.batches", type=_positive_int)


def _check_checkpoint_dir(path: pathlib.Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"--checkpoint-dir {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"--checkpoint-dir {path} is not writable")


# ---- model and training flags (SwarmConfig) -------------------------------------------------------
_TRAIN_FLAGS = {  # flag dest -> TrainConfig field
    "seed": "seed",
    "microbatches": "microbatches_per_step",
    "microbatch_size": "microbatch_size",
    "lr": "lr",
}


def _add_model_flags(
    p: argparse.ArgumentParser, title: str = "model and training (must be the same on every stage)", **defaults: Any
) -> None:
    """The flags that override the preset's config; those in ``defaults`` have a default of the command's own,
    the others leave the config's value in place when not given."""
    g = p.add_argument_group(title)

    def add(flag: str, help: str, **kw: Any) -> None:
        dest = flag.removeprefix("--").replace("-", "_")
        if dest in defaults:
            kw["default"], help = defaults[dest], f"{help} (default %(default)s)"
        g.add_argument(flag, **{"default": argparse.SUPPRESS, **kw}, help=help)

    add("--preset", f"model/training preset: {', '.join(PRESETS)} (default {default(SwarmConfig, 'preset')})")
    add("--config", "TOML or JSON file overriding the preset", type=pathlib.Path)
    add("--data", "a .txt or .jsonl file (or a directory of them); default: built-in corpus")
    add("--seed", "training seed (initial weights and batches)", type=_non_negative_int)
    add("--microbatches", "microbatches per step", type=_positive_int)
    add("--microbatch-size", "sequences per microbatch", type=_positive_int)
    add("--lr", "AdamW learning rate", type=_positive_float)


def _build_config(args: argparse.Namespace, num_stages: int, *, out_of_order: bool, **train: Any) -> SwarmConfig:
    """The preset, then ``--config``, then the model and training flags given (and ``train``)."""
    from node.config import build_config

    given = vars(args)
    train |= {key: given[flag] for flag, key in _TRAIN_FLAGS.items() if flag in given}
    overrides: dict[str, Any] = {"num_stages": num_stages, "out_of_order": out_of_order}
    if train:
        overrides["train"] = train
    if "data" in given:
        overrides["data"] = given["data"]
    preset = given.get("preset", default(SwarmConfig, "preset"))
    return build_config(preset=preset, config_file=given.get("config"), overrides=overrides)


def _dataclass_default(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name`` (a command's own default, written there only)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _flag_of_field(group: Any, flag: str, cls: type, help: str, **kw: Any) -> None:
    """A flag whose default is that of the field of dataclass ``cls`` named like it (``--lr-scale``: ``lr_scale``)."""
    name = flag.removeprefix("--").replace("-", "_")
    group.add_argument(flag, default=_dataclass_default(cls, name), help=help, **kw)


_BENCH_ITERATIONS = {"simulate": 300, "live": 60}  # default --iterations of each mode
_BENCH_EVAL_POINTS = 30  # default --eval-every: about this many validation points per run


def _parser() -> argparse.ArgumentParser:
    from node.bench import STRATEGIES, BenchOptions
    from node.bench.live import LiveOptions
    from node.local.launcher import SWARM as LOCAL_SWARM
    from node.local.launcher import LocalOptions

    parser = argparse.ArgumentParser(prog="swarm-node", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"swarm-node {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)

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
    _option(p, "--dht-port", "dht_port", type=_port)
    _option(p, "--steps", "steps", type=_positive_int)
    _option(p, "--events-file", "events_file", type=pathlib.Path)
    _option(p, "--save-dir", "save_dir", type=pathlib.Path)
    _option(p, "--device", "device", choices=["auto", "cpu", "cuda"])
    _option(p, "--threads", "threads", type=_positive_int)
    _add_timing_flags(p)
    _option(p, "--rpc-timeout", "timing.rpc_timeout", type=_positive_float)
    _option(p, "--metrics-port", "metrics_port", type=_port)
    _add_recovery_flags(p)
    _option(p, "--checkpoint-dir", "recovery.checkpoint_dir", type=pathlib.Path)
    _add_eval_flags(p)
    _option(p, "--fault", "faults", action="append", help=argparse.SUPPRESS)  # tests: STAGE@STEP[:PHASE]
    _add_model_flags(p)

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
    _add_recovery_flags(p)
    _option(p, "--checkpoint-dir", "recovery.checkpoint_dir", help="checkpoint: where (default WORKDIR/checkpoints)",
            type=pathlib.Path)  # fmt: skip
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
    _flag_of_field(
        g,
        "--failure-rate",
        LocalOptions,
        type=_probability,
        help="each block stage fails independently with this probability per step",
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
    _add_model_flags(p)

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
        "--iterations",
        type=_positive_int,
        help="iterations per run (default " + ", ".join(f"{n} {mode}" for mode, n in _BENCH_ITERATIONS.items()) + ")",
    )
    p.add_argument("--target-loss", type=_positive_float, help="default: the no-failure run's at ~2/3 of the run")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results"), help="results directory")
    p.add_argument(
        "--stages", type=_positive_int, default=7, help="pipeline stages (default %(default)s: 6 block stages)"
    )
    p.add_argument("--seq-len", type=_positive_int, default=64, help="sequence length (default %(default)s)")
    _flag_of_field(
        p,
        "--checkpoint-every",
        BenchOptions,
        type=_positive_int,
        help="checkpoint strategy: every K steps (default %(default)s)",
    )
    _flag_of_field(
        p,
        "--redundant-factor",
        BenchOptions,
        type=_positive_float,
        help="redundant computation: time per iteration × this (default %(default).3f, the paper's measured ratio)",
    )
    p.add_argument(
        "--failure-overhead-seconds",
        type=_non_negative_float,
        default=argparse.SUPPRESS,
        help="simulate: seconds added to every failure (detection and replacement start, e.g. from --mode live)",
    )
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
        help=f"validation every E iterations (default: ~{_BENCH_EVAL_POINTS} points)",
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
    p.add_argument("--threads", type=_positive_int, help="torch threads (simulate) or per stage (live)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout")
    _add_model_flags(
        p,
        "model and training",
        seed=_dataclass_default(BenchOptions, "seed"),
        microbatches=2,
        microbatch_size=4,
    )

    p = sub.add_parser("status", help="show the swarm as the DHT sees it")
    p.add_argument("--initial-peers", type=_maddr, action="append", required=True, help="bootstrap multiaddr")
    p.add_argument(
        "--swarm",
        type=_swarm_name,
        default=default(NodeOptions, "swarm"),
        help=f"swarm name (default %(default)s; local swarms use {LOCAL_SWARM!r})",
    )
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


_RUN_SOURCES = frozenset({"command", "verbose", "options", "initial_peers_file"})  # allowed with --options


def _options_from_flags(args: argparse.Namespace) -> NodeOptions:
    """``run``'s NodeOptions from its flags."""
    required = (("--stage", _NODE + "stage"), ("--num-stages", "num_stages"))
    missing = [flag for flag, dest in required if dest not in args]
    if missing:
        raise CliError(f"the following arguments are required: {', '.join(missing)} (or --options FILE)")
    given = _given(args)
    cfg = _build_config(args, args.num_stages, out_of_order=_strategy(given).out_of_order)
    given["faults"] = [str(f) for f in _parse_faults(given.get("faults", []), args.num_stages)]
    return _validate(NodeOptions, {**given, "config": cfg})


def _options_from_file(args: argparse.Namespace) -> NodeOptions:
    """``run --options FILE``: the complete NodeOptions in FILE (no option flag beside it)."""
    path: pathlib.Path = args.options
    flags = [
        _FLAG_OF[dest.removeprefix(_NODE)] if dest.startswith(_NODE) else "--" + dest.replace("_", "-")
        for dest in vars(args)
        if dest not in _RUN_SOURCES
    ]
    if flags:
        raise CliError(f"--options {path} holds every option; drop {', '.join(flags)}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CliError(f"--options {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise CliError(f"--options {path}: {err}") from None
    try:
        opts = NodeOptions.model_validate_json(text)
    except ValidationError as err:
        raise CliError(f"--options {path}: {_one_line(err, flags=False)}") from None
    _parse_faults(opts.faults, opts.num_stages)
    return opts


def cmd_run(args: argparse.Namespace) -> int:
    from node.stage.daemon import run_daemon

    opts = _options_from_file(args) if args.options is not None else _options_from_flags(args)
    if args.initial_peers_file is not None:
        peers = [*opts.initial_peers, *_read_initial_peers(args.initial_peers_file)]
        opts = opts.model_copy(update={"initial_peers": peers})
    if opts.recovery.checkpoint_dir is not None and opts.recovery.strategy is RecoveryStrategy.CHECKPOINT:
        _check_checkpoint_dir(opts.recovery.checkpoint_dir)
    if opts.stage in (0, None) and opts.config.data is not None:
        from node.data import load_corpus

        load_corpus(opts.config.data).check_fits(opts.config.train.seq_len)  # fail now, with the file named
    return run_daemon(opts)


def _local_options(args: argparse.Namespace, workdir: pathlib.Path) -> LocalOptions:
    """``local``'s swarm from its flags; its files go to ``workdir``."""
    from node.data import load_corpus
    from node.local.launcher import LocalOptions

    given = _given(args)
    strategy = _strategy(given)
    cfg = _build_config(args, args.stages, out_of_order=strategy.out_of_order)
    load_corpus(cfg.data).check_fits(cfg.train.seq_len)
    recovery = given.get("recovery", {})
    if strategy is RecoveryStrategy.CHECKPOINT:
        if "checkpoint_dir" in recovery:
            _check_checkpoint_dir(recovery["checkpoint_dir"])
        else:
            recovery = {**recovery, "checkpoint_dir": workdir / "checkpoints"}
    return LocalOptions(
        config=cfg,
        steps=args.steps,
        workdir=workdir,
        check_reference=args.check_reference,
        threads=args.threads or max(1, (os.cpu_count() or 1) // args.stages),
        quiet=args.quiet,
        timing=_validate(TimingOptions, given.get("timing", {}), at="timing"),
        recovery=_validate(RecoveryOptions, recovery, at="recovery"),
        eval=_validate(EvalOptions, given.get("eval", {}), at="eval"),
        kills=_parse_faults(args.kill, args.stages),
        failure_rate=args.failure_rate,
        respawn=args.respawn,
        spares=args.spares,
        seed=cfg.train.seed,
        prometheus_dir=args.prometheus_dir,
        metrics=args.metrics,
    )


def cmd_local(args: argparse.Namespace) -> int:
    import signal
    import tempfile

    from node.local.launcher import LocalSwarm

    def _terminate(*_: object) -> None:
        raise KeyboardInterrupt  # runs the launcher's clean-up, like Ctrl-C

    signal.signal(signal.SIGTERM, _terminate)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir
        if workdir is None:  # a temporary one, deleted at exit
            workdir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swarm-node-local-")))
        swarm = LocalSwarm(_local_options(args, workdir))
        summary = swarm.run()
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

    cfg = _build_config(args, args.stages, out_of_order=False, seq_len=args.seq_len)
    if "checkfree+" in args.strategies:
        _build_config(args, args.stages, out_of_order=True, seq_len=args.seq_len)
    iterations = args.iterations or _BENCH_ITERATIONS[args.mode]
    eval_every = args.eval_every or max(1, iterations // _BENCH_EVAL_POINTS)
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
            if "failure_overhead_seconds" in args:
                common["failure_overhead_seconds"] = args.failure_overhead_seconds
            results = run_simulation(SimulateOptions(**common), progress)
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
