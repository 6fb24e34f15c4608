"""Tensor streams: round trips, chunking, and refusal of malformed streams."""

import pytest
import torch

from node.proto import stage_pb2 as pb
from node.wire.tensors import CHUNK_BYTES, WireError, data_payload, decode_chunks, encode_stream, tensor_chunks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (2, 700, 500), (0, 4), ()])
def test_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = torch.randn(shape).to(dtype)
    meta = pb.MicrobatchMeta(step=7, microbatch=3, route=[0, 1, 2, 0], hop=1)
    chunks = list(encode_stream(meta, [("a", t), ("b", t * 2)]))
    got_meta, tensors = decode_chunks(chunks)
    assert got_meta == meta
    assert tensors["a"].dtype == dtype and torch.equal(tensors["a"], t)
    assert torch.equal(tensors["b"], t * 2)


def test_chunks_are_about_one_mib_and_two_bytes_per_bf16() -> None:
    t = torch.randn(3 * CHUNK_BYTES // 2 + 10).to(torch.bfloat16)  # 3 MiB + 20 bytes
    messages = list(tensor_chunks(t))
    header = pb.TensorChunk.FromString(messages[0])
    assert header.header.nbytes == 2 * t.numel() and not header.data
    payloads = [data_payload(m) for m in messages[1:]]
    assert [len(p) for p in payloads] == [CHUNK_BYTES, CHUNK_BYTES, CHUNK_BYTES, 20]
    # the hand-written data messages are valid protobuf: a stock parser reads the same bytes
    assert all(pb.TensorChunk.FromString(m).data == bytes(p) for m, p in zip(messages[1:], payloads, strict=True))


def _chunks(t: torch.Tensor) -> list[bytes]:
    return list(encode_stream(pb.MicrobatchMeta(step=1), [("", t)], chunk_bytes=64))


def test_truncated_stream_is_refused() -> None:
    chunks = _chunks(torch.randn(100))
    with pytest.raises(WireError) as err:
        decode_chunks(chunks[:-1])
    assert err.value.reason == "truncated"


def test_extra_bytes_are_refused() -> None:
    chunks = _chunks(torch.randn(100))
    chunks.append(pb.TensorChunk(data=b"\0" * 8).SerializeToString())
    with pytest.raises(WireError) as err:
        decode_chunks(chunks)
    assert err.value.reason == "oversize"


def test_header_lying_about_size_is_refused() -> None:
    chunks = _chunks(torch.randn(10))
    first = pb.TensorChunk.FromString(chunks[0])
    first.header.nbytes = 400
    chunks[0] = first.SerializeToString()
    with pytest.raises(WireError) as err:
        decode_chunks(chunks)
    assert err.value.reason == "bad_shape"


@pytest.mark.parametrize("shape", [[0, 1 << 62, 1 << 62], [1 << 31, 1 << 31, 0], [0, 1 << 40, 1 << 23]])
def test_empty_tensor_with_overflowing_strides_is_a_bad_shape(shape: list[int]) -> None:
    header = pb.TensorHeader(name="", dtype=pb.DTYPE_FLOAT32, shape=shape, nbytes=0)
    with pytest.raises(WireError) as err:
        decode_chunks([pb.TensorChunk(meta=pb.MicrobatchMeta(step=1), header=header)])
    assert err.value.reason == "bad_shape"


def test_limits_are_enforced_before_allocation() -> None:
    chunk = pb.TensorChunk(header=pb.TensorHeader(dtype=pb.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20], nbytes=4 << 40))
    with pytest.raises(WireError) as err:
        decode_chunks([chunk], max_tensor_bytes=1 << 30)
    assert err.value.reason == "oversize"


def test_unknown_dtype_and_data_before_header() -> None:
    with pytest.raises(WireError) as err:
        decode_chunks([pb.TensorChunk(header=pb.TensorHeader(dtype=99, shape=[1], nbytes=4))])
    assert err.value.reason == "bad_dtype"
    with pytest.raises(WireError) as err:
        decode_chunks([pb.TensorChunk(data=b"1234")])
    assert err.value.reason == "bad_stream"


def test_garbage_message_is_a_bad_stream() -> None:
    with pytest.raises(WireError) as err:
        decode_chunks([b"\xff\xff\xff"])
    assert err.value.reason == "bad_stream"
