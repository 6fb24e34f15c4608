"""Pre-tokenized corpora: ``swarm-node data prepare`` writes sharded token files once; training memory-maps them.

Layout of a prepared directory::

    manifest.json        {"format", "dtype", "vocab_size", "tokenizer_sha256", "total_tokens",
                          "shards": [{"file", "tokens", "bytes", "sha256", "max_token"}, ...]}
    shard-00000.bin ...  little-endian uint16 (vocabulary <= 65536) or uint32 token ids, concatenated documents
    tokenizer.json       the tokenizer the tokens came from (absent for the byte-level one)

Shards are memory-mapped (``mmap``, viewed as numpy arrays) and presented as one :class:`TokenArray`, so memory
use does not grow with the corpus: a batch reads only its windows' pages, and unmaps them again right after
(``MADV_DONTNEED``: they stay in the page cache but leave the process's RSS). A shard that is truncated, does not
match its checksum, or holds token ids outside the model's vocabulary is refused with one line naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import pathlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)
FORMAT = "swarm-node tokens v1"
MANIFEST = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens (128 MiB of uint16) per shard
_CHUNK = 1 << 24


class ShardError(ValueError):
    """A prepared corpus that cannot be used: one line naming the file and the problem."""


class TokenArray:
    """A read-only 1-D view over memory-mapped shards, indexed like the token tensors batches take.

    Supports ``len()``, ``dim()``, ``.device``, slicing with a step of 1 (a view, nothing copied) and
    integer tensor indexing (gathers the requested tokens into a new int64 tensor)."""

    device = torch.device("cpu")

    def __init__(
        self, maps: list[np.ndarray], start: int = 0, stop: int | None = None, mmaps: list[mmap.mmap] | None = None
    ) -> None:
        self._maps = maps
        self._mmaps = mmaps or []
        sizes = [len(m) for m in maps]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(self._offsets[-1])
        self._start = start
        self._stop = total if stop is None else stop

    def __len__(self) -> int:
        return self._stop - self._start

    def dim(self) -> int:
        """Always 1."""
        return 1

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: slice | torch.Tensor | np.ndarray) -> TokenArray | torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("TokenArray slices take a step of 1")
            return TokenArray(self._maps, self._start + start, self._start + max(start, stop), self._mmaps)
        idx = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range 0..{len(self) - 1}")
        flat = idx.reshape(-1) + self._start
        shard = np.searchsorted(self._offsets, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=np.int64)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._maps[s][flat[sel] - self._offsets[s]]
            if self._mmaps:  # unmap the pages just read (they stay in the page cache): RSS stays flat
                self._mmaps[s].madvise(mmap.MADV_DONTNEED)
        return torch.from_numpy(out.reshape(idx.shape))

    def long(self) -> torch.Tensor:
        """Every token as an int64 tensor (reads the whole view into memory)."""
        return self[torch.arange(len(self))]  # type: ignore[return-value]


@dataclass(frozen=True)
class ShardInfo:
    file: str
    tokens: int
    bytes: int
    sha256: str
    max_token: int


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory written by ``data prepare`` (it holds a manifest)."""
    p = pathlib.Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared corpus, checked for shape; :class:`ShardError` otherwise."""
    path = pathlib.Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path}: unreadable manifest ({' '.join(str(err).split())[:160]})") from None
    try:
        if data["format"] != FORMAT:
            raise ShardError(f"{path}: format {data['format']!r}, expected {FORMAT!r}")
        if data["dtype"] not in ("uint16", "uint32"):
            raise ShardError(f"{path}: dtype {data['dtype']!r}, expected uint16 or uint32")
        int(data["vocab_size"])
        shards = [ShardInfo(**s) for s in data["shards"]]
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"{path}: malformed manifest ({' '.join(str(err).split())[:160]})") from None
    if not shards:
        raise ShardError(f"{path}: the manifest lists no shards")
    data["shards"] = shards
    return data


def open_shards(
    root: str | os.PathLike[str], *, vocab_size: int | None = None, verify: bool = True
) -> tuple[TokenArray, dict[str, Any]]:
    """Memory-maps the shards of a prepared corpus. Checks each shard's size (truncated?), with ``verify``
    its SHA-256 (read in chunks, not through the map, so it adds nothing to the process's memory), and
    with ``vocab_size`` that its largest token fits the model."""
    root = pathlib.Path(root)
    manifest = read_manifest(root)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    maps, mmaps = [], []
    for shard in manifest["shards"]:
        path = root / shard.file
        if pathlib.Path(shard.file).name != shard.file:
            raise ShardError(f"{root / MANIFEST}: shard name {shard.file!r} is not a plain file name")
        try:
            size = path.stat().st_size
        except OSError:
            raise ShardError(f"{path}: shard is missing") from None
        if size != shard.tokens * dtype.itemsize or size != shard.bytes:
            raise ShardError(f"{path}: truncated shard ({size} bytes, the manifest says {shard.bytes})")
        if vocab_size is not None and shard.max_token >= vocab_size:
            raise ShardError(
                f"{path}: token id {shard.max_token} is outside the model's vocabulary (vocab_size={vocab_size}); "
                "prepare the data with the model's tokenizer"
            )
        if verify and _sha256(path) != shard.sha256:
            raise ShardError(f"{path}: checksum mismatch (the shard changed after it was prepared)")
        if shard.tokens:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            mm.madvise(mmap.MADV_RANDOM)  # windows are random: no read-around
            mmaps.append(mm)
            maps.append(np.frombuffer(mm, dtype=dtype, count=shard.tokens))
    return TokenArray(maps, mmaps=mmaps), manifest


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Appends token arrays to shards of at most ``shard_tokens`` tokens, hashing as it writes."""

    def __init__(self, out: pathlib.Path, vocab_size: int, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> None:
        self.out = out
        self.vocab_size = vocab_size
        self.dtype = np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self._file: Any = None
        self._hash: Any = None
        self._count = 0
        self._max = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):05d}.bin"
        self._file = open(self.out / name, "wb")  # noqa: SIM115 (closed in _close)
        self._name, self._hash, self._count, self._max = name, hashlib.sha256(), 0, 0

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        nbytes = self._count * self.dtype.itemsize
        self.shards.append(ShardInfo(self._name, self._count, nbytes, self._hash.hexdigest(), self._max))
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        """Appends ``tokens`` (any integer dtype), starting new shards as they fill."""
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ShardError(f"token id {int(tokens.max())} outside the tokenizer's vocabulary {self.vocab_size}")
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                self._open()
            take = min(len(tokens) - pos, self.shard_tokens - self._count)
            data = tokens[pos : pos + take].astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._max = max(self._max, int(tokens[pos : pos + take].max()))
            self._count += take
            pos += take
            if self._count >= self.shard_tokens:
                self._close()

    def finish(self, tokenizer_sha256: str | None, sources: list[str]) -> dict[str, Any]:
        """Closes the last shard and writes the manifest (last: a prepared directory without one is no corpus)."""
        self._close()
        manifest = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": tokenizer_sha256,
            "total_tokens": sum(s.tokens for s in self.shards),
            "sources": sources,
            "shards": [s.__dict__ for s in self.shards],
        }
        tmp = self.out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(tmp, self.out / MANIFEST)
        return manifest


