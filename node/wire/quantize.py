"""Blockwise 8-bit quantisation of activations and gradients on the wire (``wire_dtype = "int8"``).

As in SWARM's compression of what travels between pipeline stages: the flattened tensor is cut into blocks
of ``BLOCK`` elements; each block travels as int8 codes and one fp32 scale, its largest magnitude ``m``.
That is about a quarter of fp32's bytes (plus 4 bytes per block).

The codes are square-root companded, ``c = round(127 · sign(x) · sqrt(|x| / m))``, and decode to
``sign(c) · m · (c / 127)²``: like the nonlinear maps of 8-bit optimisers, this spends the 255 levels where
most values are, far below the block's largest. A value at 1 % of ``m`` comes back within about 4 % (a
linear code, ``round(127 · x / m)``, loses up to 40 % there, and zeroes everything under 0.4 % of ``m``),
and the largest values within 1/127 of ``m``. Measured on the reference (``benchmarks/wire_int8.py``),
linear codes slowed training down (validation loss +16-24 % after 100 steps, 2 seeds); companded ones much
less.

A quantised tensor is sent as two tensors of one stream: the codes under the activation's name, in its
shape, and the scales under :data:`SCALE_NAME`. The receiver checks both before it rebuilds the tensor.

:func:`as_received` is the whole round trip in one process: the single-process reference applies it at every
stage boundary, so that it trains exactly as a swarm with the same ``wire_dtype`` does.
"""

from __future__ import annotations

import math

import torch

BLOCK = 64
SCALE_NAME = "int8.scale"
_LEVELS = 127.0
# the cast types of ``wire_dtype`` (int8 is blockwise quantisation, None and float32 send the tensor as it is)
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes in ``x``'s shape, fp32 scales: each block's largest magnitude, one per :data:`BLOCK`)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, (-n) % BLOCK)).view(-1, BLOCK)
    scales = padded.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero block: codes 0, scale 0
    companded = torch.sqrt((padded.abs() / safe[:, None]).clamp_(max=1.0)).mul_(_LEVELS)
    codes = torch.round(companded).mul_(torch.sign(padded)).to(torch.int8)
    return codes.view(-1)[:n].view(x.shape), scales


def num_blocks(numel: int) -> int:
    """How many scales a tensor of ``numel`` elements travels with."""
    return math.ceil(numel / BLOCK)


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
    """The tensor ``codes`` and ``scales`` stand for, in ``dtype``. Raises ValueError for scales that do not
    fit the codes (a count that is not one per block, a negative or non-finite scale)."""
    if codes.dtype != torch.int8 or scales.dtype != torch.float32 or scales.dim() != 1:
        raise ValueError(f"int8 codes and fp32 scales expected, got {codes.dtype} and {scales.dtype}")
    n = codes.numel()
    if scales.numel() != num_blocks(n):
        raise ValueError(f"{scales.numel()} scales for {n} elements (one per {BLOCK} expected)")
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise ValueError("a block scale is negative, NaN or Inf")
    flat = torch.nn.functional.pad(codes.reshape(-1).to(torch.float32), (0, (-n) % BLOCK)).view(-1, BLOCK)
    expanded = flat.abs().div_(_LEVELS).square_().mul_(torch.sign(flat)).mul_(scales[:, None])
    return expanded.view(-1)[:n].view(codes.shape).to(dtype)


def wire_form(x: torch.Tensor, wire_dtype: str | None) -> list[tuple[str, torch.Tensor]]:
    """The named tensors ``x`` travels as in one stream: itself, cast to ``wire_dtype``, or int8 codes (under
    the activation's name, ``""``) and their block scales (under :data:`SCALE_NAME`)."""
    if wire_dtype == "int8":
        codes, scales = quantize_blockwise(x)
        return [("", codes), (SCALE_NAME, scales)]
    cast = WIRE_DTYPES.get(wire_dtype or "")
    return [("", x if cast is None else x.to(cast))]


def as_received(x: torch.Tensor, wire_dtype: str | None) -> torch.Tensor:
    """``x`` as the other side of a link gets it when it travels as ``wire_dtype``, back in ``x``'s dtype
    (receivers compute in that dtype: a stage casts what arrives back before it uses it)."""
    if wire_dtype == "int8":
        return dequantize_blockwise(*quantize_blockwise(x), dtype=x.dtype)
    cast = WIRE_DTYPES.get(wire_dtype or "")
    return x if cast is None else x.to(cast).to(x.dtype)
