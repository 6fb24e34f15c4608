"""What each ``swarm-node`` subcommand does with its parsed flags: ``dht``, ``run``, ``local``, ``bench``,
``status``.

``run`` builds its :class:`~node.options.NodeOptions` from flags or from ``--options FILE``; ``local`` builds
the launcher's :class:`~node.local.launcher.LocalOptions` from the same flags. A user error raises
:class:`~node.cli.flags.CliError`; ``main`` turns it into one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from node.cli.flags import (
    _FLAG_OF,
    _NODE,
    CliError,
    _build_config,
    _check_storage,
    _given,
    _maddr,
    _one_line,
    _strategy,
    _validate,
    load_credentials,
)
from node.cli.model import after_local_run, build_swarm_config
from node.cli.parser import _BENCH_EVAL_POINTS, _BENCH_ITERATIONS
from node.options import (
    DurabilityOptions,
    EvalOptions,
    NodeOptions,
    Placement,
    RecoveryOptions,
    RecoveryStrategy,
    TimingOptions,
)

if TYPE_CHECKING:
    from node.local.launcher import LocalOptions


def cmd_keys(args: argparse.Namespace) -> int:
    """``keys init DIR`` / ``keys issue DIR NAME``."""
    from node.security.keys import CredentialsError, NodeCredentials, init_authority, issue_node

    try:
        if args.keys_command == "init":
            if not (args.if_missing and (args.dir / "ca.key").exists()):
                init_authority(args.dir)
            for name in filter(None, (args.nodes or "").split(",")):
                if not (args.if_missing and (args.dir / "nodes" / name / "node.pem").exists()):
                    issue_node(args.dir, name.strip())
            print(f"swarm authority in {args.dir}; issue each node's bundle with: swarm-node keys issue "
                  f"{args.dir} NAME")  # fmt: skip
            return 0
        bundle = issue_node(args.dir, args.name, args.out)
        creds = NodeCredentials.load(bundle)
    except CredentialsError as err:
        raise CliError(str(err)) from None
    if args.json:
        print(json.dumps({"name": creds.name, "bundle": str(bundle), "fingerprint": creds.fingerprint}))
    else:
        print(f"{bundle}  (node {creds.name}, certificate {creds.fingerprint[:16]}…): run it with --keys {bundle}")
    return 0


def _security_of(args: argparse.Namespace):
    """``--keys`` / ``--insecure`` of a command that joins a swarm's DHT (dht, status): its credentials."""
    if args.keys is None and not args.insecure:
        raise CliError(
            "joining a swarm needs a key bundle (--keys BUNDLE, made by swarm-node keys issue); to use an open "
            "DHT that anyone can join and write, pass --insecure"
        )
    if args.keys is not None and args.insecure:
        raise CliError("--keys and --insecure exclude each other")
    return load_credentials(args.keys)


def cmd_dht(args: argparse.Namespace) -> int:
    from node.dht.bootstrap import run_bootstrap

    creds = _security_of(args)
    return run_bootstrap(
        args.host, args.port, args.identity, args.json, args.announce_maddr, maddr_file=args.maddr_file,
        credentials=creds,
    )  # fmt: skip


def cmd_status(args: argparse.Namespace) -> int:
    """``status``: one reading (or ``--watch``) from ``--peer`` over gRPC, falling back to the DHT."""
    from node.status import StatusError, SwarmReader, check_bundle, print_view, watch

    if not args.peer and not args.initial_peers:
        raise CliError("status needs --peer HOST:PORT (a stage daemon, fast) or --initial-peers MADDR (the DHT)")
    if args.keys is None and not args.insecure:
        _security_of(args)  # the one-line error about --keys / --insecure
    if args.keys is not None and args.insecure:
        raise CliError("--keys and --insecure exclude each other")
    reader = SwarmReader(args.peer, args.initial_peers, args.swarm, args.keys)
    try:
        if args.keys is not None:
            check_bundle(args.keys)  # the bundle is loaded only if the DHT is read (--peer needs its files only)
        if args.watch is not None:
            with contextlib.suppress(KeyboardInterrupt):
                watch(reader, args.watch, args.json, args.wide)
            return 0
        print_view(reader.read(), args.json, args.wide)
    except StatusError as err:
        raise CliError(str(err)) from None
    finally:
        reader.close()
    return 0


def _parse_faults(specs: list[str], num_stages: int) -> list:
    from node.recovery.faults import parse_fault

    try:
        return [parse_fault(spec, num_stages) for spec in specs]
    except ValueError as err:
        raise CliError(f"--kill/--fault {err}") from None


def _parse_preempts(specs: list[str], num_stages: int) -> list:
    from node.local.preemptions import parse_preempt

    try:
        parsed = [parse_preempt(spec, num_stages) for spec in specs]
    except ValueError as err:
        raise CliError(f"--preempt {err}") from None
    if len({p.stage for p in parsed}) != len(parsed):
        raise CliError("--preempt: at most one per stage")
    return parsed


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
    cfg = build_swarm_config(args, args.num_stages, out_of_order=_strategy(given).out_of_order)
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
    _check_storages(opts.recovery, opts.durability)
    if opts.stage in (0, None) and opts.config.data is not None:
        from node.data import load_corpus_for

        load_corpus_for(opts.config).check_fits(opts.config.train.seq_len)  # fail now, with the file named
    load_credentials(opts.security.keys)  # fail now, with the file named
    return run_daemon(opts)


