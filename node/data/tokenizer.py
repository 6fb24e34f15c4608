"""Byte-level tokenizer: UTF-8 bytes are the tokens (vocabulary 256), so no vocabulary file is needed."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back; every byte value 0..255 is a token."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """UTF-8 bytes of ``text`` as a 1-D uint8 tensor (empty text gives an empty tensor)."""
        data = text.encode("utf-8")
        if not data:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def decode(self, tokens: torch.Tensor | bytes | Iterable[int]) -> str:
        """Text of byte tokens (a tensor, ``bytes`` or ints in 0..255); invalid UTF-8 becomes U+FFFD."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().reshape(-1).cpu().tolist()
        return bytes(tokens).decode("utf-8", errors="replace")
