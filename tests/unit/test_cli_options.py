"""The command line fills NodeOptions: defaults and help from the model, ``run --options FILE``, and ``local``
handing each node the options the same ``run`` flags would give."""

from __future__ import annotations

import argparse
import pathlib
from types import SimpleNamespace

import pytest

from node import cli
from node.cli import commands
from node.config import build_config
from node.local.launcher import LocalSwarm
from node.options import (
    EvalOptions,
    NodeOptions,
    RecoveryOptions,
    RecoveryStrategy,
    SecurityOptions,
    TimingOptions,
    default,
)

PARSER = cli._parser()


def parse(*argv: str) -> argparse.Namespace:
    return PARSER.parse_args(list(argv))


@pytest.mark.parametrize(
    ("parse_number", "text", "value", "error"),
    [
        (cli._positive_int, "3", 3, None),
        (cli._positive_int, "0", None, "0 must be positive"),
        (cli._positive_int, "ten", None, "'ten' is not an integer"),
        (cli._non_negative_int, "0", 0, None),
        (cli._non_negative_int, "-1", None, "-1 must be >= 0"),
        (cli._port, "65535", 65535, None),
        (cli._port, "65536", None, "65536 is not a TCP port"),
        (cli._port, "-1", None, "-1 must be >= 0"),
        (cli._positive_float, "0.5", 0.5, None),
        (cli._positive_float, "0", None, "0 must be a positive number"),
        (cli._positive_float, "inf", None, "inf must be a positive number"),
        (cli._positive_float, "nan", None, "nan must be a positive number"),
        (cli._positive_float, "x", None, "'x' is not a number"),
        (cli._non_negative_float, "0", 0.0, None),
        (cli._non_negative_float, "inf", None, "inf must be a finite number >= 0"),
        (cli._probability, "1", 1.0, None),
        (cli._probability, "1.5", None, "1.5 is not a probability in [0, 1]"),
        (cli._probability, "-0.1", None, "-0.1 is not a probability in [0, 1]"),
    ],
)
def test_number_flags(parse_number, text: str, value: float | None, error: str | None) -> None:
    if error is None:
        assert parse_number(text) == value and type(parse_number(text)) is type(value)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=error.replace("[", r"\[").replace("]", r"\]")):
            parse_number(text)


def test_run_without_option_flags_gets_the_model_defaults() -> None:
    opts = cli._options_from_flags(parse("run", "--stage", "1", "--num-stages", "4", "--insecure"))
    insecure = SecurityOptions(insecure=True)
    assert opts == NodeOptions(config=build_config(overrides={"num_stages": 4}), stage=1, security=insecure)
    auto = cli._options_from_flags(parse("run", "--stage", "auto", "--num-stages", "4", "--insecure"))
    assert auto.stage is None


def test_run_needs_keys_or_an_explicit_insecure(tmp_path: pathlib.Path) -> None:
    with pytest.raises(cli.CliError, match=r"^a node needs its keys \(--keys BUNDLE.*pass --insecure$"):
        cli._options_from_flags(parse("run", "--stage", "1", "--num-stages", "4"))
    with pytest.raises(cli.CliError, match=r"^--keys and --insecure exclude each other$"):
        cli._options_from_flags(parse("run", "--stage", "1", "--num-stages", "4", "--insecure", "--keys", "k"))
    assert cli.main(["run", "--stage", "1", "--num-stages", "4", "--keys", str(tmp_path / "none")]) == 2