def _check_storages(recovery: RecoveryOptions, durability: DurabilityOptions) -> None:
    """Every storage the node will write to works, checked before anything starts."""
    if recovery.checkpoint_dir is not None and recovery.strategy is RecoveryStrategy.CHECKPOINT:
        _check_storage("--checkpoint-dir", recovery.checkpoint_dir, durability.storage_endpoint)
    if durability.snapshot_to is not None:
        _check_storage("--snapshot-to", durability.snapshot_to, durability.storage_endpoint)


def _local_options(args: argparse.Namespace, workdir: pathlib.Path) -> LocalOptions:
    """``local``'s swarm from its flags; its files go to ``workdir``."""
    from node.data import load_corpus_for
    from node.local.launcher import LocalOptions
    from node.local.links import LinkShape

    given = _given(args)
    strategy = _strategy(given)
    cfg = build_swarm_config(args, args.stages, out_of_order=strategy.out_of_order)
    load_corpus_for(cfg).check_fits(cfg.train.seq_len)
    recovery = given.get("recovery", {})
    if strategy is RecoveryStrategy.CHECKPOINT and "checkpoint_dir" not in recovery:
        recovery = {**recovery, "checkpoint_dir": str(workdir / "checkpoints")}
    recovery_options = _validate(RecoveryOptions, recovery, at="recovery")
    durability = _validate(DurabilityOptions, given.get("durability", {}), at="durability")
    _check_storages(recovery_options, durability)
    return LocalOptions(
        config=cfg,
        steps=args.steps,
        workdir=workdir,
        check_reference=args.check_reference,
        threads=args.threads or max(1, (os.cpu_count() or 1) // args.stages),
        quiet=args.quiet,
        verbose=args.verbose,
        timing=_validate(TimingOptions, given.get("timing", {}), at="timing"),
        recovery=recovery_options,
        durability=durability,
        eval=_validate(EvalOptions, given.get("eval", {}), at="eval"),
        kills=_parse_faults(args.kill, args.stages),
        preempts=_parse_preempts(args.preempt, args.stages),
        preemption_rate=args.preemption_rate,
        notice_seconds=args.notice_seconds,
        failure_rate=args.failure_rate,
        stage0_failures=args.stage0_failures,
        respawn=args.respawn,
        spares=args.spares,
        replicas=_parse_replicas(args.replicas, args.stages),
        replica_slowdown=max(1.0, args.replica_slowdown),
        emulate_compute=args.emulate_compute,
        link=LinkShape(rtt_ms=args.link_rtt_ms, mbit=args.link_mbit),
        placement=Placement(args.placement),
        seed=cfg.train.seed,
        prometheus_dir=args.prometheus_dir,
        metrics=args.metrics,
        insecure=args.insecure,
    )


def _parse_replicas(text: str | None, stages: int) -> list[int]:
    """``--replicas``: R (every block stage) or a count per stage, as a list of S counts (stage 0: 1)."""
    if text is None:
        return []
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise CliError(f"--replicas {text!r}: give a count, or one count per stage separated by commas") from None
    if len(counts) == 1:
        counts = [1] + counts * (stages - 1)
    if len(counts) != stages or any(c < 1 or c > 16 for c in counts):
        raise CliError(f"--replicas {text!r}: one count of 1..16 per stage ({stages} stages)")
    if counts[0] != 1:
        raise CliError("--replicas: stage 0 has exactly one peer")
    return counts


def cmd_local(args: argparse.Namespace) -> int:
    import tempfile

    from node.local.children import stop_on_signals
    from node.local.launcher import LocalSwarm

    stop_on_signals()  # SIGTERM stops the swarm as Ctrl-C does: no child outlives the launcher
    with contextlib.ExitStack() as stack:
        workdir = args.workdir
        if workdir is None:  # a temporary one, deleted at exit
            workdir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="swarm-node-local-")))
        swarm = LocalSwarm(_local_options(args, workdir))
        summary = swarm.run()
        after_local_run(args, swarm.opts.config, swarm.save_dir, swarm.console)  # --export / --sample
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

    from node.bench.results import run_seeds, write_results

    cfg = _build_config(args, args.stages, out_of_order=False, seq_len=args.seq_len)
    if "checkfree+" in args.strategies:
        _build_config(args, args.stages, out_of_order=True, seq_len=args.seq_len)
    from node.bench import per_iteration_rate

    if args.failures_per_hour:
        args.failure_rates = [per_iteration_rate(h, args.hour_step_seconds) for h in args.failures_per_hour]
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
            "seeds": args.seeds,
            "target_loss": args.target_loss,
            "checkpoint_every": args.checkpoint_every,
            "snapshot_neighbour_every": args.snapshot_neighbour_every,
            "lr_scale": args.lr_scale,
            "eval_every": eval_every,
            "eval_batches": args.eval_batches,
            "notice_fraction": args.notice_fraction,
            "notice_seconds": args.notice_seconds,
            "stage0_failures": args.stage0_failures,
        }
        if args.mode == "simulate":
            import torch

            from node.bench.simulate import SimulateOptions, run_simulation

            if args.threads:
                torch.set_num_threads(args.threads)
            overhead_source = "given (--failure-overhead-seconds)"
            if args.failure_overhead_from is not None:
                from node.bench.results import BenchResults, failure_overhead_from

                try:
                    live = BenchResults.model_validate_json(args.failure_overhead_from.read_text(encoding="utf-8"))
                    args.failure_overhead_seconds, overhead_source = failure_overhead_from(live)
                except (OSError, ValueError) as err:  # pydantic's ValidationError is a ValueError
                    raise SystemExit(f"--failure-overhead-from {args.failure_overhead_from}: {err}") from None
            regime = ("failure_overhead_seconds", "step_seconds", "stage_mib",
                      "storage_bandwidth", "storage_latency", "link_bandwidth")  # fmt: skip
            options: Any = SimulateOptions(**common, **{name: getattr(args, name) for name in regime})
            run_one = run_simulation
        else:
            from node.bench import AUTO
            from node.bench.live import LiveOptions, run_live

            if AUTO in args.checkpoint_every:
                raise SystemExit("--checkpoint-every auto is for --mode simulate (it needs the simulated costs)")

            from pydantic import ValidationError

            from node.options import DurabilityOptions

            try:
                DurabilityOptions(storage_endpoint=args.storage_endpoint)
            except ValidationError as err:
                raise SystemExit(f"--storage-endpoint: {err.errors()[0]['msg']}") from None
            options = LiveOptions(**common, out=args.out, spares=args.spares, threads=args.threads,
                                  checkpoint_to=args.checkpoint_to, storage_endpoint=args.storage_endpoint)
            run_one = run_live
            from node.local.children import stop_on_signals

            stop_on_signals()  # each run's local swarm is torn down on SIGTERM, as under Ctrl-C

        def seeded(opts: Any) -> Any:  # progress labels name the seed
            return run_one(opts, lambda label, done, total: progress(f"seed {opts.seed}: {label}", done, total))

        from node.storage import StorageError

        try:
            results = run_seeds(options, args.seeds, seeded)
        except StorageError as err:
            raise SystemExit(f"--checkpoint-to {args.checkpoint_to}: {err}") from None
    if args.mode == "simulate":
        results.costs["failure_overhead_source"] = overhead_source
    if args.failures_per_hour:
        results.costs["failure_rates_per_hour"] = {
            "per_hour": args.failures_per_hour, "step_seconds": args.hour_step_seconds,
            "per_iteration": args.failure_rates,
            "source": "per-iteration rate = 1 - (1 - per-hour rate) ^ (step seconds / 3600), per stage",
        }  # fmt: skip
    json_path, png_path, bars_path = write_results(results, args.out)
    if args.json:
        print(json_path.read_text(encoding="utf-8"))
        return 0
    Console().print(_bench_table(results, args.mode))
    base = results.noise.get("final_val_loss_no_failures")
    if base is not None:
        Console().print(f"noise: the no-failure run's final validation loss is {base['mean']:.4f} ± {base['sd']:.4f} "
                        f"over {base['n']} seed(s)")  # fmt: skip
    Console().print(f"wrote {json_path}, {png_path} and {bars_path}")
    return 0


