"""Tensor (de)serialization for gRPC streams: headers, ~1 MiB chunks, strict validation.

A stream is a sequence of ``TensorChunk`` messages. The first carries the ``MicrobatchMeta``; the first
chunk of each tensor carries its ``TensorHeader`` (dtype, shape, byte count) and later chunks carry only
bytes. bf16 and fp16 travel as 2 bytes per element. The receiver preallocates each tensor from its header
and copies every chunk once into place; nothing is trusted before it is checked against limits.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from node.proto import stage_pb2 as pb

CHUNK_BYTES = 1 << 20
# gRPC message-size limit on every channel and server: a chunk plus headers, never unlimited.
MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES
MAX_ELEMENTS = 1 << 62  # a tensor header declaring more (or strides beyond int64) is refused

DTYPE_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.int64: pb.DTYPE_INT64,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.int8: pb.DTYPE_INT8,
}
WIRE_TO_DTYPE: dict[int, torch.dtype] = {v: k for k, v in DTYPE_TO_WIRE.items()}


class WireError(ValueError):
    """A malformed stream; ``reason`` is a short machine-readable code used as a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_DATA_TAG = b"\x1a"  # field 3 (data), wire type 2 (length-delimited)


def tensor_chunks(
    tensor: torch.Tensor, name: str = "", chunk_bytes: int = CHUNK_BYTES, meta: pb.MicrobatchMeta | None = None
) -> Iterator[bytes]:
    """Serialized ``TensorChunk`` messages of one tensor: a header message (with ``meta`` if given), then
    data-only messages written directly in protobuf wire format, so each payload byte is copied once."""
    if tensor.dtype not in DTYPE_TO_WIRE:
        raise WireError("bad_dtype", f"dtype {tensor.dtype} cannot be sent")
    flat = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
    raw = memoryview(flat.numpy())
    header = pb.TensorHeader(name=name, dtype=DTYPE_TO_WIRE[tensor.dtype], shape=list(tensor.shape), nbytes=len(raw))
    yield pb.TensorChunk(meta=meta, header=header).SerializeToString()
    for offset in range(0, len(raw), chunk_bytes):
        piece = raw[offset : offset + chunk_bytes]
        yield b"".join((_DATA_TAG, _varint(len(piece)), piece))


