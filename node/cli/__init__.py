"""The ``swarm-node`` command line: ``dht``, ``run``, ``local``, ``status``.

Every flag is validated before anything starts; a bad value ends the program with one line
``swarm-node: error: <what is wrong>`` and exit code 2.

The flags that configure a node fill :class:`node.options.NodeOptions` (``run``; ``local`` hands the
same model to each of its nodes as a file): each such flag takes its default and help text from the
model, and a flag not given leaves the model's default in place.

This package: :func:`main` (the ``swarm-node`` entry point: parse, set up logging, dispatch, turn errors
into exit codes); :mod:`.flags` (flag types and the NodeOptions/SwarmConfig flag plumbing);
:mod:`.parser` (the argparse tree); :mod:`.commands` (what each subcommand does).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from node.cli.commands import (
    _local_options,
    _options_from_file,
    _options_from_flags,
    cmd_bench,
    cmd_dht,
    cmd_keys,
    cmd_local,
    cmd_run,
    cmd_status,
)
from node.cli.flags import (
    CliError,
    _non_negative_float,
    _non_negative_int,
    _port,
    _positive_float,
    _positive_int,
    _probability,
)
from node.cli.model import cmd_data, cmd_export, cmd_generate, cmd_tokenizer
from node.cli.parser import _parser

__all__ = [  # main, and what tests reach as ``cli.<name>``
    "CliError",
    "_local_options",
    "_non_negative_float",
    "_non_negative_int",
    "_options_from_file",
    "_options_from_flags",
    "_parser",
    "_port",
    "_positive_float",
    "_positive_int",
    "_probability",
    "main",
]

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "keys": cmd_keys,
    "dht": cmd_dht,
    "run": cmd_run,
    "local": cmd_local,
    "bench": cmd_bench,
    "status": cmd_status,
    "export": cmd_export,
    "generate": cmd_generate,
    "tokenizer": cmd_tokenizer,
    "data": cmd_data,
}


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(max(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    command = _COMMANDS.get(args.command)
    if command is None:
        parser.error(f"unknown command {args.command}")
    try:
        return command(args)
    except CliError as err:
        print(f"swarm-node: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # imported only now: node.data imports torch, which ``status`` (a quick command) does not need
        from node.config import ConfigError
        from node.data import DataError
        from node.local.launcher import LocalSwarmError

        if not isinstance(err, (ConfigError, DataError, LocalSwarmError)):
            raise
        print(f"swarm-node: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, LocalSwarmError) else 2
    except KeyboardInterrupt:
        print("swarm-node: interrupted", file=sys.stderr)
        return 130
