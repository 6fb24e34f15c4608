"""Flag types and flag plumbing of the ``swarm-node`` command line.

Owns :class:`CliError`, the value parsers (the ``_number`` factory and its instances, multiaddrs, swarm
names, strategy and failure-rate lists), the flags that fill :class:`node.options.NodeOptions` (``_option``
takes each one's default and help text from the model; ``_given`` reads them back nested like the model;
``_validate`` turns a ValidationError into one line naming the flag), the flag groups shared by commands,
and the model and training flags that build a :class:`node.config.SwarmConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from node.config import PRESETS, SwarmConfig
from node.options import NodeOptions, RecoveryOptions, RecoveryStrategy, default, describe

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


def _peer(text: str) -> str:
    """A ``--peer`` value: a stage daemon's gRPC ``HOST:PORT`` (as ``status`` shows under address)."""
    from node.status import StatusError, split_address

    try:
        split_address(text)
    except StatusError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (a stage's gRPC address)") from None
    return text


def load_credentials(bundle: pathlib.Path | None):
    """The node bundle at ``bundle`` (None: --insecure), checked; a bad bundle is a one-line error."""
    if bundle is None:
        return None
    from node.security.keys import CredentialsError, NodeCredentials

    try:
        return NodeCredentials.load(bundle)
    except CredentialsError as err:
        raise CliError(f"--keys {err}") from None


def _swarm_name(text: str) -> str:
    if not text or len(text) > 64 or not all(c.isalnum() or c in "-_." for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: swarm names use letters, digits, '-', '_', '.' (at most 64)")
    return text


def _stage_arg(text: str) -> int | None:
    return None if text == "auto" else _non_negative_int(text)


def _intervals(text: str, auto: bool) -> list[int | str]:
    """Positive step counts (and ``auto`` where ``auto``), comma-separated, no repeats."""
    from node.bench import AUTO

    out: list[int | str] = []
    for item in (s.strip() for s in text.split(",")):
        value: int | str = item if auto and item == AUTO else (int(item) if item.isdigit() and int(item) > 0 else "")
        if value == "" or value in out:
            also = f" or {AUTO!r}" if auto else ""
            raise argparse.ArgumentTypeError(f"{text!r}: each interval is a positive integer{also}, once")
        out.append(value)
    return out


def _checkpoint_intervals(text: str) -> list[int | str]:
    """``bench --checkpoint-every``: intervals and ``auto`` (Young–Daly)."""
    return _intervals(text, auto=True)


def _snapshot_intervals(text: str) -> list[int]:
    """``bench --snapshot-neighbour-every``: intervals."""
    return [int(k) for k in _intervals(text, auto=False)]


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
        if not model.model_fields[name].is_required() and (value := default(model, name)) not in (None, [], False):
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
        "weights; 'none' is the same), or ladder (the best rung: a replica, a handoff, a neighbour's snapshot at most "
        "--snapshot-neighbour-every steps stale, then checkfree)",
    )
    _option(g, "--checkpoint-every", "recovery.checkpoint_every", type=_positive_int)
    _option(g, "--snapshot-neighbour-every", "recovery.snapshot_neighbour_every", type=_positive_int)
    _option(g, "--embed-sync-every", "recovery.embed_sync_every", type=_positive_int)
    _option(g, "--lr-scale", "recovery.lr_scale", type=_positive_float)
    _option(g, "--heartbeat-interval", "timing.heartbeat_interval", type=_positive_float)
    _option(g, "--heartbeat-timeout", "timing.heartbeat_timeout", type=_positive_float)
    _option(g, "--suspect-after", "timing.suspect_after", type=_positive_int)


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (stage 0)")
    _option(g, "--eval-every", "eval.every", type=_non_negative_int)
    _option(g, "--eval-batches", "eval.batches", type=_positive_int)


def _add_preemption_flags(p: argparse.ArgumentParser) -> None:
    from node.options import PreemptionMode

    g = p.add_argument_group("preemption (spot notices and handover)")
    _option(g, "--preemption", "preemption.mode", choices=[m.value for m in PreemptionMode])
    _option(g, "--drain-seconds", "preemption.drain_seconds", type=_positive_float)
    _option(g, "--metadata-url", "preemption.metadata_url")


def _add_durability_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("durability (whole-swarm snapshots)")
    _option(g, "--snapshot-to", "durability.snapshot_to", metavar="URL")
    _option(g, "--snapshot-every", "durability.snapshot_every", type=_positive_int)
    _option(g, "--resume", "durability.resume", action="store_const", const=True)
    _option(g, "--resume-from", "durability.resume_from", metavar="URL")
    _option(g, "--storage-endpoint", "durability.storage_endpoint", metavar="URL")


def _check_storage(flag: str, url: str | os.PathLike[str], endpoint: str | None) -> None:
    """Fails now, in one line, when the storage at ``url`` cannot be written (a wrong bucket or wrong
    credentials must not surface after an hour of training)."""
    from node.storage import StorageError, open_storage

    try:
        open_storage(url, endpoint).check()
    except StorageError as err:
        raise CliError(f"{flag}: {err}") from None


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
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _flag_of_field(group: Any, flag: str, cls: type, help: str, **kw: Any) -> None:
    """A flag whose default is that of the field of dataclass ``cls`` named like it (``--lr-scale``: ``lr_scale``)."""
    name = flag.removeprefix("--").replace("-", "_")
    group.add_argument(flag, default=_dataclass_default(cls, name), help=help, **kw)
