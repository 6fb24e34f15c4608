"""Tensor streams: round trips, chunking, and refusal of malformed streams."""

import pytest
import torch

from node.proto import stage_pb2 as pb
from node.wire.quantize import (
    BLOCK,
    SCALE_NAME,
    as_received,
    dequantize_blockwise,
    num_blocks,
    quantize_blockwise,
    wire_form,
)
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


@pytest.mark.parametrize("shape", [(2, 8, 64), (3, 7), (1,), (130,)])
def test_int8_blockwise_round_trip_is_within_half_a_companded_step(shape) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) ** 3 * 10  # heavy tails, as gradients
    x.view(-1)[: min(64, x.numel())] = 0.0  # an all-zero block (the first) stays zero, with scale 0
    codes, scales = quantize_blockwise(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scales.numel() == num_blocks(x.numel())
    back = dequantize_blockwise(codes, scales)
    flat, err = x.reshape(-1), (back - x).reshape(-1).abs()
    for b in range(num_blocks(flat.numel())):
        block = slice(b * BLOCK, (b + 1) * BLOCK)
        m = float(flat[block].abs().max())
        assert float(scales[b]) == m
        # half a step in sqrt(|x| / m), mapped back through the square
        bound = m / 254 * (2 * (flat[block].abs() / max(m, 1e-30)).sqrt() + 1 / 254)
        assert bool((err[block] <= bound * (1 + 1e-5) + 1e-30).all())
        assert bool((torch.sign(back.reshape(-1)[block]) * torch.sign(flat[block]) >= 0).all())  # no sign flips
    assert float(scales[0]) == 0.0 and not back.reshape(-1)[:64].any()
    if x.numel() >= BLOCK:  # a quarter of fp32's bytes, plus one fp32 scale per block
        assert codes.numel() + 4 * scales.numel() <= x.numel() * (1 + 4 / BLOCK) + 4 * BLOCK


def test_int8_companding_keeps_small_values_that_a_linear_code_would_zero() -> None:
    x = torch.tensor([1.0] + [0.003] * 31 + [0.01] * 32)  # one large value per block, the rest far below it
    back = dequantize_blockwise(*quantize_blockwise(x))
    assert float(back[0]) == 1.0
    assert bool(((back[1:32] - 0.003).abs() <= 0.003 * 0.15).all())  # linear: round(0.003 * 127) = 0
    assert bool(((back[32:] - 0.01).abs() <= 0.01 * 0.05).all())


def test_int8_scales_that_do_not_fit_the_codes_are_refused() -> None:
    codes, scales = quantize_blockwise(torch.randn(200))
    for bad in (scales[:-1], -scales, torch.full_like(scales, float("inf")), scales.double()):
        with pytest.raises(ValueError):
            dequantize_blockwise(codes, bad)


@pytest.mark.parametrize("wire_dtype", [None, "float32", "bfloat16", "float16", "int8"])
def test_as_received_is_what_a_stage_rebuilds_from_the_stream(wire_dtype) -> None:
    """The reference's stage crossing (:func:`as_received`) is the swarm's: encode, decode, then what the
    service and runtime do with what arrived (dequantize int8 blocks, cast back to the compute dtype)."""
    x = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(3)) * 5
    _, got = decode_chunks(encode_stream(pb.MicrobatchMeta(step=1), wire_form(x, wire_dtype)))
    rebuilt = dequantize_blockwise(got[""], got[SCALE_NAME]) if SCALE_NAME in got else got[""]
    assert torch.equal(rebuilt.to(torch.float32), as_received(x, wire_dtype))
    assert (wire_dtype in (None, "float32")) == torch.equal(as_received(x, wire_dtype), x)
