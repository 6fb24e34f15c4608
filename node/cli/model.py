"""The ``swarm-node`` commands about the model people use: ``export``, ``generate``, ``tokenizer train`` and
``data prepare`` (parser builders and what each does), and the ``--tokenizer`` / ``--init-from`` flags of
``run`` and ``local`` with ``local``'s ``--export`` / ``--sample``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from node.cli.flags import (
    CliError,
    _add_model_flags,
    _build_config,
    _maddr,
    _non_negative_float,
    _non_negative_int,
    _peer,
    _positive_float,
    _positive_int,
    _probability,
    _swarm_name,
    load_credentials,
)


# ---- flags ----------------------------------------------------------------------------------------
def add_model_source_flags(p: argparse.ArgumentParser) -> None:
    """``--tokenizer`` and ``--init-from`` (``run`` and ``local``)."""
    g = p.add_argument_group("tokenizer and initial weights")
    g.add_argument(
        "--tokenizer", type=pathlib.Path, default=argparse.SUPPRESS,
        help="a Hugging Face tokenizer.json (never downloaded); its vocabulary size becomes the model's "
        "(default: byte-level, 256 tokens; a prepared --data directory's own tokenizer.json)",
    )  # fmt: skip
    g.add_argument(
        "--init-from", type=pathlib.Path, default=argparse.SUPPRESS, metavar="DIR",
        help="start from an exported model (swarm-node export): each stage takes its slice, with a fresh "
        "optimizer; its configuration must match this swarm's",
    )  # fmt: skip


def add_local_model_flags(p: argparse.ArgumentParser) -> None:
    """``local --export DIR`` and ``--sample PROMPT``."""
    g = p.add_argument_group("the trained model")
    g.add_argument("--export", type=pathlib.Path, metavar="DIR", help="at the end, export the model here (HF format)")
    g.add_argument("--sample", metavar="PROMPT", help="at the end, print text the model generates after PROMPT")


def _read_tokenizer(path: pathlib.Path | str | None):
    from node.data import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path)
    except TokenizerError as err:
        raise CliError(str(err)) from None


def _is_byte_level(tok: Any) -> bool:
    from node.data.tokenizer import ByteTokenizer

    return tok.vocab_size == 256 and tok.to_json() == ByteTokenizer().to_json()


def model_overrides(args: argparse.Namespace, base_vocab: int) -> dict[str, Any]:
    """The SwarmConfig overrides of ``--tokenizer`` / ``--init-from`` (and of a prepared ``--data``'s
    tokenizer): the tokenizer path and the vocabulary size it implies. ``base_vocab``: the preset's or
    config file's vocab_size, which an explicit tokenizer must match unless it is the default 256."""
    from node.data.shards import is_prepared

    given = vars(args)
    path = given.get("tokenizer")
    if path is None and "init_from" in given and (pathlib.Path(given["init_from"]) / "tokenizer.json").is_file():
        path = pathlib.Path(given["init_from"]) / "tokenizer.json"
    if path is None and given.get("data") and is_prepared(given["data"]):
        candidate = pathlib.Path(given["data"]) / "tokenizer.json"
        path = candidate if candidate.is_file() else None
    out: dict[str, Any] = {}
    if "init_from" in given:
        out["init_from"] = str(given["init_from"])
    if path is None:
        return out
    tok = _read_tokenizer(path)
    if _is_byte_level(tok):
        return out
    if base_vocab not in (256, tok.vocab_size):
        raise CliError(
            f"tokenizer {path} has {tok.vocab_size} tokens but the configuration's vocab_size is {base_vocab}"
        )
    return {**out, "tokenizer": str(path), "model": {"vocab_size": tok.vocab_size}}