def _bench_table(results: Any, mode: str) -> Any:
    """The summary as a table: every cell mean ± sd over the seeds."""
    from rich.table import Table

    from node.bench import BenchStrategy, run_label

    def cell(value: Any, scale: float = 1.0, digits: int = 2) -> str:
        if value is None:
            return "never"
        return f"{value.mean / scale:.{digits}f} ± {value.sd / scale:.{digits}f}"

    seeds = len(results.seeds) or 1
    table = Table(title=f"time to validation loss {results.target_loss:.3f} ({mode}, mean ± sd over {seeds} seeds)")
    paired = any(row.over_best_checkpoint for row in results.summary)
    for col in ("strategy", "failure rate", "failures", "reached", "iterations", "minutes", "× no failures",
                *(["× best checkpoint"] if paired else []), "final val loss"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for row in results.summary:
        table.add_row(
            run_label(row.strategy, row.variant)
            + (" (best K)" if row.strategy is BenchStrategy.CHECKPOINT
               and results.best_checkpoint.get(f"{row.failure_rate:g}") == row.variant
               and len(results.costs.get("checkpoint_every", [])) > 1 else ""),
            f"{row.failure_rate:g}", cell(row.failures, digits=1), f"{row.reached}/{row.seeds}",
            cell(row.iterations_to_target, digits=0), cell(row.seconds_to_target, 60.0),
            cell(row.over_no_failures, digits=3),
            *([cell(row.over_best_checkpoint, digits=3) if row.over_best_checkpoint else "-"] if paired else []),
            cell(row.final_val_loss, digits=3),
        )  # fmt: skip
    return table
