"""Corpora: the built-in generated one (no download) and the user's ``.txt`` / ``.jsonl`` files."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import random
from dataclasses import dataclass

import torch

from node.data.tokenizer import ByteTokenizer

VAL_FRACTION = 0.05


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line naming the path and the problem."""


_NUMBERS = [
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
]
_ANIMALS = ["fox", "cat", "dog", "owl", "horse", "goat", "hen", "mouse", "crow", "bear", "duck", "sheep"]
_COLOURS = ["red", "brown", "black", "white", "grey", "small", "old", "young", "quiet", "quick"]
_PLACES = ["barn", "field", "river", "forest", "garden", "house", "hill", "market", "road", "meadow"]
_PEOPLE = [
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
]
_VERBS = [
    ("sees", "saw"),
    ("feeds", "fed"),
    ("follows", "followed"),
    ("finds", "found"),
    ("calls", "called"),
    ("watches", "watched"),
    ("helps", "helped"),
    ("carries", "carried"),
]
_THINGS = ["bread", "apples", "water", "a basket", "a letter", "some wood", "a lamp", "the key", "a song"]
_TIMES = ["in the morning", "at noon", "in the evening", "at night", "on monday", "after the rain", "every day"]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return f"the {rng.choice(_COLOURS)} {rng.choice(_ANIMALS)} is in the {rng.choice(_PLACES)}."
    if kind == 1:
        present, past = rng.choice(_VERBS)
        verb = present if rng.random() < 0.5 else past
        return f"{rng.choice(_PEOPLE)} {verb} the {rng.choice(_ANIMALS)} {rng.choice(_TIMES)}."
    if kind == 2:
        a, b = rng.randrange(10), rng.randrange(9)
        return f"{_NUMBERS[a]} plus {_NUMBERS[b]} is {_NUMBERS[a + b]}."
    if kind == 3:
        return f"{rng.choice(_PEOPLE)} brings {rng.choice(_THINGS)} to the {rng.choice(_PLACES)}."
    if kind == 4:
        animal = rng.choice(_ANIMALS)
        return f"where is the {animal}? the {animal} is near the {rng.choice(_PLACES)}."
    a = rng.randrange(1, 10)
    b = rng.randrange(0, a + 1)
    return f"{_NUMBERS[a]} minus {_NUMBERS[b]} is {_NUMBERS[a - b]}."


@functools.lru_cache(maxsize=4)
def builtin_text(num_chars: int = 2_000_000, seed: int = 1234) -> str:
    """A deterministic English-like corpus from a small grammar: simple facts, stories and arithmetic.

    A pure function of its arguments (its own ``random.Random``), so every machine generates the same text.
    """
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < num_chars:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randrange(3, 8)))
        paragraph = paragraph[0].upper() + paragraph[1:] + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)[:num_chars]


@dataclass(frozen=True)
class Corpus:
    """Tokens of a corpus, split into training and held-out validation parts."""

    name: str
    train: torch.Tensor
    val: torch.Tensor

    def check_fits(self, seq_len: int) -> None:
        """Both splits must hold at least one window of ``seq_len + 1`` tokens."""
        for split, tokens in (("training", self.train), ("validation", self.val)):
            if len(tokens) < seq_len + 1:
                raise DataError(
                    f"{self.name}: {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
                )


def _split(name: str, text: str) -> Corpus:
    tokens = ByteTokenizer().encode(text)
    cut = len(tokens) - max(1, int(len(tokens) * VAL_FRACTION))
    return Corpus(name, tokens[:cut].clone(), tokens[cut:].clone())


def _read_text(path: pathlib.Path) -> str:
    try:
        raw = path.read_bytes()
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    text = raw.decode("utf-8", errors="replace")
    if path.suffix == ".txt":
        return text
    texts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
        texts.append(obj["text"])
    return "\n\n".join(texts)


def load_corpus(path: str | os.PathLike[str] | None) -> Corpus:
    """``None``: the built-in corpus. A ``.txt``/``.jsonl`` file, or a directory of them (recursive,
    sorted), otherwise. Raises :class:`DataError` naming the path for anything unusable."""
    if path is None:
        return _split("builtin", builtin_text())
    p = pathlib.Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"{p}: directory has no .txt or .jsonl files")
        text = "\n\n".join(_read_text(f) for f in files)
    elif p.suffix in (".txt", ".jsonl"):
        text = _read_text(p)
    else:
        raise DataError(f"{p}: unsupported file type {p.suffix or '(none)'!r}; use .txt or .jsonl")
    if not text.strip():
        raise DataError(f"{p}: no text in it")
    return _split(str(p), text)