def build_swarm_config(args: argparse.Namespace, num_stages: int, *, out_of_order: bool, **train: Any):
    """:func:`node.cli.flags._build_config` plus ``--tokenizer`` / ``--init-from``, checked: a tokenizer or
    exported model that does not match is refused in one line."""
    from node.config import SwarmConfig
    from node.export.hf import ExportError
    from node.export.load import check_init_from

    cfg = _build_config(args, num_stages, out_of_order=out_of_order, **train)
    extra = model_overrides(args, cfg.model.vocab_size)
    if extra:
        data = cfg.model_dump()
        data["model"] |= extra.pop("model", {})
        cfg = SwarmConfig.model_validate({**data, **extra})
    try:
        check_init_from(cfg)
    except ExportError as err:
        raise CliError(str(err)) from None
    return cfg


# ---- parsers --------------------------------------------------------------------------------------
def add_parsers(sub: Any) -> None:
    """``export``, ``generate``, ``tokenizer`` and ``data``."""
    p = sub.add_parser(
        "export",
        help="assemble the whole model into one Hugging Face directory (from saved files, a snapshot, or a live swarm)",
    )
    p.add_argument("--out", type=pathlib.Path, required=True, help="the export directory (created)")
    p.add_argument(
        "--from", dest="source", metavar="PATH",
        help="a --save-dir directory (stage<i>.safetensors), or --snapshot-to storage (directory or s3:// URL: "
        "its newest complete snapshot)",
    )  # fmt: skip
    live = p.add_argument_group("from a live swarm (a member: --keys, or --insecure for an open swarm)")
    live.add_argument(
        "--initial-peers", type=_maddr, action="append", default=[], metavar="MADDR",
        help="export from a live swarm, found through its DHT: every stage's committed weights at one step, "
        "while it trains on",
    )  # fmt: skip
    live.add_argument(
        "--peer", type=_peer, action="append", default=[], metavar="HOST:PORT",
        help="a stage daemon's gRPC address: read the swarm from it instead of the DHT (faster); repeatable",
    )  # fmt: skip
    live.add_argument("--swarm", type=_swarm_name, default="default", help="swarm name (default %(default)s)")
    live.add_argument("--insecure", action="store_true", help="a swarm without keys (cleartext gRPC, open DHT)")
    live.add_argument(
        "--wait-seconds", type=_positive_float, default=120.0,
        help="how long a stage may take to reach the step asked of it (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--storage-endpoint", metavar="URL", help="S3-compatible endpoint of an s3:// --from")
    p.add_argument(
        "--keys", type=pathlib.Path,
        help="a member bundle: verifies the snapshot manifests' HMACs, and is the exporter's identity in a live swarm",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print {out, step, source} as JSON")
    _add_model_flags(p, "the swarm's model (a --save-dir holds no configuration)")
    p.add_argument("--tokenizer", type=pathlib.Path, default=argparse.SUPPRESS, help="the swarm's tokenizer.json")

    g = sub.add_parser("generate", help="sample text from an exported model (KV cache, streamed)")
    g.add_argument("--model", type=pathlib.Path, required=True, help="an export directory")
    g.add_argument("--prompt", default="", help="text to continue (default: empty)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=200, help="default %(default)s")
    g.add_argument("--temperature", type=_non_negative_float, default=0.8, help="0: greedy (default %(default)s)")
    g.add_argument("--top-k", type=_positive_int, help="sample from the K most likely tokens")
    g.add_argument("--top-p", type=_probability, help="sample from the smallest set holding P of the probability")
    g.add_argument("--seed", type=_non_negative_int, default=0, help="sampling seed (default %(default)s)")
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")

    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE tokenizer.json on a corpus")
    tt.add_argument("--data", required=True, help="a .txt/.jsonl/.parquet file or a directory of them")
    tt.add_argument("--vocab-size", type=_positive_int, required=True, help="tokens, including 256 bytes and EOS")
    tt.add_argument("--out", type=pathlib.Path, required=True, help="the tokenizer.json to write")

    d = sub.add_parser("data", help="prepare a corpus: tokenize once into memory-mapped shards")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="tokenize a corpus into sharded token files with a manifest")
    dp.add_argument("--data", required=True, help="a .txt/.jsonl/.parquet file or a directory of them")
    dp.add_argument("--tokenizer", type=pathlib.Path, help="a tokenizer.json (default: byte-level)")
    dp.add_argument("--out", type=pathlib.Path, required=True, help="the prepared directory (use it as --data)")
    dp.add_argument(
        "--shard-tokens", type=_positive_int, default=1 << 26, help="tokens per shard (default %(default)s)"
    )
    dp.add_argument("--json", action="store_true", help="print the manifest and throughput as JSON")


# ---- commands -------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    """``export --out DIR``, ``--from PATH`` (saved files or snapshots) or ``--initial-peers`` / ``--peer``."""
    from node.export.hf import ExportError
    from node.export.io import from_save_dir, from_snapshot, is_snapshot, write_export

    live = bool(args.initial_peers or args.peer)
    if (args.source is None) == (not live):
        raise CliError(
            "export needs exactly one source: --from PATH (saved files or snapshots), or a live swarm "
            "(--initial-peers MADDR or --peer HOST:PORT)"
        )
    try:
        if live:
            weights = _export_live(args)
        elif is_snapshot(args.source):
            weights = from_snapshot(args.source, args.storage_endpoint, _secret(args.keys))
        else:
            path = pathlib.Path(args.source)
            if not path.is_dir():
                raise CliError(f"--from {path}: no such directory")
            weights = from_save_dir(path, build_swarm_config(args, 2, out_of_order=False))
        tokenizer = _read_tokenizer(args.tokenizer if "tokenizer" in args else weights.config.tokenizer)
        out = write_export(args.out, weights, tokenizer)
    except ExportError as err:
        raise CliError(str(err)) from None
    if args.json:
        print(json.dumps({"out": str(out), "step": weights.step, "source": weights.source}))
    else:
        print(f"exported step {weights.step} from {weights.source} to {out}")
    return 0


def _export_live(args: argparse.Namespace):
    """Every stage's weights at one committed step, from the live swarm that ``--peer`` or the DHT shows
    (joined before any gRPC channel exists: hivemind forks)."""
    import asyncio

    from node.export.live import choose_peers, export_live, match_config
    from node.security.tls import channel_credentials
    from node.status import StatusError, SwarmReader
    from node.transport.channels import ChannelPool

    if (args.keys is None) == (not args.insecure):
        raise CliError("a live export joins the swarm: pass its member bundle (--keys BUNDLE) or --insecure")
    creds = load_credentials(args.keys)
    reader = SwarmReader(args.peer, args.initial_peers, args.swarm, args.keys)
    try:
        view = reader.read()
    except StatusError as err:
        raise CliError(str(err)) from None
    finally:
        reader.close()
    candidates: list[Any] = []
    errors: list[Exception] = []
    for n in sorted({r.num_stages for r in view.records}):
        for out_of_order in (False, True):  # checkfree+ swarms run the out-of-order pipeline
            try:
                candidates.append(build_swarm_config(args, n, out_of_order=out_of_order))
            except (CliError, ValueError) as err:  # e.g. out of order with fewer than 5 stages (ConfigError)
                errors.append(err)
    if not candidates:
        raise errors[0] if errors else CliError(f"no stage record of swarm {view.swarm!r}")
    cfg = match_config(view.records, candidates)
    peers = choose_peers(view.records, cfg)

    async def fetch():
        channels = ChannelPool(None if creds is None else channel_credentials(creds))
        try:
            source = f"live swarm {view.swarm!r} ({cfg.num_stages} stages)"
            return await export_live(channels, peers, cfg, source, wait_seconds=args.wait_seconds)
        finally:
            await channels.close()

    return asyncio.run(fetch())


def _secret(bundle: pathlib.Path | None) -> bytes | None:
    return getattr(load_credentials(bundle), "secret", None)


def cmd_generate(args: argparse.Namespace) -> int:
    """``generate --model DIR --prompt TEXT``: streams the sampled text to stdout."""
    from node.export.hf import ExportError
    from node.inference import Sampling, load_model

    try:
        lm = load_model(args.model, args.device)
    except ExportError as err:
        raise CliError(f"--model {err}") from None
    tok = _read_tokenizer(args.model / "tokenizer.json")
    if tok.vocab_size != lm.config.vocab_size:
        raise CliError(f"{args.model}/tokenizer.json has {tok.vocab_size} tokens but the model {lm.config.vocab_size}")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens, args.seed)
    sys.stdout.write(args.prompt)
    stream_sample(lm, tok, args.prompt, sampling, sys.stdout)
    return 0