def test_run_flags_fill_their_fields() -> None:
    opts = cli._options_from_flags(
        parse(
            "run", "--stage", "2", "--num-stages", "7", "--refresh", "2", "--step-timeout", "9", "--rpc-timeout", "3",
            "--heartbeat-interval", "0.25", "--heartbeat-timeout", "0.75", "--recovery", "checkpoint",
            "--checkpoint-dir", "/tmp/ck", "--checkpoint-every", "7", "--lr-scale", "1.5", "--embed-sync-every", "2",
            "--eval-every", "5", "--eval-batches", "2", "--port", "5000", "--swarm", "s1", "--fault", "3@4",
            "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/Qm", "--seed", "9", "--microbatches", "2",
            "--keys", "/etc/swarm-node/keys", "--reflection", "--metrics-host", "0.0.0.0",
        )
    )  # fmt: skip
    assert opts.security == SecurityOptions(keys=pathlib.Path("/etc/swarm-node/keys"), reflection=True)
    assert opts.metrics_host == "0.0.0.0"
    assert opts.timing == TimingOptions(
        refresh_seconds=2, step_timeout=9, rpc_timeout=3, heartbeat_interval=0.25, heartbeat_timeout=0.75
    )
    assert opts.recovery == RecoveryOptions(
        strategy=RecoveryStrategy.CHECKPOINT,
        checkpoint_dir="/tmp/ck",
        checkpoint_every=7,
        lr_scale=1.5,
        embed_sync_every=2,
    )
    assert opts.eval == EvalOptions(every=5, batches=2)
    assert (opts.stage, opts.port, opts.swarm, opts.faults) == (2, 5000, "s1", ["3@4:forward"])
    assert opts.initial_peers == ["/ip4/1.2.3.4/tcp/1/p2p/Qm"]
    assert (opts.config.num_stages, opts.config.train.seed, opts.config.train.microbatches_per_step) == (7, 9, 2)
    assert not opts.config.out_of_order


def help_text(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        parse(command, "--help")
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["run", "local"])
def test_help_shows_the_model_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(command, capsys)
    for model, name in [(TimingOptions, "refresh_seconds"), (RecoveryOptions, "lr_scale"), (EvalOptions, "batches")]:
        assert f"(default {default(model, name)})" in text


def test_cross_field_errors_are_one_line() -> None:
    with pytest.raises(cli.CliError, match=r"^--stage 4 is outside 0\.\.3 for --num-stages 4$"):
        cli._options_from_flags(parse("run", "--stage", "4", "--num-stages", "4"))
    with pytest.raises(cli.CliError, match=r"^--recovery checkpoint needs --checkpoint-dir"):
        cli._options_from_flags(
            parse("run", "--stage", "1", "--num-stages", "4", "--recovery", "checkpoint", "--insecure")
        )
    with pytest.raises(cli.CliError, match=r"^the following arguments are required: --num-stages"):
        cli._options_from_flags(parse("run", "--stage", "1"))


def test_run_options_file_round_trips(tmp_path: pathlib.Path) -> None:
    flags = ("run", "--stage", "3", "--num-stages", "4", "--lr-scale", "1.25", "--events-file", str(tmp_path / "e"),
             "--insecure")  # fmt: skip
    opts = cli._options_from_flags(parse(*flags))
    path = tmp_path / "stage3.json"
    path.write_text(opts.model_dump_json())
    assert cli._options_from_file(parse("run", "--options", str(path))) == opts
    extra = ("--stage", "1", "--lr-scale", "2", "--seed", "1", "--fault", "1@2")
    with pytest.raises(cli.CliError, match=r"holds every option; drop --stage, --lr-scale, --seed, --fault$"):
        cli._options_from_file(parse("run", "--options", str(path), *extra))
    path.write_text(opts.model_dump_json().replace('"lr_scale":1.25', '"lr_scale":-1'))
    with pytest.raises(cli.CliError, match=r"^--options .*: recovery\.lr_scale: Input should be greater than 0$"):
        cli._options_from_file(parse("run", "--options", str(path)))


