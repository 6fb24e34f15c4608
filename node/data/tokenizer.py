"""Tokenizers: the default byte-level one (UTF-8 bytes are the tokens, vocabulary 256, no file needed) and
Hugging Face ``tokenizer.json`` files read with the ``tokenizers`` library (never downloaded), including
byte-level BPE tokenizers trained here by ``swarm-node tokenizer train``.

Both kinds share one interface (:class:`Tokenizer`): ``vocab_size``, ``encode``, ``encode_batch``,
``decode``, ``eos_token_id`` and ``to_json`` (the ``tokenizer.json`` an export writes; the byte-level one is
written as a BPE model without merges whose token ids are the byte values).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import torch

EOS = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or one that does not match the model: one line."""


class Tokenizer(Protocol):
    """What training, data preparation, export and generation need of a tokenizer."""

    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> torch.Tensor: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, tokens: torch.Tensor | bytes | Iterable[int]) -> str: ...

    def to_json(self) -> str: ...


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back; every byte value 0..255 is a token."""

    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> torch.Tensor:
        """UTF-8 bytes of ``text`` as a 1-D uint8 tensor (empty text gives an empty tensor)."""
        data = text.encode("utf-8")
        if not data:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """UTF-8 bytes of each text as a uint8 array."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, tokens: torch.Tensor | bytes | Iterable[int]) -> str:
        """Text of byte tokens (a tensor, ``bytes`` or ints in 0..255); invalid UTF-8 becomes U+FFFD."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().reshape(-1).cpu().tolist()
        return bytes(tokens).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """This vocabulary as a Hugging Face ``tokenizer.json`` (token id = byte value)."""
        return _byte_level_json()


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@functools.cache
def _byte_level_json() -> str:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (any model the ``tokenizers`` library reads)."""

    def __init__(self, tok: object, source: str, text: str) -> None:
        self._tok = tok
        self.source = source
        self._json = text
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)  # type: ignore[attr-defined]
        self.eos_token_id: int | None = tok.token_to_id(EOS)  # type: ignore[attr-defined]
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as a 1-D int32 tensor (no special tokens added)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]
        return torch.tensor(ids, dtype=torch.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (in parallel, in the library's threads), as int64 arrays."""
        out = self._tok.encode_batch_fast(texts, add_special_tokens=False)  # type: ignore[attr-defined]
        return [np.asarray(e.ids, dtype=np.int64) for e in out]

    def decode(self, tokens: torch.Tensor | bytes | Iterable[int]) -> str:
        """Text of ``tokens``."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().reshape(-1).cpu().tolist()
        return self._tok.decode(list(tokens), skip_special_tokens=False)  # type: ignore[attr-defined]

    def to_json(self) -> str:
        """The ``tokenizer.json`` text this tokenizer was read from."""
        return self._json


def load_tokenizer(path: str | os.PathLike[str] | None) -> ByteTokenizer | HFTokenizer:
    """The byte-level tokenizer (``None``), or the Hugging Face ``tokenizer.json`` at ``path`` (a file, or a
    directory holding one, such as an export). Read locally only; problems raise :class:`TokenizerError`."""
    if path is None:
        return ByteTokenizer()
    p = pathlib.Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{p}: no such tokenizer file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{p}: cannot read it ({' '.join(str(err).split())})") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{p}: not a tokenizer.json (invalid JSON: {err.msg} at line {err.lineno})") from None
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_str(text)
    except Exception as err:  # the library raises plain Exception for a malformed model
        raise TokenizerError(
            f"{p}: not a tokenizer.json the tokenizers library can read ({_first_line(err)})"
        ) from None
    return HFTokenizer(tok, str(p), text)


def check_matches(tokenizer: ByteTokenizer | HFTokenizer, vocab_size: int, where: str = "the model") -> None:
    """:class:`TokenizerError` unless ``tokenizer`` has exactly ``vocab_size`` tokens."""
    if tokenizer.vocab_size != vocab_size:
        name = getattr(tokenizer, "source", "the byte-level tokenizer")
        raise TokenizerError(
            f"tokenizer {name} has {tokenizer.vocab_size} tokens but {where} has vocab_size={vocab_size}"
        )


def train_tokenizer(texts: Iterator[str], vocab_size: int, out: str | os.PathLike[str]) -> HFTokenizer:
    """Trains a byte-level BPE tokenizer of ``vocab_size`` tokens (256 byte tokens, ``<|endoftext|>`` and
    merges) on ``texts`` and writes its ``tokenizer.json`` to ``out``."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise TokenizerError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 257 (256 bytes + EOS)")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    text = tok.to_str()
    p = pathlib.Path(out)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    except OSError as err:
        raise TokenizerError(f"{p}: cannot write it ({err.strerror})") from None
    return HFTokenizer(tok, str(p), text)


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]