def prepare(
    documents: Iterator[str],
    tokenizer: Any,
    out: str | os.PathLike[str],
    *,
    sources: list[str] | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_chars: int = 1 << 22,
) -> dict[str, Any]:
    """Tokenizes ``documents`` (each followed by a blank line) into shards under ``out``; returns the manifest
    plus ``seconds`` and ``chars``. Documents are tokenized in batches of about ``batch_chars`` characters."""
    root = pathlib.Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("shard-*.bin"):
            old.unlink()
        (root / MANIFEST).unlink(missing_ok=True)
    except OSError as err:
        raise ShardError(f"{root}: cannot write there ({err.strerror})") from None
    writer = ShardWriter(root, tokenizer.vocab_size, shard_tokens)
    started, chars = time.perf_counter(), 0
    batch: list[str] = []
    size = 0

    def flush() -> None:
        for ids in tokenizer.encode_batch(batch):
            writer.write(ids)
        batch.clear()

    for doc in documents:
        batch.append(doc + "\n\n")
        size += len(doc) + 2
        chars += len(doc) + 2
        if size >= batch_chars:
            flush()
            size = 0
    flush()
    sha = getattr(tokenizer, "sha256", None)
    manifest = writer.finish(sha, sources or [])
    if manifest["total_tokens"] == 0:
        raise ShardError(f"{root}: no text in the input")
    if hasattr(tokenizer, "to_json") and sha is not None:
        (root / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    seconds = time.perf_counter() - started
    log.info("prepared %d tokens from %d chars in %.1fs", manifest["total_tokens"], chars, seconds)
    return {**manifest, "seconds": seconds, "chars": chars}