def test_run_errors_exit_2_with_one_line(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--options", str(tmp_path / "missing.json")]) == 2
    assert (
        capsys.readouterr().err
        == f"swarm-node: error: --options {tmp_path / 'missing.json'}: No such file or directory\n"
    )


def test_local_hands_each_node_what_the_same_run_flags_give(tmp_path: pathlib.Path) -> None:
    flags = ["--recovery", "checkpoint", "--lr-scale", "1.3", "--refresh", "0.5", "--heartbeat-timeout", "2",
             "--eval-every", "4", "--checkpoint-every", "3", "--seed", "5"]  # fmt: skip
    local = cli._local_options(parse("local", "--stages", "4", "--kill", "2@3", "--threads", "1", *flags), tmp_path)
    assert local.recovery.checkpoint_dir == str(tmp_path / "checkpoints")  # the default of `local`
    swarm = LocalSwarm(local)
    swarm.bootstrap_maddrs = ["/ip4/127.0.0.1/tcp/1/p2p/Qm"]
    node = swarm.node_options(2)
    run = cli._options_from_flags(
        parse(
            "run", "--stage", "2", "--num-stages", "4", *flags, "--checkpoint-dir", str(tmp_path / "checkpoints"),
            "--swarm", "local", "--host", "127.0.0.1", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/Qm",
            "--steps", "300", "--threads", "1", "--metrics-port", "0", "--fault", "2@3",
            "--events-file", str(tmp_path / "events.jsonl"), "--save-dir", str(tmp_path / "weights"),
            "--keys", str(tmp_path / "keys" / "nodes" / "stage2"),
            "--preemption", "signal",  # one machine has no cloud metadata service: local's nodes take signals only
        )
    )  # fmt: skip
    assert node == run
    assert swarm.node_options(None).stage is None
    swarm.fired.add("2@3:forward")
    assert swarm.node_options(None).faults == []  # a replacement does not repeat a fault that happened


def test_local_runs_its_daemons_at_its_own_verbosity(tmp_path: pathlib.Path) -> None:
    """``swarm-node -v local``: each daemon logs at INFO too (into its log file), so a run can be read afterwards."""
    spawned: list[list[str]] = []
    for flags, want in (([], []), (["-vv"], ["-v", "-v"])):
        local = cli._local_options(parse(*flags, "local", "--stages", "2", "--threads", "1"), tmp_path)
        swarm = LocalSwarm(local)
        swarm.bootstrap_maddrs = ["/ip4/127.0.0.1/tcp/1/p2p/Qm"]
        swarm._spawn = lambda name, args, capture_stdout=False: spawned.append(args) or SimpleNamespace(proc=None)
        swarm.start_stage(1)
        assert spawned[-1] == [*want, "run", "--options", str(tmp_path / "options" / "stage1.json")]


def test_preemption_flags_are_validated() -> None:
    base = ("run", "--stage", "1", "--num-stages", "4", "--insecure")
    opts = cli._options_from_flags(
        parse(*base, "--preemption", "gcp", "--drain-seconds", "12", "--metadata-url", "http://127.0.0.1:8080")
    )
    assert (opts.preemption.mode, opts.preemption.drain_seconds) == ("gcp", 12.0)
    assert opts.preemption.metadata_url == "http://127.0.0.1:8080"
    assert cli._options_from_flags(parse(*base)).preemption.mode == "auto"  # the default watches the cloud
    with pytest.raises(SystemExit):
        parse(*base, "--preemption", "ibm")
    with pytest.raises((cli.CliError, SystemExit)):
        cli._options_from_flags(parse(*base, "--metadata-url", "ftp://169.254.169.254"))
    with pytest.raises((cli.CliError, SystemExit)):
        cli._options_from_flags(parse(*base, "--drain-seconds", "0"))
    with pytest.raises(cli.CliError, match="--preempt"):
        commands._parse_preempts(["9@1"], 4)


def test_announce_port_is_a_port_others_reach_and_defaults_to_the_bound_one() -> None:
    base = ("run", "--stage", "1", "--num-stages", "4", "--insecure", "--port", "5000")
    assert cli._options_from_flags(parse(*base)).announce_port is None
    opts = cli._options_from_flags(parse(*base, "--announce-host", "203.0.113.7", "--announce-port", "40001"))
    assert (opts.announce_host, opts.announce_port, opts.port) == ("203.0.113.7", 40001, 5000)
    with pytest.raises(cli.CliError, match="--announce-port"):
        cli._options_from_flags(parse(*base, "--announce-port", "0"))
    with pytest.raises(SystemExit):
        parse(*base, "--announce-port", "70000")