def encode_stream(
    meta: pb.MicrobatchMeta | None, tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """A whole stream of serialized messages: ``meta`` rides on the first header, then every tensor."""
    first = True
    for name, tensor in tensors:
        yield from tensor_chunks(tensor, name, chunk_bytes, meta if first else None)
        first = False
    if first and meta is not None:
        yield pb.TensorChunk(meta=meta).SerializeToString()


def data_payload(message: bytes) -> memoryview | None:
    """The payload of a data-only message (tag 3 + length + bytes and nothing else), else None."""
    if not message or message[0] != 0x1A:
        return None
    length, shift, pos = 0, 0, 1
    while pos < len(message) and pos < 11:
        byte = message[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
    if pos + length != len(message):
        return None
    return memoryview(message)[pos:]


@dataclass
class _Partial:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    buffer: np.ndarray  # uint8, uninitialised until filled
    filled: int = 0


@dataclass
class TensorAssembler:
    """Rebuilds tensors from chunks, enforcing a per-tensor and a per-stream byte limit."""

    max_tensor_bytes: int
    max_stream_bytes: int
    meta: pb.MicrobatchMeta | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    _order: list[str] = field(default_factory=list)
    _current: _Partial | None = None
    _total: int = 0
    _count: int = 0

    def feed(self, message: bytes | pb.TensorChunk) -> None:
        """Takes one message: serialized bytes (the fast path for data chunks) or a parsed TensorChunk."""
        if isinstance(message, bytes | bytearray | memoryview):
            payload = data_payload(bytes(message) if not isinstance(message, bytes) else message)
            if payload is not None:
                self._count += 1
                self._append(payload)
                return
            try:
                message = pb.TensorChunk.FromString(message)
            except Exception:  # protobuf raises DecodeError; anything unparsable is a bad stream
                raise WireError("bad_stream", "message is not a TensorChunk") from None
        chunk = message
        if self._count == 0 and chunk.HasField("meta"):
            self.meta = chunk.meta
        elif chunk.HasField("meta"):
            raise WireError("bad_stream", "microbatch metadata repeated after the first chunk")
        self._count += 1
        if chunk.HasField("header"):
            self._finish_current()
            self._current = self._start(chunk.header)
        if chunk.data:
            self._append(memoryview(chunk.data))

    def _append(self, data: memoryview) -> None:
        cur = self._current
        if cur is None:
            raise WireError("bad_stream", "tensor data before any tensor header")
        end = cur.filled + len(data)
        if end > len(cur.buffer):
            raise WireError("oversize", f"tensor {cur.name!r} got more bytes than its header declares")
        cur.buffer[cur.filled : end] = np.frombuffer(data, dtype=np.uint8)
        cur.filled = end

    def _start(self, header: pb.TensorHeader) -> _Partial:
        dtype = WIRE_TO_DTYPE.get(header.dtype)
        if dtype is None:
            raise WireError("bad_dtype", f"unknown dtype code {header.dtype}")
        shape = tuple(int(s) for s in header.shape)
        if any(s < 0 for s in shape) or len(shape) > 8:
            raise WireError("bad_shape", f"invalid shape {list(shape)}")
        # torch computes strides from the non-zero dims even when the tensor is empty: keep them in int64
        if math.prod(s for s in shape if s) >= MAX_ELEMENTS:
            raise WireError("bad_shape", f"shape {list(shape)} has strides beyond int64")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        if nbytes != header.nbytes:
            raise WireError(
                "bad_shape", f"header says {header.nbytes} bytes but shape {list(shape)} of {dtype} needs {nbytes}"
            )
        if nbytes > self.max_tensor_bytes:
            raise WireError("oversize", f"tensor of {nbytes} bytes exceeds the limit of {self.max_tensor_bytes}")
        self._total += nbytes
        if self._total > self.max_stream_bytes:
            raise WireError("oversize", f"stream exceeds the limit of {self.max_stream_bytes} bytes")
        if header.name in self.tensors:
            raise WireError("bad_stream", f"tensor {header.name!r} sent twice")
        return _Partial(header.name, dtype, shape, np.empty(nbytes, dtype=np.uint8))

    def _finish_current(self) -> None:
        cur = self._current
        if cur is None:
            return
        if cur.filled != len(cur.buffer):
            raise WireError("truncated", f"tensor {cur.name!r} ended after {cur.filled} of {len(cur.buffer)} bytes")
        if len(cur.buffer):
            t = torch.from_numpy(cur.buffer).view(cur.dtype).view(cur.shape)
        else:
            t = torch.empty(cur.shape, dtype=cur.dtype)
        self.tensors[cur.name] = t
        self._order.append(cur.name)
        self._current = None

    def finish(self) -> dict[str, torch.Tensor]:
        """Completes the stream; raises if the last tensor is short or the stream was empty."""
        if self._count == 0:
            raise WireError("bad_stream", "empty stream")
        self._finish_current()
        return self.tensors


def decode_chunks(
    chunks: Iterable[bytes | pb.TensorChunk], max_tensor_bytes: int = 1 << 34, max_stream_bytes: int = 1 << 36
) -> tuple[pb.MicrobatchMeta | None, dict[str, torch.Tensor]]:
    """Synchronous decode of a whole stream (tests, tools)."""
    asm = TensorAssembler(max_tensor_bytes, max_stream_bytes)
    for chunk in chunks:
        asm.feed(chunk)
    return asm.meta, asm.finish()


async def decode_stream(
    chunks: AsyncIterator[bytes | pb.TensorChunk], max_tensor_bytes: int, max_stream_bytes: int
) -> tuple[pb.MicrobatchMeta | None, dict[str, torch.Tensor]]:
    """Decode of an incoming gRPC stream."""
    asm = TensorAssembler(max_tensor_bytes, max_stream_bytes)
    async for chunk in chunks:
        asm.feed(chunk)
    return asm.meta, asm.finish()