def stream_sample(lm: Any, tok: Any, prompt: str, sampling: Any, out: Any) -> str:
    """Writes the continuation of ``prompt`` to ``out`` as it is generated (whole characters only); returns it."""
    from node.inference import generate

    ids: list[int] = []
    shown = ""
    for token in generate(lm, tok.encode(prompt).tolist(), sampling, eos=tok.eos_token_id):
        ids.append(token)
        text = tok.decode(ids)
        if not text.endswith("\ufffd"):  # a multi-byte character may be incomplete yet
            out.write(text[len(shown) :])
            out.flush()
            shown = text
    text = tok.decode(ids)
    out.write(text[len(shown) :] + "\n")
    out.flush()
    return text


def cmd_tokenizer(args: argparse.Namespace) -> int:
    """``tokenizer train --data … --vocab-size N --out tokenizer.json``."""
    import time

    from node.data import DataError, TokenizerError
    from node.data.corpus import iter_documents, source_files
    from node.data.tokenizer import train_tokenizer

    try:
        files = source_files(args.data)
        started = time.perf_counter()
        tok = train_tokenizer(iter_documents(files), args.vocab_size, args.out)
    except (DataError, TokenizerError) as err:
        raise CliError(str(err)) from None
    print(f"trained a {tok.vocab_size}-token byte-level BPE on {len(files)} file(s) in "
          f"{time.perf_counter() - started:.1f}s: {args.out}")  # fmt: skip
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``data prepare --data … [--tokenizer …] --out DIR``."""
    from node.data import DataError, ShardError
    from node.data.corpus import iter_documents, source_files
    from node.data.shards import prepare

    tok = _read_tokenizer(args.tokenizer)
    try:
        files = source_files(args.data)
        result = prepare(iter_documents(files), tok, args.out, sources=[str(f) for f in files],
                         shard_tokens=args.shard_tokens)  # fmt: skip
    except (DataError, ShardError) as err:
        raise CliError(str(err)) from None
    mb_s = result["chars"] / max(result["seconds"], 1e-9) / 1e6
    if args.json:
        print(json.dumps({**result, "mchars_per_second": mb_s}))
    else:
        print(f"{result['total_tokens']:,} tokens in {len(result['shards'])} shard(s) ({result['dtype']}) in "
              f"{args.out}; {mb_s:.1f} M chars/s; train with --data {args.out}")  # fmt: skip
    return 0


def after_local_run(args: argparse.Namespace, cfg: Any, save_dir: pathlib.Path, console: Any) -> None:
    """``local --export DIR`` / ``--sample PROMPT``: the final weights in ``save_dir``, exported and sampled."""
    import tempfile

    from node.export.hf import ExportError
    from node.export.io import from_save_dir, write_export

    if args.export is None and args.sample is None:
        return
    try:
        weights = from_save_dir(save_dir, cfg)
        tokenizer = _read_tokenizer(cfg.tokenizer)
        with tempfile.TemporaryDirectory(prefix="swarm-node-export-") as tmp:
            out = write_export(args.export or tmp, weights, tokenizer)
            if args.export is not None:
                console.print(f"exported step {weights.step} to {out}: swarm-node generate --model {out} --prompt ...")
            if args.sample is not None:
                from node.inference import Sampling, load_model

                console.print(f"sample after step {weights.step}:")
                sys.stdout.write(args.sample)
                stream_sample(load_model(out), tokenizer, args.sample, Sampling(max_new_tokens=200), sys.stdout)
    except ExportError as err:
        raise CliError(str(err)) from None
