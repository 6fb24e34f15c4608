"""Corpora: the built-in generated one (no download), the user's ``.txt`` / ``.jsonl`` / ``.parquet`` files
(tokenized in memory), and directories prepared by ``swarm-node data prepare`` (memory-mapped shards)."""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from node.data.shards import ShardError, TokenArray, is_prepared, open_shards
from node.data.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer

if TYPE_CHECKING:
    from node.config import SwarmConfig

log = logging.getLogger(__name__)

VAL_FRACTION = 0.05
SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line naming the path and the problem."""


# --------------------------------------------------------------------------- the built-in corpus

_NUMBERS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
)
# (singular, plural)
_ANIMALS = (
    ("fox", "foxes"),
    ("cat", "cats"),
    ("dog", "dogs"),
    ("owl", "owls"),
    ("horse", "horses"),
    ("goat", "goats"),
    ("hen", "hens"),
    ("mouse", "mice"),
    ("crow", "crows"),
    ("bear", "bears"),
    ("duck", "ducks"),
    ("sheep", "sheep"),
)
_ADJECTIVES = ("small", "big", "old", "young", "quiet", "quick", "happy", "tired")
_PLACES = ("barn", "field", "river", "forest", "garden", "house", "hill", "market", "road", "meadow")
_PEOPLE = (
    "the farmer",
    "the baker",
    "the child",
    "the teacher",
    "the miller",
    "the old woman",
    "the boy",
    "the girl",
    "the smith",
    "the shepherd",
)
# (present, past)
_VERBS = (
    ("sees", "saw"),
    ("feeds", "fed"),
    ("follows", "followed"),
    ("finds", "found"),
    ("calls", "called"),
    ("watches", "watched"),
    ("helps", "helped"),
    ("carries", "carried"),
)
_THINGS = ("bread", "apples", "water", "a basket", "a letter", "some wood", "a lamp", "the key", "a song")
_TIMES = (
    "in the morning",
    "at noon",
    "in the evening",
    "at night",
    "on monday",
    "after the rain",
    "every day",
)


@dataclass(frozen=True)
class _Facts:
    """Fixed facts of the little world: each animal always has the same colour, home and food."""

    colour: str
    home: str
    food: str


_WORLD = {
    "fox": _Facts("red", "forest", "berries"),
    "cat": _Facts("black", "house", "fish"),
    "dog": _Facts("brown", "garden", "bread"),
    "owl": _Facts("grey", "barn", "seeds"),
    "horse": _Facts("white", "field", "apples"),
    "goat": _Facts("white", "hill", "grass"),
    "hen": _Facts("brown", "barn", "corn"),
    "mouse": _Facts("grey", "house", "corn"),
    "crow": _Facts("black", "field", "seeds"),
    "bear": _Facts("brown", "forest", "berries"),
    "duck": _Facts("yellow", "river", "bread"),
    "sheep": _Facts("white", "meadow", "grass"),
}


def _sentence(rng: random.Random) -> str:
    """One sentence (or a question and its answer) ending in punctuation, its first letter lower case."""
    kind = rng.randrange(10)
    animal, plural = rng.choice(_ANIMALS)
    facts = _WORLD[animal]
    if kind == 0:
        return f"the {animal} lives in the {facts.home}."
    if kind == 1:
        return f"the {animal} is {facts.colour} and eats {facts.food}."
    if kind == 2:
        return f"where is the {animal}? The {animal} is in the {facts.home}."
    if kind == 3:
        return f"what does the {animal} eat? The {animal} eats {facts.food}."
    if kind == 4:
        present, past = rng.choice(_VERBS)
        verb = present if rng.random() < 0.5 else past
        return f"{rng.choice(_PEOPLE)} {verb} the {rng.choice(_ADJECTIVES)} {animal} {rng.choice(_TIMES)}."
    if kind == 5:
        return f"{rng.choice(_PEOPLE)} brings {rng.choice(_THINGS)} to the {rng.choice(_PLACES)}."
    if kind == 6:
        n = rng.randrange(2, 10)
        return f"{_NUMBERS[n]} {plural} are in the {facts.home}."
    if kind == 7:
        person = rng.choice(_PEOPLE)
        return f"{person} went to the {facts.home} and saw the {facts.colour} {animal}."
    if kind == 8:
        a, b = rng.randrange(10), rng.randrange(9)
        return f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}."
    a = rng.randrange(1, 10)
    b = rng.randrange(0, a + 1)
    return f"{_NUMBERS[a]} minus {_NUMBERS[b]} is {_NUMBERS[a - b]}."


@functools.lru_cache(maxsize=8)
def builtin_text(num_chars: int = 2_000_000, seed: int = 1234) -> str:
    """A deterministic English-like corpus of exactly ``num_chars`` characters from a small grammar.

    Paragraphs of simple facts about a fixed little world (each animal's colour, home and food), questions
    with their answers, everyday sentences and small-number arithmetic, separated by blank lines. The
    vocabulary is about 135 words, so a tiny model learns it visibly within a few hundred steps.
    A pure function of its arguments (its own ``random.Random``), so every machine generates the same text;
    cached per process.
    """
    if num_chars < 0:
        raise ValueError(f"num_chars must be >= 0, got {num_chars}")
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < num_chars:
        sentences = (_sentence(rng) for _ in range(rng.randrange(3, 8)))
        paragraph = " ".join(s[0].upper() + s[1:] for s in sentences) + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)[:num_chars]


# --------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Corpus:
    """Tokens of a corpus, split into training and held-out validation parts (the last 5%)."""

    name: str
    train: torch.Tensor | TokenArray
    val: torch.Tensor | TokenArray
    max_token: int | None = None  # the largest token id in it (None: not known, e.g. byte-level text)

    def check_fits(self, seq_len: int) -> None:
        """Raise :class:`DataError` unless both splits hold at least one window of ``seq_len + 1`` tokens."""
        for split, tokens in (("training", self.train), ("validation", self.val)):
            if len(tokens) < seq_len + 1:
                raise DataError(
                    f"{self.name}: {split} split has {len(tokens)} tokens, fewer than"
                    f" seq_len + 1 = {seq_len + 1}; use more text or a shorter seq_len"
                )

    def check_vocab(self, vocab_size: int) -> None:
        """Raise :class:`DataError` when a token id of the corpus is outside a model vocabulary of ``vocab_size``."""
        if self.max_token is not None and self.max_token >= vocab_size:
            raise DataError(
                f"{self.name}: token id {self.max_token} is outside the model's vocabulary (vocab_size={vocab_size})"
            )


def _split(name: str, text: str, tokenizer: Any = None) -> Corpus:
    tokens = (tokenizer or ByteTokenizer()).encode(text)
    cut = len(tokens) - max(1, int(len(tokens) * VAL_FRACTION))
    max_token = int(tokens.max()) if tokenizer is not None and len(tokens) else None
    corpus = Corpus(name, tokens[:cut].clone(), tokens[cut:].clone(), max_token)
    log.info("corpus %s: %d training and %d validation tokens", name, len(corpus.train), len(corpus.val))
    return corpus


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read_file(path: pathlib.Path) -> str:
    """Text of one ``.txt`` or ``.jsonl`` file; :class:`DataError` naming the file (and line) otherwise."""
    try:
        raw = path.read_bytes() if path.suffix.lower() != ".parquet" else b""
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({_one_line(err.strerror or err)})") from None
    if path.suffix.lower() == ".parquet":
        return "\n\n".join(_parquet_texts(path))
    text = raw.decode("utf-8-sig", errors="replace")  # "-sig": a leading byte-order mark is dropped
    if path.suffix.lower() == ".txt":
        return text
    texts = []
    # split on "\n" only: JSON strings may hold U+2028 and friends, which str.splitlines() would cut at
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
        texts.append(obj["text"])
    return "\n\n".join(texts)


def _data_files(root: pathlib.Path) -> list[pathlib.Path]:
    """All ``.txt``/``.jsonl`` files under ``root``, recursively (symlinked directories are not followed)."""

    def fail(err: OSError) -> None:
        where = err.filename or root
        if isinstance(err, PermissionError):
            raise DataError(f"{where}: permission denied") from None
        raise DataError(f"{where}: cannot list it ({_one_line(err.strerror or err)})") from None

    files = []
    for dirpath, _, filenames in os.walk(root, onerror=fail):
        for filename in filenames:
            path = pathlib.Path(dirpath, filename)
            if path.suffix.lower() in SUFFIXES and path.is_file():
                files.append(path)
    return sorted(files)


def load_corpus(path: str | os.PathLike[str] | None, tokenizer: Any = None) -> Corpus:
    """Load and split a corpus, tokenized with ``tokenizer`` (default: byte-level).

    A directory written by ``data prepare`` (it holds ``manifest.json``) is memory-mapped instead (its shards
    checked; ``tokenizer`` is not used): the last 5% of its tokens are the validation split.

    ``None`` gives the built-in corpus (name ``"builtin"``). Otherwise ``path`` is a ``.txt`` file (UTF-8,
    invalid bytes replaced), a ``.jsonl`` file (each non-blank line an object with a string ``text`` field,
    the texts joined by blank lines) or a directory searched recursively for both, read in sorted path
    order and joined by blank lines. Anything unusable raises :class:`DataError` with a one-line message
    naming the path: missing, unreadable, unsupported suffix, bad JSON line, no files, or no text.
    """
    if path is None:
        return _split("builtin", builtin_text())
    p = pathlib.Path(path)
    try:
        exists = p.exists()
    except OSError as err:  # e.g. a name too long, or a parent directory that cannot be searched
        raise DataError(f"{p}: cannot access it ({_one_line(err.strerror or err)})") from None
    if not exists:
        raise DataError(f"{p}: no such file or directory")
    if is_prepared(p):
        return load_prepared(p)
    if p.is_dir():
        files = _data_files(p)
        if not files:
            raise DataError(f"{p}: directory has no .txt, .jsonl or .parquet files")
        log.debug("corpus %s: reading %d files", p, len(files))
        text = "\n\n".join(_read_file(f) for f in files)
    elif p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{p}: unsupported file type {p.suffix or '(no suffix)'!r}; use .txt, .jsonl or .parquet")
    elif not p.is_file():
        raise DataError(f"{p}: not a regular file")
    else:
        text = _read_file(p)
    if not text.strip():
        raise DataError(f"{p}: no text in it")
    return _split(str(p), text, tokenizer)


def load_prepared(path: str | os.PathLike[str], vocab_size: int | None = None) -> Corpus:
    """A prepared directory's shards, memory-mapped and split (the last 5% of tokens held out)."""
    try:
        tokens, manifest = open_shards(path, vocab_size=vocab_size)
    except ShardError as err:
        raise DataError(str(err)) from None
    cut = len(tokens) - max(1, int(len(tokens) * VAL_FRACTION))
    max_token = max(s.max_token for s in manifest["shards"])
    corpus = Corpus(str(path), tokens[:cut], tokens[cut:], max_token)  # type: ignore[arg-type]
    log.info("corpus %s: %d training and %d validation tokens (memory-mapped)", path, len(corpus.train),
             len(corpus.val))  # fmt: skip
    return corpus


def load_corpus_for(config: SwarmConfig) -> Corpus:
    """The corpus of ``config`` (its ``data`` with its ``tokenizer``), checked against its vocabulary."""
    try:
        tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer is not None else None
    except TokenizerError as err:
        raise DataError(str(err)) from None
    corpus = load_corpus(config.data, tokenizer)
    corpus.check_vocab(config.model.vocab_size)
    return corpus


# --------------------------------------------------------------------------- streaming (data prepare, tokenizer train)


def _parquet_texts(path: pathlib.Path, batch_rows: int = 4096) -> Iterator[str]:
    """The strings of a Parquet file's ``text`` column (or its only string column), a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        fields = pf.schema_arrow
        strings = [f.name for f in fields if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        column = "text" if "text" in fields.names else strings[0] if len(strings) == 1 else None
        if column is None:
            raise DataError(f"{path}: no 'text' column (string columns: {', '.join(strings) or 'none'})")
        if column not in strings:
            raise DataError(f"{path}: column 'text' is not a string column")
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
            yield from (t for t in batch.column(0).to_pylist() if t)
    except DataError:
        raise
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(err)[:160]})") from None


def _stream_file(path: pathlib.Path, block_chars: int) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_texts(path)
        return
    try:
        with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
            if suffix == ".txt":  # blocks of whole lines
                while True:
                    block = f.read(block_chars)
                    if not block:
                        return
                    block += f.readline()
                    yield block
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
                yield obj["text"]
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({_one_line(err.strerror or err)})") from None


def source_files(path: str | os.PathLike[str]) -> list[pathlib.Path]:
    """The input files of ``data prepare`` / ``tokenizer train``: ``path`` itself or the files under it."""
    p = pathlib.Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        files = _data_files(p)
        if not files:
            raise DataError(f"{p}: directory has no .txt, .jsonl or .parquet files")
        return files
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{p}: unsupported file type {p.suffix or '(no suffix)'!r}; use .txt, .jsonl or .parquet")
    return [p]


def iter_documents(files: list[pathlib.Path], block_chars: int = 1 << 20) -> Iterator[str]:
    """The documents of ``files`` in order, streamed: a ``.jsonl`` line's text, a Parquet row's text, or a
    block of about ``block_chars`` characters of whole lines of a ``.txt`` file."""
    for f in files:
        yield from _stream_file(f, block_chars)
