"""Byte-level tokenizer: UTF-8 bytes are the tokens (vocabulary 256), so no vocabulary file is needed."""

from __future__ import annotations

import torch


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """UTF-8 bytes of ``text`` as a 1-D uint8 tensor."""
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        data = bytes(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
        return data.decode("utf-8", errors="replace")
